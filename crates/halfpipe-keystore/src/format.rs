//! The sealed file: magic, fixed binary header, AES-256-GCM body (see the crate docs).

use std::path::Path;

use argon2::{Algorithm, Argon2, Params, Version};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::error::{KeyStoreError, Result};
use crate::sealer::{SealKind, Sealer};

/// The first six bytes of every key store file.
pub const MAGIC: &[u8; 6] = b"HPKS1\n";
/// The format version this build writes and reads (byte 6 of the file).
pub const FORMAT_VERSION: u8 = 1;
/// The length of the header, magic included: the additional authenticated data.
pub const HEADER_LEN: usize = 86;

const KIND_PASSPHRASE: u8 = 1;
const KIND_RAW_KEY: u8 = 2;
const AEAD_AES_256_GCM: u8 = 1;
const ARGON2_VERSION_13: u8 = 0x13;
const TAG_LEN: usize = 16;
/// HKDF `info` for the per-save AES-256-GCM key.
const HKDF_INFO: &[u8] = b"halfpipe keystore v1 aes-256-gcm";

/// Argon2id cost parameters for a passphrase-sealed store, stored in its header.
///
/// [`KdfParams::default`] is m = 64 MiB, t = 3, p = 1 (about a quarter of a second on a
/// current server core). Lower costs make a stolen file cheaper to brute-force; tests
/// use tiny ones. Opening refuses parameters outside the ranges below before running
/// Argon2id, so a hostile header cannot make the process allocate gigabytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory cost in KiB: at least 8 × `p_cost`, at most [`KdfParams::MAX_M_COST_KIB`].
    pub m_cost_kib: u32,
    /// Number of passes: 1 to [`KdfParams::MAX_T_COST`].
    pub t_cost: u32,
    /// Parallelism (lanes): 1 to [`KdfParams::MAX_P_COST`].
    pub p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// The largest memory cost accepted: 1 GiB.
    pub const MAX_M_COST_KIB: u32 = 1024 * 1024;
    /// The largest number of passes accepted.
    pub const MAX_T_COST: u32 = 10;
    /// The largest parallelism accepted.
    pub const MAX_P_COST: u32 = 16;

    /// Parameters, checked against the accepted ranges.
    pub fn new(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Result<Self> {
        let p = Self {
            m_cost_kib,
            t_cost,
            p_cost,
        };
        p.check(None)?;
        Ok(p)
    }

    /// Checks the ranges; `path` names the file whose header held them, if any.
    pub(crate) fn check(&self, path: Option<&Path>) -> Result<()> {
        let what = if !(1..=Self::MAX_P_COST).contains(&self.p_cost) {
            Some(format!(
                "p_cost {} (accepted: 1 to {})",
                self.p_cost,
                Self::MAX_P_COST
            ))
        } else if !(1..=Self::MAX_T_COST).contains(&self.t_cost) {
            Some(format!(
                "t_cost {} (accepted: 1 to {})",
                self.t_cost,
                Self::MAX_T_COST
            ))
        } else if self.m_cost_kib < 8 * self.p_cost || self.m_cost_kib > Self::MAX_M_COST_KIB {
            Some(format!(
                "m_cost {} KiB (accepted: 8 × p_cost = {} to {} KiB)",
                self.m_cost_kib,
                8 * self.p_cost,
                Self::MAX_M_COST_KIB
            ))
        } else {
            None
        };
        match what {
            None => Ok(()),
            Some(what) => Err(KeyStoreError::ParamsOutOfRange {
                path: path.map(Path::to_path_buf),
                what,
            }),
        }
    }
}

/// How a store is sealed: fixed for the life of a store, written in every header.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SealParams {
    pub(crate) kind: SealKind,
    /// Zero for a raw-key store.
    pub(crate) kdf: KdfParams,
    /// The Argon2id salt (zero for a raw-key store).
    pub(crate) argon_salt: [u8; 16],
}

const NO_KDF: KdfParams = KdfParams {
    m_cost_kib: 0,
    t_cost: 0,
    p_cost: 0,
};

