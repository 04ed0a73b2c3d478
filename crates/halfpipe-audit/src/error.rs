//! The crate's error type.

use std::path::PathBuf;

use crate::verify::Finding;

/// Everything that can go wrong when writing, opening or reading an audit log or its key.
///
/// Each message names the file involved and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file operation failed.
    #[error("audit: could not {op} {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("open", "write", "fsync", …).
        op: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// [`crate::AuditKey::write_new`] found a file already at the path.
    #[error(
        "audit key file {path} already exists: refusing to overwrite a signing key \
         (move it away first if you really mean to replace it)"
    )]
    KeyFileExists {
        /// The key file.
        path: PathBuf,
    },
    /// The key file may be read (or written) by group or others.
    #[error(
        "audit key file {path} is accessible by group or others (mode {mode:03o}): \
         run chmod 600 {path}"
    )]
    KeyFilePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error(
        "audit key file {path} does not hold an audit signing key ({reason}); \
         expected one line of 64 hex digits as written by AuditKey::write_new"
    )]
    KeyFileInvalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The existing log does not verify, so nothing is appended to it.
    #[error(
        "audit log {path} does not verify ({} problem(s); first: {}): refusing to append to it. \
         Run `halfpipe log verify` on it, keep it as evidence and move it aside to start a new log",
        findings.len(),
        findings.first().map(|f| f.to_string()).unwrap_or_default()
    )]
    LogCorrupt {
        /// The log.
        path: PathBuf,
        /// Everything verification found.
        findings: Vec<Finding>,
    },
    /// The existing log was started with a different signing key.
    #[error(
        "audit log {path} was started with signing key {log_key}, not with this key ({key}): \
         configure the key the log was started with, or move the log aside to start a new one"
    )]
    KeyMismatch {
        /// The log.
        path: PathBuf,
        /// The key named by the log's genesis record (hex).
        log_key: String,
        /// The key given to [`crate::AuditLog::open`] (hex).
        key: String,
    },
    /// The log exists but its head file does not, so tail truncation could not be ruled out.
    #[error(
        "audit log {log} exists but its head file {head} does not: the log's tail cannot be \
         checked for truncation. Restore the head file, or run `halfpipe log verify` on the log, \
         keep it as evidence and move it aside to start a new one"
    )]
    HeadFileMissing {
        /// The log.
        log: PathBuf,
        /// The missing head file.
        head: PathBuf,
    },
    /// The head file exists but the log does not: the log was deleted or moved.
    #[error(
        "audit head file {head} exists but its log {log} does not: the log was deleted or moved. \
         Restore it, or move the head file aside to start a new log"
    )]
    LogMissing {
        /// The missing log.
        log: PathBuf,
        /// The head file.
        head: PathBuf,
    },
    /// A record kind the writer does not accept.
    #[error("audit: invalid record kind {kind:?}: {reason}")]
    InvalidKind {
        /// The kind given.
        kind: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A field name the writer does not accept.
    #[error("audit: invalid field name {name:?} in a {kind:?} record: {reason}")]
    InvalidField {
        /// The record's kind.
        kind: String,
        /// The field name given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A record would exceed [`crate::MAX_LINE_BYTES`] once encoded.
    #[error(
        "audit: a {kind:?} record would take {bytes} bytes, more than the limit of {limit}: \
         shorten its field values"
    )]
    RecordTooLarge {
        /// The record's kind.
        kind: String,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// An earlier write failed; the log's end is in an unknown state.
    #[error(
        "audit log {path}: an earlier write failed ({reason}), so it accepts no more records; \
         fix the cause and restart, which re-verifies the log"
    )]
    Poisoned {
        /// The log.
        path: PathBuf,
        /// The first failure.
        reason: String,
    },
    /// The writer thread's queue is full: records come faster than they can be made durable.
    #[error(
        "audit: the writer's queue is full ({capacity} records waiting): the record was not \
         written (the disk is too slow or stalled)"
    )]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The writer thread failed earlier; no record is accepted any more.
    #[error("audit: the log writer failed ({reason}); no more records are accepted")]
    WriterFailed {
        /// The failure that stopped the writer.
        reason: String,
    },
    /// The writer thread was shut down.
    #[error("audit: the log writer was shut down; no more records are accepted")]
    WriterClosed,
    /// The writer thread panicked (a bug).
    #[error("audit: the log writer thread panicked; the log's end must be re-verified")]
    WriterPanicked,
    /// The writer thread could not be started (the handle is failed from the start).
    #[error("audit: could not start the log writer thread: {0}")]
    Spawn(std::io::Error),
    /// [`crate::tail`] found a line it cannot read.
    #[error("audit log {path}: {reason}; run `halfpipe log verify` on it to see what is wrong")]
    TailUnreadable {
        /// The log.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A record could not be encoded (cannot happen with string fields; kept for safety).
    #[error("audit: could not encode a record: {0}")]
    Encode(String),
}

impl AuditError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        AuditError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}
