//! Key files: X25519 static keys and pre-shared keys as standard base64, private files
//! refused when group- or world-readable.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use zeroize::Zeroizing;

/// A key file problem, naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Others may read the file.
    #[error("{path}: readable by group or others (mode {mode:o}); run: chmod 600 {path}")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// Not 32 bytes of standard base64.
    #[error("{what}: not a key (expected 44 characters of standard base64, as printed by 'halfpipe keys gen')")]
    Format {
        /// Where the key came from.
        what: String,
    },
}

/// Decodes a 32-byte key from base64 text; `what` names its origin for the error.
pub fn decode_key(text: &str, what: &str) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    let bytes = Zeroizing::new(B64.decode(text.trim()).map_err(|_| KeyFileError::Format {
        what: what.to_owned(),
    })?);
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return Err(KeyFileError::Format {
            what: what.to_owned(),
        });
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// Decodes a public key (not secret).
pub fn decode_public(text: &str, what: &str) -> Result<[u8; 32], KeyFileError> {
    decode_key(text, what).map(|k| *k)
}

/// Encodes a key as base64.
pub fn encode_key(key: &[u8; 32]) -> String {
    B64.encode(key)
}

/// Refuses a secret file that group or others can read.
pub fn check_private_permissions(path: &Path) -> Result<(), KeyFileError> {
    let meta = fs::metadata(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads a private key (or PSK) file, refusing it when others can read it.
pub fn read_private_key(path: &Path) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    check_private_permissions(path)?;
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })?);
    decode_key(&text, &path.display().to_string())
}

/// Writes a secret file with mode 0600 (created fresh; an existing file is replaced).
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp-new");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Writes a private key file (0600).
pub fn write_private_key(path: &Path, key: &[u8; 32]) -> Result<(), KeyFileError> {
    let text = Zeroizing::new(format!("{}\n", encode_key(key)));
    write_secret_file(path, text.as_bytes())
}

/// Writes a public key file (0644).
pub fn write_public_key(path: &Path, key: &[u8; 32]) -> Result<(), KeyFileError> {
    fs::write(path, format!("{}\n", encode_key(key))).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_permission_refusal() {
        let dir = std::env::temp_dir().join(format!("hp-keyfile-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k.key");
        let key = [42u8; 32];
        write_private_key(&p, &key).unwrap();
        assert_eq!(*read_private_key(&p).unwrap(), key);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_private_key(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        fs::write(dir.join("bad.key"), "not base64!").unwrap();
        fs::set_permissions(dir.join("bad.key"), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_private_key(&dir.join("bad.key")),
            Err(KeyFileError::Format { .. })
        ));
        assert!(decode_key(&B64.encode([1u8; 31]), "x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
