//! How fast each AEAD library seals and opens 16 KiB records on this CPU, and which one
//! `halfpipe_core::aead::AeadLib::for_cpu` picks. A benchmark, not a test:
//!
//! ```sh
//! cargo run --release -p halfpipe-core --example aead_speed
//! ```

use std::time::Instant;

use halfpipe_core::aead::AeadLib;

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
        let k = aws_lc_rs::aead::LessSafeKey::new(
            aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &key).unwrap(),
        );
        use aws_lc_rs::aead::{Aad, Nonce};
        let (s, o) = measure(
            |n, b| {
                let t = k
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(aad), b)
                    .unwrap();
                t.as_ref().try_into().unwrap()
            },
            |n, b| {
                k.open_in_place(Nonce::assume_unique_for_key(n), Aad::from(aad), b)
                    .is_ok()
            },
        );
        println!("round {round}: aws-lc AES-256-GCM seal {s:.2} GB/s, open {o:.2} GB/s");
        let k = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).unwrap(),
        );
        let (s, o) = measure(
            |n, b| {
                let t = k
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(n),
                        ring::aead::Aad::from(aad),
                        b,
                    )
                    .unwrap();
                t.as_ref().try_into().unwrap()
            },
            |n, b| {
                k.open_in_place(
                    ring::aead::Nonce::assume_unique_for_key(n),
                    ring::aead::Aad::from(aad),
                    b,
                )
                .is_ok()
            },
        );
        println!("round {round}: ring   AES-256-GCM seal {s:.2} GB/s, open {o:.2} GB/s");
    }
    println!(
        "this CPU gets: {} (override with --aead-lib / HALFPIPE_AEAD_LIB)",
        AeadLib::for_cpu().name()
    );
}
