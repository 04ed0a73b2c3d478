//! The AEAD behind the record layer, from whichever of two libraries is faster on this CPU.
//!
//! aws-lc and ring both implement AES-GCM and ChaCha20-Poly1305 in assembly, but not the
//! same assembly: on an x86-64 CPU with AVX-512 and VAES, aws-lc has an AVX-512 AES-GCM
//! and ring stops at 256-bit VAES; on one with VAES but no AVX-512, aws-lc falls back to
//! 128-bit AES-NI while ring uses VAES. Sealing 16 KiB records in a loop measured aws-lc
//! 9.3–9.6 GB/s against ring 6.4–8.1 on the first kind, and ring 6.8 against aws-lc
//! 3.0–3.7 on the second (`docs/BENCHMARKS.md`). Both produce the same bytes, so the
//! choice is local to each end and never on the wire.

use std::sync::OnceLock;

use crate::record::RecordError;

/// A library that implements the record AEADs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AeadLib {
    /// aws-lc, through `aws-lc-rs`.
    AwsLc,
    /// ring.
    Ring,
}

/// The library every new key uses; set once, at the first key or by [`AeadLib::prefer`].
static CHOSEN: OnceLock<AeadLib> = OnceLock::new();

impl AeadLib {
    /// Every library, in the order names are listed.
    pub const ALL: [AeadLib; 2] = [AeadLib::AwsLc, AeadLib::Ring];

    /// The library for this process: the one [`AeadLib::prefer`] set, else the faster one
    /// on this CPU ([`AeadLib::for_cpu`]).
    pub fn current() -> Self {
        *CHOSEN.get_or_init(Self::for_cpu)
    }

    /// Makes `lib` this process's library (for measuring one against the other). Refused,
    /// returning the library already in use, once a key was made.
    pub fn prefer(lib: AeadLib) -> Result<(), AeadLib> {
        CHOSEN.set(lib).map_err(|_| Self::current())
    }

    /// The faster library on the CPU this runs on.
    pub fn for_cpu() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let aws_lc_avx512_gcm = has!("avx512f")
                && has!("avx512dq")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("vaes")
                && has!("vpclmulqdq");
            Self::for_x86_64(aws_lc_avx512_gcm)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            AeadLib::AwsLc
        }
    }

    /// On x86-64: aws-lc where its AVX-512 AES-GCM runs (the CPU has AVX-512 F/DQ/BW/VL,
    /// VAES and VPCLMULQDQ, the test aws-lc itself makes), ring everywhere else (with VAES
    /// it is the faster; without, both run the same AES-NI code).
    pub fn for_x86_64(aws_lc_avx512_gcm: bool) -> Self {
        match aws_lc_avx512_gcm {
            true => AeadLib::AwsLc,
            false => AeadLib::Ring,
        }
    }

    /// The name used in `HALFPIPE_AEAD_LIB` and in logs.
    pub fn name(self) -> &'static str {
        match self {
            AeadLib::AwsLc => "aws-lc",
            AeadLib::Ring => "ring",
        }
    }

    /// Parses [`AeadLib::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// An AEAD algorithm the record layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// AES-128-GCM (a TLS 1.3 suite).
    Aes128Gcm,
    /// AES-256-GCM.
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    ChaCha20Poly1305,
}

/// One AEAD key, from the library chosen when it was made.
// ring's key holds its expanded AES key and GHASH table inline; every AeadKey lives in a
// boxed record key (`Keyed`, `TlsKeyed`), so the size costs one allocation per leg.
#[allow(clippy::large_enum_variant)]
pub enum AeadKey {
    /// An aws-lc key.
    AwsLc(aws_lc_rs::aead::LessSafeKey),
    /// A ring key.
    Ring(ring::aead::LessSafeKey),
}

/// Runs `$body` once per library, with `$aead` naming that library's `aead` module: the two
/// libraries' APIs are the same, their types are not. The first form picks by library
/// (`$wrap` is the `AeadKey` variant that holds its key), the second by a key (`$k`).
macro_rules! per_lib {
    (lib $lib:expr, |$aead:ident, $wrap:ident| $body:expr) => {
        match $lib {
            AeadLib::AwsLc => {
                use aws_lc_rs::aead as $aead;
                let $wrap = AeadKey::AwsLc;
                $body
            }
            AeadLib::Ring => {
                use ring::aead as $aead;
                let $wrap = AeadKey::Ring;
                $body
            }
        }
    };
    (key $key:expr, |$aead:ident, $k:ident| $body:expr) => {
        match $key {
            AeadKey::AwsLc($k) => {
                use aws_lc_rs::aead as $aead;
                $body
            }
            AeadKey::Ring($k) => {
                use ring::aead as $aead;
                $body
            }
        }
    };
}

