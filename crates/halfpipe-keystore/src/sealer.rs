//! [`Sealer`]: where the key that seals the store comes from.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{KeyStoreError, Result};
use crate::fsutil::{self, ReadOutcome};

/// The longest passphrase file or key file read, in bytes.
const MAX_SECRET_FILE: usize = 4096;

/// Standard base64 alphabet, padding optional.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Where the key that seals the store comes from. See the crate documentation for how
/// to set up each one.
///
/// A passphrase goes through Argon2id (parameters in the file header); the three other
/// kinds hold a 32-byte random key directly (64 hex characters, base64, or — in a file —
/// 32 raw bytes) and skip Argon2id. Which of the two a store was sealed with is recorded
/// in its header: opening it with the other kind is [`KeyStoreError::SealerMismatch`].
///
/// `Debug` never shows the passphrase.
pub enum Sealer {
    /// A passphrase, stretched with Argon2id.
    Passphrase(Zeroizing<String>),
    /// A file holding the 32-byte key; it must be private to its owner (mode 0600 or
    /// stricter), or it is refused.
    KeyFile(PathBuf),
    /// The name of an environment variable holding the key (64 hex characters or
    /// base64), read each time the store is opened or saved.
    Env(String),
    /// The name of a systemd credential: the key is read from
    /// `$CREDENTIALS_DIRECTORY/NAME` (set up with `LoadCredential=` or
    /// `LoadCredentialEncrypted=`/`SetCredentialEncrypted=`).
    Credential(String),
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Passphrase(_) => f.write_str("Sealer::Passphrase(<redacted>)"),
            Self::KeyFile(p) => f.debug_tuple("Sealer::KeyFile").field(p).finish(),
            Self::Env(v) => f.debug_tuple("Sealer::Env").field(v).finish(),
            Self::Credential(c) => f.debug_tuple("Sealer::Credential").field(c).finish(),
        }
    }
}

/// What a sealer produces: a passphrase for Argon2id, or a raw 32-byte key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SealKind {
    Passphrase,
    RawKey,
}

impl SealKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Passphrase => "passphrase",
            Self::RawKey => "raw key (key file, environment variable or credential)",
        }
    }
}

const SPEC_HELP: &str = "a sealer is KIND:VALUE with KIND one of passphrase-env (VALUE: a \
                         variable name), passphrase-file (a path), keyfile (a path), env (a \
                         variable name), credential (a systemd credential name)";

impl Sealer {
    /// Parses a sealer spec, as written in a config file or on a command line:
    ///
    /// | spec | meaning |
    /// | --- | --- |
    /// | `passphrase-env:VAR` | the passphrase is the value of `$VAR` (read now) |
    /// | `passphrase-file:PATH` | the passphrase is the content of `PATH` (read now; mode 0600; one trailing newline dropped) |
    /// | `keyfile:PATH` | [`Sealer::KeyFile`] |
    /// | `env:VAR` | [`Sealer::Env`] |
    /// | `credential:NAME` | [`Sealer::Credential`] |
    ///
    /// A passphrase is never written in the spec itself. Error messages never repeat
    /// what follows the `:` except for paths and names, so a secret pasted by mistake
    /// does not end up in a log.
    pub fn from_spec(spec: &str) -> Result<Sealer> {
        let Some((kind, value)) = spec.split_once(':') else {
            return Err(KeyStoreError::BadSealer(format!(
                "no ':' in the sealer spec; {SPEC_HELP}"
            )));
        };
        match kind {
            "passphrase-env" => {
                check_var_name(value)?;
                let v = std::env::var_os(value).ok_or_else(|| {
                    KeyStoreError::BadSealer(format!(
                        "environment variable {value} is not set (it should hold the key \
                         store passphrase)"
                    ))
                })?;
                let v = Zeroizing::new(v.into_string().map_err(|mut os| {
                    os.clear();
                    KeyStoreError::BadSealer(format!(
                        "environment variable {value} is not valid UTF-8"
                    ))
                })?);
                passphrase(v, &format!("environment variable {value}"))
            }
            "passphrase-file" => {
                let path = non_empty_path(value)?;
                let what = format!("passphrase file {}", path.display());
                let mut bytes = read_secret_file(&path, &what)?;
                if bytes.ends_with(b"\n") {
                    bytes.pop();
                    if bytes.ends_with(b"\r") {
                        bytes.pop();
                    }
                }
                let s = match std::str::from_utf8(&bytes) {
                    Ok(s) => Zeroizing::new(s.to_owned()),
                    Err(_) => return Err(KeyStoreError::BadSealer(format!("{what} is not UTF-8"))),
                };
                passphrase(s, &what)
            }
            "keyfile" => Ok(Sealer::KeyFile(non_empty_path(value)?)),
            "env" => {
                check_var_name(value)?;
                Ok(Sealer::Env(value.to_owned()))
            }
            "credential" => {
                check_credential_name(value)?;
                Ok(Sealer::Credential(value.to_owned()))
            }
            "passphrase" => Err(KeyStoreError::BadSealer(
                "a passphrase is never written in the sealer spec: use \
                 passphrase-env:VAR or passphrase-file:PATH"
                    .into(),
            )),
            other => {
                // Echo the kind only when it looks like a kind, not like pasted secret.
                let shown = if !other.is_empty()
                    && other.len() <= 20
                    && other.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
                {
                    format!("unknown sealer kind {other:?}")
                } else {
                    "unknown sealer kind".to_owned()
                };
                Err(KeyStoreError::BadSealer(format!("{shown}; {SPEC_HELP}")))
            }
        }
    }

