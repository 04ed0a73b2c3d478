//! The synchronous writer: appends records, makes checkpoints, keeps the head file.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::AuditError;
use crate::key::AuditKey;
use crate::live::AppendLock;
use crate::record::{
    check_new_record, checkpoint_message, genesis_record, Record, CHECKPOINT_KIND, MAX_LINE_BYTES,
};
use crate::verify::{analyze, Finding};

/// When the writer makes a checkpoint (besides at [`AuditLog::close`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// After this many records since the last checkpoint (0: never by count).
    pub every_records: u64,
    /// When this much time has passed since the last checkpoint and records were added
    /// (checked by [`AuditLog::checkpoint_if_due`]; the threaded writer checks at least this
    /// often).
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    /// Every 256 records or 30 seconds.
    fn default() -> Self {
        CheckpointPolicy {
            every_records: 256,
            every: Duration::from_secs(30),
        }
    }
}

/// A record to append with [`AuditLog::append_batch`] (and what the threaded writer queues).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// The record's kind.
    pub kind: String,
    /// Its fields (names must be distinct).
    pub fields: Vec<(String, String)>,
    /// Its time in milliseconds since the Unix epoch.
    pub time_ms: u64,
}

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(u64::MAX as u128) as u64)
        .unwrap_or(0)
}

/// An open audit log, ready to append to. One writer per log: do not open the same log
/// twice at once.
pub struct AuditLog {
    path: PathBuf,
    head_path: PathBuf,
    file: File,
    key: AuditKey,
    policy: CheckpointPolicy,
    next_seq: u64,
    head: [u8; 32],
    since_checkpoint: u64,
    last_checkpoint: Instant,
    poisoned: Option<String>,
    sink: Option<LineSink>,
    #[cfg(test)]
    pub(crate) hooks: hooks::Hooks,
}

/// Called with every line once it is durably written (after its fdatasync), in order:
/// for forwarding copies elsewhere (e.g. a remote syslog). It must not block.
pub type LineSink = Box<dyn FnMut(&str) + Send>;

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("head_path", &self.head_path)
            .field("key", &self.key)
            .field("next_seq", &self.next_seq)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// Fsyncs the directory holding `path`, so that a create or rename in it is durable.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<(), AuditError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuditError::io(dir, "fsync directory", e))
}

