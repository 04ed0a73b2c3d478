//! [`KeyStoreError`]: every error names the file or key it is about and says what to do.
//!
//! No message ever contains key bytes, a passphrase, or the value of an environment
//! variable or credential: only paths, variable names, key ids and lengths.

use std::path::{Path, PathBuf};

use crate::{KeyId, KeyKind};

/// Everything that can go wrong in the key store.
///
/// Errors of [`KeyStore::open`](crate::KeyStore::open) are unseal failures: the server
/// writes them to its audit log (with [`KeyStoreError::code`]) and refuses to start.
/// No variant holds secret material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    /// The authenticated decryption failed: the passphrase or key is not the one the
    /// store was sealed with, or some byte of the file (header or body) was changed.
    #[error(
        "cannot unseal {}: wrong passphrase/key, or the file was modified \
         (restore it from a backup if the key is right)",
        path.display()
    )]
    WrongKeyOrTampered {
        /// The key store file.
        path: PathBuf,
    },
    /// The file is shorter than its header says it is.
    #[error(
        "{} is truncated: {len} bytes, at least {needed} expected (an interrupted copy? \
         restore it from a backup)",
        path.display()
    )]
    Truncated {
        /// The key store file.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// The length its header (or the format) requires.
        needed: usize,
    },
    /// The file does not start with the key store magic `HPKS1\n`.
    #[error("{} is not a halfpipe key store (it does not start with HPKS1)", path.display())]
    NotAKeyStore {
        /// The file.
        path: PathBuf,
    },
    /// The file is a key store of a format version this build does not read.
    #[error(
        "{} is a key store of format version {version}; this build reads version {}",
        path.display(),
        crate::format::FORMAT_VERSION
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version byte found.
        version: u8,
    },
    /// A header field has a value no writer produces (unknown sealer kind or AEAD,
    /// non-zero reserved bytes, trailing bytes, an inconsistent payload).
    #[error("{} is malformed: {what} (the file was modified or is damaged)", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Argon2id parameters outside the accepted range, refused before any memory is
    /// allocated for them (a hostile header cannot make the server allocate 4 GiB).
    #[error("Argon2id parameters out of range{}: {what}", at(path.as_deref()))]
    ParamsOutOfRange {
        /// The file whose header held them, if any.
        path: Option<PathBuf>,
        /// Which parameter and its accepted range.
        what: String,
    },
    /// A file holding a secret (key file, passphrase file, credential, the store) can be
    /// read or written by group or others.
    #[error(
        "{} has mode {mode:03o}: group and others must have no access; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// An I/O error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The store already exists: [`KeyStore::create`](crate::KeyStore::create) never
    /// replaces a file.
    #[error("{} already exists: open it instead, or move it away first", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The sealer spec or its source is unusable (unset variable, malformed key file …).
    #[error("key store sealer: {0}")]
    BadSealer(String),
    /// The store was sealed with another kind of sealer than the one given.
    #[error(
        "{} is sealed with a {file}, but a {given} was given",
        path.display()
    )]
    SealerMismatch {
        /// The file.
        path: PathBuf,
        /// The kind of sealer its header names.
        file: &'static str,
        /// The kind of sealer given.
        given: &'static str,
    },
    /// No key with this id in the store.
    #[error("no key {0} in the key store")]
    UnknownKey(KeyId),
    /// The key is revoked: its secret has been wiped.
    #[error("key {0} is revoked")]
    KeyRevoked(KeyId),
    /// The operation does not apply to keys of this kind.
    #[error("key {id} is a {kind} key; this needs a {expected} key")]
    WrongKind {
        /// The key.
        id: KeyId,
        /// Its kind.
        kind: KeyKind,
        /// The kind the operation needs.
        expected: &'static str,
    },
    /// The key is retiring, not active: only an active key can be rotated.
    #[error("key {0} is not active (it is retiring): rotate the active key instead")]
    NotActive(KeyId),
    /// No active key of this kind (and label) to rotate.
    #[error("no active {kind} key{} to rotate: generate one first", label_suffix(label.as_deref()))]
    NoActiveKey {
        /// The kind.
        kind: KeyKind,
        /// The label, for user keys.
        label: Option<String>,
    },
    /// An active key of this kind (and label) exists already: rotate it instead.
    #[error("{id} is already the active {kind} key: rotate it instead of generating another")]
    AlreadyActive {
        /// The active key.
        id: KeyId,
        /// Its kind.
        kind: KeyKind,
    },
    /// Text that should name a key id or kind does not.
    #[error("{0}")]
    BadKeyId(String),
    /// A label is missing, not allowed, or not acceptable.
    #[error("key label: {0}")]
    BadLabel(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

fn at(path: Option<&Path>) -> String {
    match path {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

fn label_suffix(label: Option<&str>) -> String {
    match label {
        Some(l) => format!(" labelled {l:?}"),
        None => String::new(),
    }
}

impl KeyStoreError {
    /// A short stable code for audit records and metrics, e.g. `"wrong_key_or_tampered"`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::WrongKeyOrTampered { .. } => "wrong_key_or_tampered",
            Self::Truncated { .. } => "truncated",
            Self::NotAKeyStore { .. } => "not_a_key_store",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::Malformed { .. } => "malformed",
            Self::ParamsOutOfRange { .. } => "params_out_of_range",
            Self::Permissions { .. } => "permissions",
            Self::Io { .. } => "io",
            Self::Exists { .. } => "exists",
            Self::BadSealer(_) => "bad_sealer",
            Self::SealerMismatch { .. } => "sealer_mismatch",
            Self::UnknownKey(_) => "unknown_key",
            Self::KeyRevoked(_) => "key_revoked",
            Self::WrongKind { .. } => "wrong_kind",
            Self::NotActive(_) => "not_active",
            Self::NoActiveKey { .. } => "no_active_key",
            Self::AlreadyActive { .. } => "already_active",
            Self::BadKeyId(_) => "bad_key_id",
            Self::BadLabel(_) => "bad_label",
            Self::Random => "random",
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn malformed(path: &Path, what: impl Into<String>) -> Self {
        Self::Malformed {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

/// The key store's result type.
pub type Result<T, E = KeyStoreError> = std::result::Result<T, E>;