impl SealParams {
    /// Fresh parameters for a new store sealed by `sealer`.
    pub(crate) fn new(sealer: &Sealer, kdf: KdfParams) -> Result<Self> {
        match sealer.seal_kind() {
            SealKind::Passphrase => {
                kdf.check(None)?;
                let mut argon_salt = [0u8; 16];
                fill(&mut argon_salt)?;
                Ok(Self {
                    kind: SealKind::Passphrase,
                    kdf,
                    argon_salt,
                })
            }
            SealKind::RawKey => Ok(Self {
                kind: SealKind::RawKey,
                kdf: NO_KDF,
                argon_salt: [0; 16],
            }),
        }
    }

    /// The master key: Argon2id of the passphrase, or the raw key.
    pub(crate) fn master_key(&self, sealer: &Sealer) -> Result<Zeroizing<[u8; 32]>> {
        match (self.kind, sealer.passphrase_bytes()) {
            (SealKind::Passphrase, Some(pass)) => {
                let params = Params::new(
                    self.kdf.m_cost_kib,
                    self.kdf.t_cost,
                    self.kdf.p_cost,
                    Some(32),
                )
                .map_err(|e| KeyStoreError::ParamsOutOfRange {
                    path: None,
                    what: e.to_string(),
                })?;
                let mut out = Zeroizing::new([0u8; 32]);
                Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                    .hash_password_into(pass, &self.argon_salt, &mut out[..])
                    .map_err(|e| KeyStoreError::ParamsOutOfRange {
                        path: None,
                        what: e.to_string(),
                    })?;
                Ok(out)
            }
            (SealKind::RawKey, None) => sealer.raw_key(),
            _ => Err(KeyStoreError::BadSealer(
                "the sealer does not match the store's sealing".into(),
            )),
        }
    }
}

fn fill(buf: &mut [u8]) -> Result<()> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| KeyStoreError::Random)
}