/// The temporary file the head file is written to before it is renamed into place.
pub(crate) fn head_tmp_path(head_path: &Path) -> PathBuf {
    let mut name = head_path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Atomically replaces the head file with `line`: write a temporary file, fsync, rename,
/// fsync the directory.
fn write_head_file(head_path: &Path, line: &str) -> Result<(), AuditError> {
    let tmp = head_tmp_path(head_path);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(AuditError::io(&tmp, "remove stale", e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| AuditError::io(&tmp, "create", e))?;
    f.write_all(line.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .map_err(|e| AuditError::io(&tmp, "write", e))?;
    f.sync_all().map_err(|e| AuditError::io(&tmp, "fsync", e))?;
    drop(f);
    fs::rename(&tmp, head_path).map_err(|e| AuditError::io(head_path, "rename into place", e))?;
    sync_parent_dir(head_path)
}

impl AuditLog {
    /// Opens the log at `log_path` for appending, creating it (mode 0600, with a genesis
    /// record naming `key` and a first checkpoint) if it does not exist.
    ///
    /// An existing log is verified in full first — against `head_path` and with `key` as the
    /// expected key — and refused ([`AuditError::LogCorrupt`], [`AuditError::KeyMismatch`])
    /// if it does not verify; otherwise the chain continues from its last record.
    pub fn open(
        log_path: &Path,
        head_path: &Path,
        key: AuditKey,
        policy: CheckpointPolicy,
    ) -> Result<AuditLog, AuditError> {
        let head_exists = head_path
            .try_exists()
            .map_err(|e| AuditError::io(head_path, "stat", e))?;
        let file = OpenOptions::new().read(true).append(true).open(log_path);
        match file {
            Ok(file) => {
                let len = file
                    .metadata()
                    .map_err(|e| AuditError::io(log_path, "stat", e))?
                    .len();
                if len == 0 && !head_exists {
                    // Created, then stopped before anything was written: nothing to lose.
                    return Self::init(log_path, head_path, file, key, policy);
                }
                Self::open_existing(log_path, head_path, head_exists, file, key, policy)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if head_exists {
                    return Err(AuditError::LogMissing {
                        log: log_path.to_owned(),
                        head: head_path.to_owned(),
                    });
                }
                Self::create(log_path, head_path, key, policy)
            }
            Err(e) => Err(AuditError::io(log_path, "open", e)),
        }
    }

    fn create(
        log_path: &Path,
        head_path: &Path,
        key: AuditKey,
        policy: CheckpointPolicy,
    ) -> Result<AuditLog, AuditError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(log_path)
            .map_err(|e| AuditError::io(log_path, "create", e))?;
        sync_parent_dir(log_path)?;
        Self::init(log_path, head_path, file, key, policy)
    }

    /// Writes the genesis record and the first checkpoint to an empty log.
    fn init(
        log_path: &Path,
        head_path: &Path,
        file: File,
        key: AuditKey,
        policy: CheckpointPolicy,
    ) -> Result<AuditLog, AuditError> {
        let time = now_ms();
        let genesis = genesis_record(&key.public_bytes(), time);
        let mut log = AuditLog {
            path: log_path.to_owned(),
            head_path: head_path.to_owned(),
            file,
            key,
            policy,
            next_seq: 1,
            head: genesis.hash,
            since_checkpoint: 1,
            last_checkpoint: Instant::now(),
            poisoned: None,
            sink: None,
            #[cfg(test)]
            hooks: hooks::Hooks::default(),
        };
        let mut buf = genesis.to_json_line()?;
        buf.push('\n');
        let cp = log.push_checkpoint(&mut buf, time)?;
        log.write_out(&buf, Some(&cp))?;
        Ok(log)
    }

    fn open_existing(
        log_path: &Path,
        head_path: &Path,
        head_exists: bool,
        file: File,
        key: AuditKey,
        policy: CheckpointPolicy,
    ) -> Result<AuditLog, AuditError> {
        let head = if head_exists {
            Some(fs::read(head_path).map_err(|e| format!("{}: {e}", head_path.display())))
        } else {
            None
        };
        let analysis = analyze(BufReader::new(&file), head, Some(key.public_bytes()));
        let report = analysis.report;
        let genesis_edited = report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::Edited { seq: 0, .. }));
        if let (Some(found), false) = (report.genesis_key, genesis_edited) {
            if found != key.public_bytes() {
                return Err(AuditError::KeyMismatch {
                    path: log_path.to_owned(),
                    log_key: hex::encode(found),
                    key: key.public_hex(),
                });
            }
        }
        if !report.is_ok() {
            return Err(AuditError::LogCorrupt {
                path: log_path.to_owned(),
                findings: report.findings,
            });
        }
        let Some((last_seq, last_hash)) = analysis.last else {
            // A log that verifies has a genesis record; this cannot happen.
            return Err(AuditError::LogCorrupt {
                path: log_path.to_owned(),
                findings: vec![Finding::Empty],
            });
        };
        // Without a head file the tail cannot be checked: refuse. (Even a log holding only
        // what `create` writes is refused: accepting it would let whoever deletes the head
        // file cut the log back to its first checkpoint unnoticed.)
        if !head_exists {
            return Err(AuditError::HeadFileMissing {
                log: log_path.to_owned(),
                head: head_path.to_owned(),
            });
        }
        let next_seq = last_seq
            .checked_add(1)
            .ok_or(AuditError::Encode("the log is full (seq overflow)".into()))?;
        let log = AuditLog {
            path: log_path.to_owned(),
            head_path: head_path.to_owned(),
            file,
            key,
            policy,
            next_seq,
            head: last_hash,
            since_checkpoint: report.unsigned_tail,
            last_checkpoint: Instant::now(),
            poisoned: None,
            sink: None,
            #[cfg(test)]
            hooks: hooks::Hooks::default(),
        };
        Ok(log)
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The head file's path.
    pub fn head_path(&self) -> &Path {
        &self.head_path
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The hash of the last record written.
    pub fn head_hash(&self) -> [u8; 32] {
        self.head
    }

    /// Records written since the last checkpoint.
    pub fn unsigned_records(&self) -> u64 {
        self.since_checkpoint
    }

    /// The signing key's public half (hex).
    pub fn public_hex(&self) -> String {
        self.key.public_hex()
    }

    /// The checkpoint policy.
    pub fn policy(&self) -> CheckpointPolicy {
        self.policy
    }

    /// When a time-based checkpoint falls due (if records are added by then); `None`: never
    /// (`every` is too large to add to an `Instant`).
    pub(crate) fn next_time_checkpoint(&self) -> Option<Instant> {
        self.last_checkpoint.checked_add(self.policy.every)
    }

    /// Appends one record, fdatasync'd before returning its seq; writes a checkpoint after
    /// it when [`CheckpointPolicy::every_records`] is reached.
    pub fn append(
        &mut self,
        kind: &str,
        fields: &[(&str, String)],
        time_ms: u64,
    ) -> Result<u64, AuditError> {
        let map = check_new_record(kind, fields.iter().map(|(k, v)| (*k, v.as_str())))?;
        let mut seqs = self.append_maps(vec![(kind, map, time_ms)])?;
        seqs.pop()
            .ok_or(AuditError::Encode("no record was written".into()))
    }

    /// Appends several records with a single write and fdatasync; returns their seqs. Either
    /// all are checked and written or none is (a write error poisons the log).
    pub fn append_batch(&mut self, batch: &[NewRecord]) -> Result<Vec<u64>, AuditError> {
        let mut checked = Vec::with_capacity(batch.len());
        for r in batch {
            let map = check_new_record(
                &r.kind,
                r.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )?;
            checked.push((r.kind.as_str(), map, r.time_ms));
        }
        self.append_maps(checked)
    }

    fn check_poisoned(&self) -> Result<(), AuditError> {
        match &self.poisoned {
            Some(reason) => Err(AuditError::Poisoned {
                path: self.path.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn append_maps(
        &mut self,
        records: Vec<(&str, BTreeMap<String, String>, u64)>,
    ) -> Result<Vec<u64>, AuditError> {
        self.check_poisoned()?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (saved_seq, saved_head, saved_since) =
            (self.next_seq, self.head, self.since_checkpoint);
        let mut buf = String::new();
        let mut seqs = Vec::with_capacity(records.len());
        let mut checkpoint = None;
        let mut result = Ok(());
        for (kind, fields, time_ms) in records {
            let rec = Record::new(self.next_seq, time_ms, kind.to_owned(), fields, self.head);
            match self.push_record(&mut buf, &rec) {
                Ok(()) => seqs.push(rec.seq),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if self.policy.every_records > 0 && self.since_checkpoint >= self.policy.every_records {
                match self.push_checkpoint(&mut buf, time_ms) {
                    Ok(cp) => checkpoint = Some(cp),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        if let Err(e) = result {
            // Nothing was written: undo the in-memory advance.
            (self.next_seq, self.head, self.since_checkpoint) =
                (saved_seq, saved_head, saved_since);
            return Err(e);
        }
        self.write_out(&buf, checkpoint.as_deref())?;
        Ok(seqs)
    }

    /// Encodes `rec` onto `buf` and advances the chain (in memory only).
    fn push_record(&mut self, buf: &mut String, rec: &Record) -> Result<(), AuditError> {
        let line = rec.to_json_line()?;
        if line.len() > MAX_LINE_BYTES {
            return Err(AuditError::RecordTooLarge {
                kind: rec.kind.clone(),
                bytes: line.len(),
                limit: MAX_LINE_BYTES,
            });
        }
        buf.push_str(&line);
        buf.push('\n');
        self.next_seq = self
            .next_seq
            .checked_add(1)
            .ok_or(AuditError::Encode("the log is full (seq overflow)".into()))?;
        self.head = rec.hash;
        self.since_checkpoint += 1;
        Ok(())
    }

    /// Encodes a checkpoint of everything so far onto `buf`; returns its line.
    fn push_checkpoint(&mut self, buf: &mut String, time_ms: u64) -> Result<String, AuditError> {
        let count = self.next_seq;
        let sig = self
            .key
            .sign(&checkpoint_message(count, &self.head, time_ms));
        let mut fields = BTreeMap::new();
        fields.insert("count".to_owned(), count.to_string());
        fields.insert("head".to_owned(), hex::encode(self.head));
        fields.insert("signature".to_owned(), hex::encode(sig));
        let rec = Record::new(
            count,
            time_ms,
            CHECKPOINT_KIND.to_owned(),
            fields,
            self.head,
        );
        let line = rec.to_json_line()?;
        self.push_record(buf, &rec)?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(line)
    }

    /// Writes `buf`, fdatasyncs, then replaces the head file with `checkpoint` if given.
    /// Any failure poisons the log.
    fn write_out(&mut self, buf: &str, checkpoint: Option<&str>) -> Result<(), AuditError> {
        let result = self.write_out_inner(buf, checkpoint);
        match &result {
            Err(e) => self.poisoned = Some(e.to_string()),
            Ok(()) => {
                if let Some(sink) = &mut self.sink {
                    buf.lines().for_each(&mut **sink);
                }
            }
        }
        result
    }

    /// Sets the function that receives every line after it is durably written.
    pub fn set_sink(&mut self, sink: LineSink) {
        self.sink = Some(sink);
    }

    fn write_out_inner(&mut self, buf: &str, checkpoint: Option<&str>) -> Result<(), AuditError> {
        {
            let _whole = AppendLock::take(&self.file);
            #[cfg(test)]
            self.hooks.before_write(&self.path)?;
            (&self.file)
                .write_all(buf.as_bytes())
                .map_err(|e| AuditError::io(&self.path, "write", e))?;
        }
        self.file
            .sync_data()
            .map_err(|e| AuditError::io(&self.path, "fdatasync", e))?;
        #[cfg(test)]
        self.hooks.after_sync();
        if let Some(line) = checkpoint {
            write_head_file(&self.head_path, line)?;
        }
        Ok(())
    }

    /// Writes a checkpoint now if records were added since the last one.
    pub fn checkpoint(&mut self, time_ms: u64) -> Result<(), AuditError> {
        self.check_poisoned()?;
        if self.since_checkpoint == 0 {
            return Ok(());
        }
        let mut buf = String::new();
        let cp = self.push_checkpoint(&mut buf, time_ms)?;
        self.write_out(&buf, Some(&cp))
    }

    /// Writes a checkpoint if records were added and [`CheckpointPolicy::every`] has passed
    /// since the last checkpoint (as of `now`).
    pub fn checkpoint_if_due(&mut self, now: Instant, time_ms: u64) -> Result<(), AuditError> {
        let due = self.next_time_checkpoint().is_some_and(|t| now >= t);
        if self.since_checkpoint > 0 && due {
            self.checkpoint(time_ms)
        } else {
            self.check_poisoned()
        }
    }

    /// Writes the final checkpoint (if records were added since the last one) and closes
    /// the log.
    pub fn close(mut self, time_ms: u64) -> Result<(), AuditError> {
        self.checkpoint(time_ms)
    }
}

#[cfg(test)]
pub(crate) mod hooks {
    //! Test-only fault injection: a gate that holds the writer before a write, a switch that
    //! makes the next write fail, and a count of fdatasyncs.

    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex};

    use crate::error::AuditError;

    /// A gate the writer waits at; `waiting` says it is there.
    #[derive(Default)]
    pub struct Gate {
        state: Mutex<(bool /* open */, bool /* waiting */)>,
        cond: Condvar,
    }

    impl Gate {
        pub fn wait_until_blocked(&self) {
            let mut s = self.state.lock().unwrap();
            while !s.1 {
                s = self.cond.wait(s).unwrap();
            }
        }
        pub fn open(&self) {
            self.state.lock().unwrap().0 = true;
            self.cond.notify_all();
        }
        fn pass(&self) {
            let mut s = self.state.lock().unwrap();
            s.1 = true;
            self.cond.notify_all();
            while !s.0 {
                s = self.cond.wait(s).unwrap();
            }
            s.1 = false;
        }
    }

    #[derive(Default)]
    pub struct Hooks {
        pub gate: Option<Arc<Gate>>,
        pub fail_writes: Arc<AtomicBool>,
        pub syncs: Arc<AtomicUsize>,
    }

    impl Hooks {
        pub fn before_write(&self, path: &Path) -> Result<(), AuditError> {
            if let Some(g) = &self.gate {
                g.pass();
            }
            if self.fail_writes.load(Ordering::SeqCst) {
                return Err(AuditError::io(
                    path,
                    "write",
                    std::io::Error::other("injected failure"),
                ));
            }
            Ok(())
        }
        pub fn after_sync(&self) {
            self.syncs.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn a_failed_write_poisons_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("a.log");
        let head_path = dir.path().join("a.head");
        let key = || AuditKey::from_secret_bytes(&[5; 32]);
        let mut log =
            AuditLog::open(&log_path, &head_path, key(), CheckpointPolicy::default()).unwrap();
        log.append("tripwire", &[], 1).unwrap();
        log.hooks.fail_writes.store(true, Ordering::SeqCst);
        let e = log.append("tripwire", &[], 2).unwrap_err();
        assert!(matches!(e, AuditError::Io { op: "write", .. }), "{e}");
        log.hooks.fail_writes.store(false, Ordering::SeqCst);
        let e = log.append("tripwire", &[], 3).unwrap_err();
        assert!(matches!(e, AuditError::Poisoned { .. }), "{e}");
        assert!(e.to_string().contains("injected failure"), "{e}");
        assert!(matches!(
            log.checkpoint_if_due(Instant::now(), 4),
            Err(AuditError::Poisoned { .. })
        ));
        assert!(matches!(log.close(5), Err(AuditError::Poisoned { .. })));
        // Nothing of the failed write reached the file: reopening re-verifies the log and
        // continues after the last good record.
        let log =
            AuditLog::open(&log_path, &head_path, key(), CheckpointPolicy::default()).unwrap();
        assert_eq!(log.next_seq(), 3);
        assert_eq!(log.unsigned_records(), 1);
    }
}