    /// A short name of this sealer's kind, for messages: `"passphrase"`, `"key file"`,
    /// `"environment variable"` or `"systemd credential"`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Passphrase(_) => "passphrase",
            Self::KeyFile(_) => "key file",
            Self::Env(_) => "environment variable",
            Self::Credential(_) => "systemd credential",
        }
    }

    pub(crate) fn seal_kind(&self) -> SealKind {
        match self {
            Self::Passphrase(_) => SealKind::Passphrase,
            _ => SealKind::RawKey,
        }
    }

    /// The passphrase bytes, for a passphrase sealer.
    pub(crate) fn passphrase_bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Passphrase(p) => Some(p.as_bytes()),
            _ => None,
        }
    }

    /// Reads the raw 32-byte key of a key file, environment or credential sealer.
    pub(crate) fn raw_key(&self) -> Result<Zeroizing<[u8; 32]>> {
        match self {
            Self::Passphrase(_) => Err(KeyStoreError::BadSealer(
                "a passphrase is not a raw key".into(),
            )),
            Self::KeyFile(path) => {
                let what = format!("key file {}", path.display());
                let bytes = read_secret_file(path, &what)?;
                parse_key(&bytes, true, &what)
            }
            Self::Env(var) => {
                check_var_name(var)?;
                let what = format!("environment variable {var}");
                let v = std::env::var_os(var).ok_or_else(|| {
                    KeyStoreError::BadSealer(format!(
                        "{what} is not set (it should hold the key store key: 64 hex \
                         characters or base64 of 32 bytes)"
                    ))
                })?;
                let v = Zeroizing::new(v.into_string().map_err(|mut os| {
                    os.clear();
                    KeyStoreError::BadSealer(format!("{what} is not valid UTF-8"))
                })?);
                parse_key(v.as_bytes(), false, &what)
            }
            Self::Credential(name) => {
                check_credential_name(name)?;
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    KeyStoreError::BadSealer(format!(
                        "credential {name}: CREDENTIALS_DIRECTORY is not set; run under \
                         systemd with LoadCredential={name}:/path/to/key (or \
                         LoadCredentialEncrypted=)"
                    ))
                })?;
                let path = Path::new(&dir).join(name);
                let what = format!("systemd credential {}", path.display());
                let bytes = read_secret_file(&path, &what)?;
                parse_key(&bytes, true, &what)
            }
        }
    }
}