/// The per-save AES-256-GCM key: HKDF-SHA256(salt = the save's fresh 32-byte salt,
/// ikm = master key, info = [`HKDF_INFO`]). A new key for every save means the random
/// nonce can never repeat under one key.
fn aead_key(master: &[u8; 32], hkdf_salt: &[u8; 32]) -> Result<LessSafeKey> {
    let prk = Salt::new(HKDF_SHA256, hkdf_salt).extract(master);
    let okm = prk
        .expand(&[HKDF_INFO], &AES_256_GCM)
        // Cannot fail: 32 bytes is far below HKDF-SHA256's output limit.
        .map_err(|_| KeyStoreError::Random)?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

struct Header {
    seal: SealParams,
    hkdf_salt: [u8; 32],
    nonce: [u8; NONCE_LEN],
    ct_len: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..6].copy_from_slice(MAGIC);
        h[6] = FORMAT_VERSION;
        let (kind, kdf_version) = match self.seal.kind {
            SealKind::Passphrase => (KIND_PASSPHRASE, ARGON2_VERSION_13),
            SealKind::RawKey => (KIND_RAW_KEY, 0),
        };
        h[7] = kind;
        h[8] = AEAD_AES_256_GCM;
        h[9] = kdf_version;
        h[10..14].copy_from_slice(&self.seal.kdf.m_cost_kib.to_be_bytes());
        h[14..18].copy_from_slice(&self.seal.kdf.t_cost.to_be_bytes());
        h[18..22].copy_from_slice(&self.seal.kdf.p_cost.to_be_bytes());
        h[22..38].copy_from_slice(&self.seal.argon_salt);
        h[38..70].copy_from_slice(&self.hkdf_salt);
        h[70..82].copy_from_slice(&self.nonce);
        h[82..86].copy_from_slice(&self.ct_len.to_be_bytes());
        h
    }

    /// Parses and checks everything that can be checked without the key, in an order
    /// that gives the most precise error: magic, version, length, fields, total length.
    fn decode(path: &Path, data: &[u8]) -> Result<Header> {
        let truncated = |needed: usize| KeyStoreError::Truncated {
            path: path.to_path_buf(),
            len: data.len(),
            needed,
        };
        let magic_len = data.len().min(MAGIC.len());
        if data[..magic_len] != MAGIC[..magic_len] {
            return Err(KeyStoreError::NotAKeyStore {
                path: path.to_path_buf(),
            });
        }
        if data.len() <= MAGIC.len() {
            return Err(truncated(HEADER_LEN + TAG_LEN));
        }
        if data[6] != FORMAT_VERSION {
            return Err(KeyStoreError::UnsupportedVersion {
                path: path.to_path_buf(),
                version: data[6],
            });
        }
        if data.len() < HEADER_LEN {
            return Err(truncated(HEADER_LEN + TAG_LEN));
        }
        let u32_at =
            |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        if data[8] != AEAD_AES_256_GCM {
            return Err(KeyStoreError::malformed(
                path,
                format!("unknown AEAD id {} (1 is AES-256-GCM)", data[8]),
            ));
        }
        let kdf = KdfParams {
            m_cost_kib: u32_at(10),
            t_cost: u32_at(14),
            p_cost: u32_at(18),
        };
        let mut argon_salt = [0u8; 16];
        argon_salt.copy_from_slice(&data[22..38]);
        let kind = match (data[7], data[9]) {
            (KIND_PASSPHRASE, ARGON2_VERSION_13) => {
                kdf.check(Some(path))?;
                SealKind::Passphrase
            }
            (KIND_PASSPHRASE, v) => {
                return Err(KeyStoreError::malformed(
                    path,
                    format!("unknown Argon2 version {v:#04x} (0x13 expected)"),
                ))
            }
            (KIND_RAW_KEY, 0) if kdf == NO_KDF && argon_salt == [0; 16] => SealKind::RawKey,
            (KIND_RAW_KEY, _) => {
                return Err(KeyStoreError::malformed(
                    path,
                    "a raw-key store with key-derivation fields set",
                ))
            }
            (k, _) => {
                return Err(KeyStoreError::malformed(
                    path,
                    format!("unknown sealer kind {k} (1 passphrase, 2 raw key)"),
                ))
            }
        };
        let mut hkdf_salt = [0u8; 32];
        hkdf_salt.copy_from_slice(&data[38..70]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&data[70..82]);
        let ct_len = u32_at(82);
        if (ct_len as usize) < TAG_LEN {
            return Err(KeyStoreError::malformed(
                path,
                format!("body length {ct_len} is shorter than the authentication tag"),
            ));
        }
        let needed = HEADER_LEN.saturating_add(ct_len as usize);
        if data.len() < needed {
            return Err(truncated(needed));
        }
        if data.len() > needed {
            return Err(KeyStoreError::malformed(
                path,
                format!(
                    "{} bytes after the end the header gives",
                    data.len() - needed
                ),
            ));
        }
        Ok(Header {
            seal: SealParams {
                kind,
                kdf,
                argon_salt,
            },
            hkdf_salt,
            nonce,
            ct_len,
        })
    }
}

