//! Tamper-evident, append-only audit log of halfpipe.
//!
//! Every record is chained to the one before it by SHA-256 over a canonical encoding of all
//! its fields; every so often an Ed25519-signed checkpoint (record count, head hash, time)
//! is appended to the chain, and the latest one is also kept in a separate *head file*. The
//! signing key ([`AuditKey`]) lives apart from the log, so whoever can edit the log cannot
//! re-sign it. [`verify`] rebuilds the chain and names every way it was tampered with.
//!
//! # Writing
//!
//! [`AuditLog::open`] creates a log (mode 0600) with a genesis record naming the public key,
//! and a first checkpoint; or verifies an existing log fully — refusing to append to one that
//! does not verify (a torn last line after a crash included) or that was started with another
//! key — and continues its chain. [`AuditLog::append`] writes and fdatasyncs each record;
//! checkpoints are written after [`CheckpointPolicy::every_records`] records, by
//! [`AuditLog::checkpoint_if_due`] once [`CheckpointPolicy::every`] has passed, and by
//! [`AuditLog::close`]. Each checkpoint is made durable in the log first, then the head file
//! is replaced atomically (write `<head>.tmp`, fsync, rename, fsync the directory). Any failed
//! write poisons the log: it accepts nothing more until reopened (and so re-verified). An
//! existing log whose head file is missing is refused (its tail could have been cut), as is
//! a head file whose log is missing; an empty log with no head file (a crash right after
//! creation) is initialized. One writer per log at a time; readers ([`tail`], [`verify`])
//! may run beside it, in any process: an advisory lock on the log makes them wait for a
//! batch being appended instead of reading half of it.
//!
//! [`AuditWriter::spawn`] moves the log to a thread; [`AuditHandle::record`] queues a record
//! without blocking (a full queue or a failed writer is an error) and the thread writes
//! batches with one fdatasync each.
//!
//! ```
//! use std::time::Duration;
//! use halfpipe_audit::{kinds, now_ms, verify, AuditKey, AuditLog, AuditWriter, CheckpointPolicy};
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let (log_path, head_path) = (dir.path().join("audit.log"), dir.path().join("audit.head"));
//! let key = AuditKey::generate();
//! let public = key.public_bytes();
//! let policy = CheckpointPolicy { every_records: 256, every: Duration::from_secs(30) };
//! let mut log = AuditLog::open(&log_path, &head_path, key, policy)?;
//! log.append(kinds::SESSION_OPENED, &[("user", "alice".into())], now_ms())?;
//!
//! let handle = AuditWriter::spawn(log, 1024, Box::new(|e| eprintln!("audit failed: {e}")));
//! handle.record(kinds::SESSION_CLOSED, vec![("user".into(), "alice".into()), ("bytes".into(), "4096".into())])?;
//! handle.shutdown()?; // drains the queue, writes the final checkpoint
//!
//! let report = verify(&log_path, Some(&head_path), Some(public));
//! assert!(report.is_ok(), "{report}");
//! assert_eq!(report.unsigned_tail, 0);
//! # Ok::<(), halfpipe_audit::AuditError>(())
//! ```
//!
//! # File format
//!
//! The log is JSON lines, one record per line, each line ending in `\n`, in exactly the form
//! [`Record::to_json_line`] produces (keys in this order, no spaces, fields sorted by name):
//!
//! ```text
//! {"seq":0,"time_ms":1700000000000,"kind":"genesis","fields":{"key":"<64 hex>","version":"halfpipe-audit/1"},"prev":"000…000","hash":"<64 hex>"}
//! {"seq":1,"time_ms":1700000000000,"kind":"checkpoint","fields":{"count":"1","head":"<hash of record 0>","signature":"<128 hex>"},"prev":"<hash of record 0>","hash":"<64 hex>"}
//! {"seq":2,"time_ms":1700000000123,"kind":"session_opened","fields":{"peer":"192.0.2.7:4711","user":"alice"},"prev":"<hash of record 1>","hash":"<64 hex>"}
//! ```
//!
//! - `seq` counts from 0; `time_ms` is milliseconds since the Unix epoch; `kind` is 1–64
//!   bytes of ASCII letters, digits, `_`, `-`, `.` (`genesis` and `checkpoint` are reserved,
//!   see [`kinds`] for the server's); `fields` maps such names to arbitrary strings.
//! - `prev` is the previous record's `hash` (all zeros for record 0); `hash` is SHA-256 of
//!   the record's canonical encoding — *not* of the JSON text. Every integer is 8 bytes
//!   big-endian, every string is preceded by its length as 8 bytes big-endian:
//!
//!   `lp("halfpipe-audit record v1") ‖ seq ‖ time_ms ‖ lp(kind) ‖ number of fields ‖
//!   (lp(name) ‖ lp(value))` for each field in byte order of names `‖ prev` (32 raw bytes).
//! - Record 0 is the **genesis** record: kind `genesis`, fields exactly `key` (the Ed25519
//!   public key that signs this log's checkpoints, lowercase hex) and `version`.
//! - A **checkpoint** record `c` has fields exactly `count` (decimal, equal to `c`: the number
//!   of records before it), `head` (the hash of record `c - 1`, equal to its `prev`) and
//!   `signature`: Ed25519 over `lp("halfpipe-audit checkpoint v1") ‖ count ‖ head ‖ time_ms`
//!   (the checkpoint record's own `time_ms`). Everything in a checkpoint record is thus
//!   determined by what it signs, so a valid checkpoint vouches for records `0..=c`.
//! - The **head file** holds one line: a copy of the latest checkpoint record.
//! - Lines are at most [`MAX_LINE_BYTES`]; the key file is one line of 64 hex digits (the
//!   Ed25519 secret), mode 0600.
//!
//! # Verification
//!
//! [`verify`] parses every line, then walks the chain from the genesis record following the
//! hash links (`prev` = previous `hash`), falling back to `seq` numbers where a link is
//! broken, and skipping gaps. Records the walk does not reach were inserted; records the
//! walk reaches out of file order were reordered. Checkpoints are checked against the key
//! given as `expected_key`, else against the key the genesis record names. It keeps going
//! after a problem where it sensibly can, and never panics.
//!
//! | [`Finding`] | meaning |
//! | --- | --- |
//! | `LogUnreadable` | the log could not be opened or read |
//! | `Empty` | the file is empty: no genesis record |
//! | `Malformed` | a line (by number) is not a record: not JSON, wrong keys, duplicate keys, bad hex, too long, empty |
//! | `TornLine` | the last line has no newline: the file was cut mid-record (a crash during a write, or truncation) |
//! | `Edited` | a record's content does not match its hash: it was edited |
//! | `NonCanonical` | a line matches its hash but is not the writer's exact text (reformatted or re-escaped) |
//! | `ChainBroken` | a record's `prev` is not the hash of the record before it: one of them was edited and re-hashed, or replaced |
//! | `WrongSeq` | the record linked after record `n` by hash does not carry seq `n + 1` |
//! | `Inserted` | a record that is not part of the chain (a duplicate seq, a copy, a fabricated record) |
//! | `Deleted` | seqs missing from the middle of the chain |
//! | `Reordered` | a record appears in the file before the record it follows in the chain |
//! | `HeadTruncated` | the log does not start with record 0: its beginning was cut off |
//! | `GenesisInvalid` | record 0 is not a well-formed genesis record |
//! | `MisplacedGenesis` | a record other than 0 claims to be a genesis record |
//! | `GenesisKeyMismatch` | the genesis record names another key than `expected_key`: the log was replaced or started with another key |
//! | `ExpectedKeyInvalid` | `expected_key` is not an Ed25519 public key |
//! | `CheckpointMalformed` | a checkpoint record's fields are not a valid checkpoint |
//! | `CheckpointForged` | a checkpoint's signature does not verify under the trusted key: forged, or signed with another key |
//! | `CheckpointHeadMismatch` | a validly signed checkpoint's head hash is not the hash of the record before it: records before it were changed and the chain re-hashed |
//! | `HeadFileUnreadable` | the head file is missing or cannot be read |
//! | `HeadFileInvalid` | the head file does not hold a well-formed checkpoint record |
//! | `HeadFileForged` | the head file's checkpoint signature does not verify |
//! | `TailTruncated` | the log has fewer records than the head file's checkpoint covers: its tail was cut off |
//! | `HeadFileMismatch` | the log's record at the head file's checkpoint is a different record: the log was rewritten after it |
//!
//! Not failures, reported as [`Notice`]s: the *unsigned tail* (records after the last valid
//! checkpoint, which nothing signs yet — normal while the writer runs; a cleanly closed log
//! has none), no key known, and a head file older than the log's last checkpoint (the writer
//! stopped between the two writes). Verifying a log while its writer runs may catch the last
//! line half-written (reported as `TornLine`); verify again.
//!
//! What is out of reach by design: records after the last checkpoint are protected by the
//! hash chain only, so an attacker can rewrite, append to or cut off that unsigned tail (but
//! not cut the log back past the head file's checkpoint, nor forge a later one); a log
//! verified without its head file can be cut back to any checkpoint; and anyone holding the
//! signing key can rewrite everything (give `expected_key` so a log re-signed with another
//! key is caught).
//!
//! # Keys
//!
//! [`AuditKey`] wraps the Ed25519 signing key: zeroized on drop, never printed (`Debug` shows
//! the public key), written with mode 0600 by [`AuditKey::write_new`] (which refuses to
//! overwrite) and refused by [`AuditKey::load`] when group or others can access the file.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod key;
mod live;
mod log;
mod record;
mod tail;
mod verify;
mod writer;