/// Creates a new key file at `path` for [`Sealer::KeyFile`] (or for `LoadCredential=`):
/// 32 random bytes as 64 hex characters and a newline, mode 0600, never replacing an
/// existing file ([`KeyStoreError::Exists`]).
pub fn create_key_file(path: &Path) -> Result<()> {
    let mut key = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(&mut key[..])
        .map_err(|_| KeyStoreError::Random)?;
    let mut text = Zeroizing::new(vec![0u8; 65]);
    hex::encode_to_slice(&key[..], &mut text[..64]).map_err(|_| KeyStoreError::Random)?;
    text[64] = b'\n';
    fsutil::atomic_write(path, &text, true)
}

fn passphrase(p: Zeroizing<String>, what: &str) -> Result<Sealer> {
    if p.is_empty() {
        return Err(KeyStoreError::BadSealer(format!("{what} is empty")));
    }
    Ok(Sealer::Passphrase(p))
}

fn non_empty_path(value: &str) -> Result<PathBuf> {
    if value.is_empty() {
        return Err(KeyStoreError::BadSealer(format!(
            "the path is empty; {SPEC_HELP}"
        )));
    }
    Ok(PathBuf::from(value))
}

fn check_var_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(KeyStoreError::BadSealer(
            "an environment variable name is letters, digits and '_', not starting with a \
             digit"
                .into(),
        ))
    }
}

fn check_credential_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(KeyStoreError::BadSealer(
            "a credential name is a plain file name (no '/', not '.' or '..'), as in \
             LoadCredential=NAME:PATH"
                .into(),
        ))
    }
}

fn read_secret_file(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>> {
    match fsutil::read_private(path, MAX_SECRET_FILE)? {
        ReadOutcome::Data(d) => Ok(d),
        ReadOutcome::TooLarge(n) => Err(KeyStoreError::BadSealer(format!(
            "{what} is {n} bytes long, more than the {MAX_SECRET_FILE} accepted"
        ))),
    }
}

/// Decodes a 32-byte key: 64 hex characters or base64 (surrounding whitespace ignored),
/// or — when `raw_ok` — exactly 32 bytes taken as they are.
fn parse_key(bytes: &[u8], raw_ok: bool, what: &str) -> Result<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    if raw_ok && bytes.len() == 32 {
        key.copy_from_slice(bytes);
        return Ok(key);
    }
    let text = bytes.trim_ascii();
    if text.len() == 64 && text.iter().all(u8::is_ascii_hexdigit) {
        if hex::decode_to_slice(text, &mut key[..]).is_ok() {
            return Ok(key);
        }
    } else if (42..=44).contains(&text.len()) {
        let mut out = Zeroizing::new([0u8; 48]);
        if let Ok(32) = B64.decode_slice(text, &mut out[..]) {
            key.copy_from_slice(&out[..32]);
            return Ok(key);
        }
        out.zeroize();
    }
    let raw = if raw_ok {
        ", or exactly 32 raw bytes"
    } else {
        ""
    };
    Err(KeyStoreError::BadSealer(format!(
        "{what} does not hold a 32-byte key: expected 64 hex characters or base64 of 32 \
         bytes{raw} (it holds {} bytes)",
        bytes.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_encodings() {
        let k = [7u8; 32];
        let h = hex::encode(k);
        assert_eq!(*parse_key(h.as_bytes(), false, "t").unwrap(), k);
        assert_eq!(
            *parse_key(format!("{h}\n").as_bytes(), false, "t").unwrap(),
            k
        );
        let b = B64.encode(k);
        assert_eq!(*parse_key(b.as_bytes(), false, "t").unwrap(), k);
        assert_eq!(
            *parse_key(b.trim_end_matches('=').as_bytes(), false, "t").unwrap(),
            k
        );
        assert_eq!(*parse_key(&k, true, "t").unwrap(), k);
        assert!(parse_key(&k, false, "t").is_err());
        assert!(parse_key(b"short", true, "t").is_err());
        assert!(parse_key(&[b'a'; 63], true, "t").is_err());
        let b31 = B64.encode([1u8; 31]);
        assert!(parse_key(b31.as_bytes(), false, "t").is_err());
    }

    #[test]
    fn bad_key_message_has_no_value() {
        let secretish = "zz".repeat(32);
        let e = parse_key(secretish.as_bytes(), false, "environment variable X").unwrap_err();
        assert!(!e.to_string().contains(&secretish));
    }
}