/// Seals `plaintext` into a complete file image: header ‖ AES-256-GCM(plaintext) ‖ tag,
/// with the whole header as associated data.
pub(crate) fn seal(
    path: &Path,
    seal_params: &SealParams,
    master: &[u8; 32],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let ct_len = plaintext
        .len()
        .checked_add(TAG_LEN)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| KeyStoreError::malformed(path, "the payload does not fit in 4 GiB"))?;
    let mut header = Header {
        seal: *seal_params,
        hkdf_salt: [0; 32],
        nonce: [0; NONCE_LEN],
        ct_len,
    };
    fill(&mut header.hkdf_salt)?;
    fill(&mut header.nonce)?;
    let key = aead_key(master, &header.hkdf_salt)?;
    let head = header.encode();
    // Exact capacity: no reallocation can leave a plaintext copy in freed memory, and the
    // buffer is wiped if sealing fails while it still holds plaintext.
    let mut out = Zeroizing::new(Vec::with_capacity(HEADER_LEN + ct_len as usize));
    out.extend_from_slice(&head);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(header.nonce),
            Aad::from(&head[..]),
            &mut out[HEADER_LEN..],
        )
        .map_err(|_| KeyStoreError::malformed(path, "the payload is too large to seal"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(std::mem::take(&mut *out))
}

/// Opens a file image in place. On success, returns the sealing parameters, the master
/// key, and the range of `data` that now holds the plaintext. On failure nothing is
/// returned and the caller drops (and so wipes) `data`.
pub(crate) fn unseal(
    path: &Path,
    data: &mut [u8],
    sealer: &Sealer,
) -> Result<(SealParams, Zeroizing<[u8; 32]>, std::ops::Range<usize>)> {
    let header = Header::decode(path, data)?;
    if header.seal.kind != sealer.seal_kind() {
        return Err(KeyStoreError::SealerMismatch {
            path: path.to_path_buf(),
            file: header.seal.kind.name(),
            given: sealer.seal_kind().name(),
        });
    }
    let master = header.seal.master_key(sealer).map_err(|e| match e {
        KeyStoreError::ParamsOutOfRange { what, .. } => KeyStoreError::ParamsOutOfRange {
            path: Some(path.to_path_buf()),
            what,
        },
        other => other,
    })?;
    let key = aead_key(&master, &header.hkdf_salt)?;
    let (head, body) = data.split_at_mut(HEADER_LEN);
    debug_assert_eq!(body.len(), header.ct_len as usize);
    let plain_len = key
        .open_in_place(
            Nonce::assume_unique_for_key(header.nonce),
            Aad::from(&head[..]),
            body,
        )
        .map_err(|_| KeyStoreError::WrongKeyOrTampered {
            path: path.to_path_buf(),
        })?
        .len();
    Ok((header.seal, master, HEADER_LEN..HEADER_LEN + plain_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_ranges() {
        assert!(KdfParams::new(64, 1, 1).is_ok());
        assert!(KdfParams::default().check(None).is_ok());
        assert!(KdfParams::new(7, 1, 1).is_err());
        assert!(KdfParams::new(64, 0, 1).is_err());
        assert!(KdfParams::new(64, 11, 1).is_err());
        assert!(KdfParams::new(64, 1, 0).is_err());
        assert!(KdfParams::new(1024, 1, 17).is_err());
        assert!(KdfParams::new(KdfParams::MAX_M_COST_KIB + 1, 1, 1).is_err());
        assert!(KdfParams::new(KdfParams::MAX_M_COST_KIB, 1, 1).is_ok());
    }

    #[test]
    fn the_whole_header_is_associated_data() {
        let seal_params = SealParams {
            kind: SealKind::RawKey,
            kdf: NO_KDF,
            argon_salt: [0; 16],
        };
        let master = [9u8; 32];
        let file = seal(Path::new("x"), &seal_params, &master, b"payload").unwrap();
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&file[38..70]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&file[70..82]);
        let open = |aad: &[u8]| {
            let mut body = file[HEADER_LEN..].to_vec();
            aead_key(&master, &salt)
                .unwrap()
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut body,
                )
                .map(|p| p.to_vec())
        };
        assert_eq!(open(&file[..HEADER_LEN]).unwrap(), b"payload");
        assert!(open(&[]).is_err());
        assert!(open(&file[6..HEADER_LEN]).is_err()); // the magic is bound too
        let mut other = file[..HEADER_LEN].to_vec();
        other[9] ^= 1;
        assert!(open(&other).is_err());
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            seal: SealParams {
                kind: SealKind::Passphrase,
                kdf: KdfParams::new(64, 1, 1).unwrap(),
                argon_salt: [3; 16],
            },
            hkdf_salt: [4; 32],
            nonce: [5; 12],
            ct_len: 16,
        };
        let mut file = h.encode().to_vec();
        file.extend_from_slice(&[0; 16]);
        let d = Header::decode(Path::new("x"), &file).unwrap();
        assert_eq!(d.encode(), h.encode());
    }
}