pub use error::AuditError;
pub use key::AuditKey;
pub use log::{now_ms, AuditLog, CheckpointPolicy, LineSink, NewRecord};
pub use record::{
    kinds, Record, CHECKPOINT_KIND, FORMAT_VERSION, GENESIS_KIND, MAX_LINE_BYTES, MAX_NAME_BYTES,
};
pub use tail::tail;
pub use verify::{verify, verify_bytes, Finding, Notice, Report};
pub use writer::{AuditHandle, AuditWriter, FailureHook};

#[cfg(test)]
mod testing {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use crate::{AuditKey, AuditLog, CheckpointPolicy};

    /// A new log `audit.log` (head file `audit.head`) in `dir`, signed by a fresh key, with
    /// a checkpoint every `every_records` records (0: none by count) and hourly; returns it,
    /// its two paths and the public key.
    pub(crate) fn open_log(
        dir: &Path,
        every_records: u64,
    ) -> (AuditLog, PathBuf, PathBuf, [u8; 32]) {
        let log_path = dir.join("audit.log");
        let head_path = dir.join("audit.head");
        let key = AuditKey::generate();
        let public = key.public_bytes();
        let policy = CheckpointPolicy {
            every_records,
            every: Duration::from_secs(3600),
        };
        let log = AuditLog::open(&log_path, &head_path, key, policy).expect("open a new log");
        (log, log_path, head_path, public)
    }
}
