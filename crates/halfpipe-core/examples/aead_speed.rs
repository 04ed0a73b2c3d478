//! How fast each AEAD library seals and opens 16 KiB records on this CPU, and which one
//! `halfpipe_core::aead::AeadLib::for_cpu` picks. A benchmark, not a test:
//!
//! ```sh
//! cargo run --release -p halfpipe-core --example aead_speed
//! ```

use std::time::Instant;

use halfpipe_core::aead::{AeadKey, AeadLib, Algorithm};

const RECORD: usize = 16 * 1024;
const RECORDS: u64 = 100_000;

/// GB/s of sealing, then of opening, [`RECORDS`] records with `seal` and `open` (each open
/// includes copying the sealed record back in, 16 KiB of memcpy).
fn measure(
    mut seal: impl FnMut([u8; 12], &mut [u8]) -> [u8; 16],
    mut open: impl FnMut([u8; 12], &mut [u8]) -> bool,
) -> (f64, f64) {
    let mut buf = vec![0x5a_u8; RECORD + 16];
    let mut tags = Vec::with_capacity(RECORDS as usize);
    let gbs = |t: Instant| (RECORD as u64 * RECORDS) as f64 / t.elapsed().as_secs_f64() / 1e9;
    let nonce = |i: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_be_bytes());
        n
    };
    let t = Instant::now();
    for i in 0..RECORDS {
        tags.push(seal(nonce(i), &mut buf[..RECORD]));
    }
    let sealed = gbs(t);
    // Open one real record over and over (opening fails fast on a wrong tag, which would
    // measure nothing), so seal it once more under a fixed nonce.
    let tag = seal(nonce(0), &mut buf[..RECORD]);
    let ciphertext = buf[..RECORD].to_vec();
    let t = Instant::now();
    for _ in 0..RECORDS {
        buf[..RECORD].copy_from_slice(&ciphertext);
        buf[RECORD..].copy_from_slice(&tag);
        assert!(open(nonce(0), &mut buf), "a record failed to open");
    }
    (sealed, gbs(t))
}

fn main() {
    let key = [7u8; 32];
    let aad = [23u8, 3, 3, 0x40, 0x11];
    for round in 1..=3 {
        for lib in AeadLib::ALL {
            // The record layer's own keys, so this measures what a leg runs.
            let k = AeadKey::with_lib(lib, Algorithm::Aes256Gcm, &key).unwrap();
            let (s, o) = measure(
                |n, b| {
                    let mut tag = [0u8; 16];
                    k.seal(n, &aad, b, &mut tag).unwrap();
                    tag
                },
                |n, b| k.open(n, &aad, b).is_ok(),
            );
            println!(
                "round {round}: {:6} AES-256-GCM seal {s:.2} GB/s, open {o:.2} GB/s",
                lib.name()
            );
        }
    }
    println!(
        "this CPU gets: {} (override with --aead-lib / HALFPIPE_AEAD_LIB)",
        AeadLib::for_cpu().name()
    );
}
