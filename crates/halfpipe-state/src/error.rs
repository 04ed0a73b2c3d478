//! Errors: every one names the file it is about and, where there is one, what to do.

use std::path::{Path, PathBuf};

/// A problem with the state database, the pepper file, or a request to change state.
///
/// Every variant that concerns a file carries its path; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be created, opened, read or written.
    #[error("{path}: {action}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done, with advice where there is one.
        action: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another process (or another handle in this one) holds the database open.
    #[error("{path}: the state database is already open (is another halfpipe server running on it?); stop that server or give this one its own state file")]
    AlreadyOpen {
        /// The database file.
        path: PathBuf,
    },
    /// The database file is not a redb database, or redb found it damaged.
    #[error("{path}: the state database is corrupt or not a state database ({detail}); refusing to run on it (fail closed): restore it from a backup, or move it aside to start with empty state (bans, tokens, runtime users and budgets are then lost)")]
    CorruptFile {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        detail: String,
    },
    /// A stored value (or key) does not decode: the file was damaged or written by an
    /// incompatible version. Refused, never guessed at.
    #[error("{path}: table {table}, key {key:?}: the stored value does not decode; refusing it (fail closed): restore the database from a backup, or move it aside to start with empty state")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// The key (lossily decoded if it is not UTF-8).
        key: String,
    },
    /// The database was written by a version of halfpipe with another schema.
    #[error("{path}: state database schema {found}, but this build understands schema {supported}; run the halfpipe version that wrote it, or move the file aside to start with empty state")]
    Schema {
        /// The database file.
        path: PathBuf,
        /// The schema found in the file.
        found: u64,
        /// The schema this build writes.
        supported: u64,
    },
    /// redb refused an operation on an open database (other than corruption).
    #[error("{path}: {action}: {detail}")]
    Storage {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// What redb reported.
        detail: String,
    },
    /// The pepper file may be read by group or others.
    #[error("{path}: the token pepper is readable by group or others (mode {mode:o}); run: chmod 600 {path}")]
    PepperPermissions {
        /// The pepper file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The pepper file does not hold exactly 32 bytes.
    #[error("{path}: the token pepper has {len} bytes, expected exactly 32; this is not a pepper file (restore the right one: a new pepper invalidates every token)")]
    PepperLength {
        /// The pepper file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// An argument was refused (a bad name, an expiry in the past, …).
    #[error("{what}: {reason}")]
    Invalid {
        /// What was refused.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A user with this name already exists.
    #[error("user {name:?} already exists; remove it first or choose another name")]
    UserNameTaken {
        /// The name.
        name: String,
    },
    /// The public key already belongs to another user.
    #[error("this public key already belongs to user {existing:?}; one key identifies one user")]
    UserKeyTaken {
        /// The user holding the key.
        existing: String,
    },
    /// No user has this name.
    #[error("no user named {name:?} (list users to see the names)")]
    UnknownUser {
        /// The name.
        name: String,
    },
    /// No token has this id.
    #[error("no token with id {id:?} (list tokens to see the ids)")]
    UnknownToken {
        /// The id.
        id: String,
    },
}

/// Maps any redb error to a [`StateError`] naming the file: corruption becomes
/// [`StateError::CorruptFile`], a held lock [`StateError::AlreadyOpen`].
pub(crate) fn redb_error(
    path: &Path,
    action: &'static str,
    e: impl Into<redb::Error>,
) -> StateError {
    let path = path.to_owned();
    match e.into() {
        redb::Error::Corrupted(detail) => StateError::CorruptFile { path, detail },
        redb::Error::DatabaseAlreadyOpen => StateError::AlreadyOpen { path },
        // redb reports a wrong magic number as InvalidData.
        redb::Error::Io(source) if source.kind() == std::io::ErrorKind::InvalidData => {
            StateError::CorruptFile {
                path,
                detail: format!("not a redb database: {source}"),
            }
        }
        redb::Error::Io(source) => StateError::Io {
            path,
            action,
            source,
        },
        redb::Error::UpgradeRequired(v) => StateError::CorruptFile {
            path,
            detail: format!("unsupported redb file format {v}"),
        },
        other => StateError::Storage {
            path,
            action,
            detail: other.to_string(),
        },
    }
}