impl AeadKey {
    /// A key for `algorithm` from this process's library.
    pub fn new(algorithm: Algorithm, key: &[u8]) -> Result<Self, RecordError> {
        Self::with_lib(AeadLib::current(), algorithm, key)
    }

    /// A key for `algorithm` from `lib`.
    pub fn with_lib(lib: AeadLib, algorithm: Algorithm, key: &[u8]) -> Result<Self, RecordError> {
        per_lib!(lib lib, |aead, wrap| {
            let alg = match algorithm {
                Algorithm::Aes128Gcm => &aead::AES_128_GCM,
                Algorithm::Aes256Gcm => &aead::AES_256_GCM,
                Algorithm::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
            };
            let unbound = aead::UnboundKey::new(alg, key).map_err(|_| RecordError::BadKey)?;
            Ok(wrap(aead::LessSafeKey::new(unbound)))
        })
    }

    /// Encrypts `plain` in place under `nonce` with `aad`, and writes the tag into
    /// `tag_room` (which must be the tag's length).
    pub fn seal(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        plain: &mut [u8],
        tag_room: &mut [u8],
    ) -> Result<(), RecordError> {
        per_lib!(key self, |aead, k| {
            let nonce = aead::Nonce::assume_unique_for_key(nonce);
            let tag = k
                .seal_in_place_separate_tag(nonce, aead::Aad::from(aad), plain)
                .map_err(|_| RecordError::BadKey)?;
            tag_room.copy_from_slice(tag.as_ref());
        });
        Ok(())
    }

    /// Decrypts `sealed` (ciphertext then tag) in place and returns the plaintext's length;
    /// [`RecordError::BadTag`] when it does not authenticate.
    pub fn open(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        sealed: &mut [u8],
    ) -> Result<usize, RecordError> {
        per_lib!(key self, |aead, k| {
            let nonce = aead::Nonce::assume_unique_for_key(nonce);
            k.open_in_place(nonce, aead::Aad::from(aad), sealed)
                .map(|p| p.len())
                .map_err(|_| RecordError::BadTag)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBS: [AeadLib; 2] = AeadLib::ALL;
    const ALGORITHMS: [(Algorithm, usize); 3] = [
        (Algorithm::Aes128Gcm, 16),
        (Algorithm::Aes256Gcm, 32),
        (Algorithm::ChaCha20Poly1305, 32),
    ];

    #[test]
    fn what_one_library_seals_the_other_opens_byte_for_byte() {
        for (alg, key_len) in ALGORITHMS {
            let key: Vec<u8> = (0..key_len as u8).collect();
            let nonce = [9u8; 12];
            let plain: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
            let mut sealed = Vec::new();
            for lib in LIBS {
                let k = AeadKey::with_lib(lib, alg, &key).unwrap();
                let mut body = plain.clone();
                let mut tag = [0u8; 16];
                k.seal(nonce, b"hdr", &mut body, &mut tag).unwrap();
                body.extend_from_slice(&tag);
                sealed.push(body);
            }
            assert_eq!(sealed[0], sealed[1], "{alg:?}: the two libraries disagree");
            assert_ne!(
                &sealed[0][..plain.len()],
                &plain[..],
                "{alg:?}: not encrypted"
            );
            for (seal_lib, open_lib) in [(0, 1), (1, 0)] {
                let k = AeadKey::with_lib(LIBS[open_lib], alg, &key).unwrap();
                let mut body = sealed[seal_lib].clone();
                let n = k.open(nonce, b"hdr", &mut body).unwrap();
                assert_eq!(&body[..n], &plain[..], "{alg:?}: opened by {open_lib}");
                let mut tampered = sealed[seal_lib].clone();
                tampered[100] ^= 1;
                assert_eq!(
                    k.open(nonce, b"hdr", &mut tampered),
                    Err(RecordError::BadTag)
                );
                let mut body = sealed[seal_lib].clone();
                assert_eq!(
                    k.open(nonce, b"HDR", &mut body),
                    Err(RecordError::BadTag),
                    "{alg:?}: other associated data must fail"
                );
            }
        }
    }

    #[test]
    fn keys_of_the_wrong_length_are_refused_by_both_libraries() {
        for lib in LIBS {
            assert!(matches!(
                AeadKey::with_lib(lib, Algorithm::Aes256Gcm, &[0u8; 16]),
                Err(RecordError::BadKey)
            ));
        }
    }

    #[test]
    fn aws_lc_only_where_its_avx512_gcm_runs() {
        assert_eq!(AeadLib::for_x86_64(true), AeadLib::AwsLc);
        assert_eq!(AeadLib::for_x86_64(false), AeadLib::Ring);
    }

    #[test]
    fn library_names_round_trip_and_unknown_ones_are_refused() {
        for lib in LIBS {
            assert_eq!(AeadLib::from_name(lib.name()), Some(lib));
        }
        assert_eq!(AeadLib::from_name("openssl"), None);
    }
}
