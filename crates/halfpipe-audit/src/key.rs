//! The audit signing key.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use crate::error::AuditError;
use crate::log::sync_parent_dir;

/// The Ed25519 key that signs the log's checkpoints.
///
/// The private half is zeroized when the value is dropped, is never printed (`Debug` shows
/// only the public key) and there is no way to read it back out through this API.
pub struct AuditKey {
    signing: SigningKey,
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("public", &self.public_hex())
            .finish_non_exhaustive()
    }
}

impl AuditKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> AuditKey {
        AuditKey {
            signing: SigningKey::generate(&mut OsRng),
        }
    }

    /// The key with this 32-byte Ed25519 secret (for a key store that holds the secret
    /// itself); the caller should zeroize its copy.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> AuditKey {
        AuditKey {
            signing: SigningKey::from_bytes(secret),
        }
    }

    /// Writes the key to a new file at `path` with mode 0600: one line of 64 hex digits.
    /// Refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), AuditError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    AuditError::KeyFileExists {
                        path: path.to_owned(),
                    }
                } else {
                    AuditError::io(path, "create", e)
                }
            })?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(self.signing.to_bytes())));
        f.write_all(text.as_bytes())
            .map_err(|e| AuditError::io(path, "write", e))?;
        f.sync_all().map_err(|e| AuditError::io(path, "fsync", e))?;
        sync_parent_dir(path)
    }

    /// Reads a key written by [`AuditKey::write_new`]. Refuses a file that group or others
    /// can access (the error says to run `chmod 600`).
    pub fn load(path: &Path) -> Result<AuditKey, AuditError> {
        let mut f = File::open(path).map_err(|e| AuditError::io(path, "open", e))?;
        let meta = f.metadata().map_err(|e| AuditError::io(path, "stat", e))?;
        if !meta.is_file() {
            return Err(AuditError::KeyFileInvalid {
                path: path.to_owned(),
                reason: "it is not a regular file".into(),
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AuditError::KeyFilePermissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = Zeroizing::new(String::new());
        // A key file is 65 bytes; reading a little more is enough to tell it is too long.
        (&mut f)
            .take(4096)
            .read_to_string(&mut text)
            .map_err(|e| AuditError::io(path, "read", e))?;
        let invalid = |reason: &str| AuditError::KeyFileInvalid {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let hex_text = text.trim();
        if hex_text.len() != 64 {
            return Err(invalid("it is not 64 hex digits long"));
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_text, &mut secret[..])
            .map_err(|_| invalid("it contains characters that are not hex digits"))?;
        Ok(AuditKey::from_secret_bytes(&secret))
    }

    /// The public key.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The public key as 64 lowercase hex digits (as named by the genesis record).
    pub fn public_hex(&self) -> String {
        hex::encode(self.public_bytes())
    }

    pub(crate) fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }
}
