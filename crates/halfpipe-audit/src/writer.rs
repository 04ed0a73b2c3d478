//! The threaded front: a writer thread that owns the [`AuditLog`] and handles that queue
//! records to it without blocking.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::error::AuditError;
use crate::log::{now_ms, AuditLog, NewRecord};
use crate::record::check_new_record;

/// The most records written with one fdatasync.
const MAX_BATCH: usize = 256;

/// What the writer thread calls, once, when a write or fsync fails.
pub type FailureHook = Box<dyn Fn(&AuditError) + Send + Sync>;

enum Msg {
    Record(NewRecord),
    Close,
}

struct Shared {
    /// Set (before the failure hook runs) when the writer failed.
    failed: OnceLock<String>,
    /// True once a close was requested; held for reading while a record is queued, so no
    /// record can be queued after the close message.
    closing: RwLock<bool>,
    thread: Mutex<Option<JoinHandle<Result<(), AuditError>>>>,
    capacity: usize,
    /// Records queued and not yet taken by the writer: the bound. (A `sync_channel` would
    /// enforce it too, but allocates and touches every slot up front: megabytes of
    /// resident memory for a queue that is almost always empty.)
    queued: AtomicUsize,
}

impl Shared {
    /// The writer took a record off the queue.
    fn taken(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Starts the writer thread: see [`AuditWriter::spawn`].
#[derive(Debug)]
pub struct AuditWriter;

impl AuditWriter {
    /// Moves `log` to a new writer thread and returns a handle to queue records to it.
    ///
    /// The queue holds `capacity` records (at least 1). The thread writes whatever is queued
    /// in batches (one write and one fdatasync per batch), makes the log's count- and
    /// time-based checkpoints (waking at least every [`crate::CheckpointPolicy::every`]), and
    /// calls `on_failure` once if a write or fsync fails, after which every
    /// [`AuditHandle::record`] fails. If every handle is dropped without
    /// [`AuditHandle::close`], the thread closes the log itself (final checkpoint).
    ///
    /// If the thread cannot be started, `on_failure` is called at once and the handle
    /// returned is already failed (fail closed: every record is refused).
    pub fn spawn(log: AuditLog, capacity: usize, on_failure: FailureHook) -> AuditHandle {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            failed: OnceLock::new(),
            closing: RwLock::new(false),
            thread: Mutex::new(None),
            capacity,
            queued: AtomicUsize::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        // The hook is shared with this thread in case the writer thread cannot start.
        let on_failure: Arc<dyn Fn(&AuditError) + Send + Sync> = Arc::from(on_failure);
        let thread_hook = Arc::clone(&on_failure);
        let spawned = thread::Builder::new()
            .name("halfpipe-audit".into())
            .spawn(move || run(log, rx, &thread_shared, &*thread_hook));
        match spawned {
            Ok(handle) => {
                if let Ok(mut slot) = shared.thread.lock() {
                    *slot = Some(handle);
                }
            }
            Err(e) => {
                let e = AuditError::Spawn(e);
                if shared.failed.set(e.to_string()).is_ok() {
                    on_failure(&e);
                }
            }
        }
        AuditHandle { tx, shared }
    }
}

fn run(
    mut log: AuditLog,
    rx: Receiver<Msg>,
    shared: &Shared,
    on_failure: &(dyn Fn(&AuditError) + Send + Sync),
) -> Result<(), AuditError> {
    let result = serve(&mut log, &rx, shared);
    let result = match result {
        Ok(()) => log.close(now_ms()),
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        if shared.failed.set(e.to_string()).is_ok() {
            on_failure(e);
        }
    }
    result
}

/// Serves the queue until it is closed (or every sender is gone); returns an error as soon
/// as a write fails.
fn serve(log: &mut AuditLog, rx: &Receiver<Msg>, shared: &Shared) -> Result<(), AuditError> {
    let every = log.policy().every.max(Duration::from_millis(1));
    loop {
        // With nothing unsigned there is nothing to checkpoint: just wake every `every`.
        let wait = match log.next_time_checkpoint() {
            Some(due) if log.unsigned_records() > 0 => due
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), every),
            _ => every,
        };
        match rx.recv_timeout(wait) {
            Ok(Msg::Record(first)) => {
                shared.taken();
                let mut batch = vec![first];
                let mut closing = false;
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Msg::Record(r)) => {
                            shared.taken();
                            batch.push(r)
                        }
                        Ok(Msg::Close) => {
                            closing = true;
                            break;
                        }
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                log.append_batch(&batch)?;
                if closing {
                    return drain(log, rx, shared);
                }
                log.checkpoint_if_due(Instant::now(), now_ms())?;
            }
            Ok(Msg::Close) => return drain(log, rx, shared),
            Err(RecvTimeoutError::Timeout) => log.checkpoint_if_due(Instant::now(), now_ms())?,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Writes whatever is still queued.
fn drain(log: &mut AuditLog, rx: &Receiver<Msg>, shared: &Shared) -> Result<(), AuditError> {
    let mut batch = Vec::new();
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Record(r) = msg {
            shared.taken();
            batch.push(r);
            if batch.len() == MAX_BATCH {
                log.append_batch(&batch)?;
                batch.clear();
            }
        }
    }
    log.append_batch(&batch).map(drop)
}

/// A cheap, cloneable handle that queues records to the writer thread.
#[derive(Clone)]
pub struct AuditHandle {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHandle")
            .field("capacity", &self.shared.capacity)
            .field("failed", &self.shared.failed.get())
            .finish_non_exhaustive()
    }
}

impl AuditHandle {
    /// Queues a record, stamped with the current time, without blocking.
    ///
    /// Fails if the kind or a field name is invalid, if the queue is full
    /// ([`AuditError::QueueFull`]), if the writer failed ([`AuditError::WriterFailed`]) or if
    /// it was closed ([`AuditError::WriterClosed`]). `Ok` means queued: the record is durable
    /// once the writer has written it, and if that fails the failure hook is called.
    pub fn record(&self, kind: &str, fields: Vec<(String, String)>) -> Result<(), AuditError> {
        self.check_failed()?;
        check_new_record(kind, fields.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        let closing = self
            .shared
            .closing
            .read()
            .map_err(|_| AuditError::WriterPanicked)?;
        if *closing {
            return Err(AuditError::WriterClosed);
        }
        let msg = Msg::Record(NewRecord {
            kind: kind.to_owned(),
            fields,
            time_ms: now_ms(),
        });
        if self.shared.queued.fetch_add(1, Ordering::AcqRel) >= self.shared.capacity {
            self.shared.taken();
            return Err(AuditError::QueueFull {
                capacity: self.shared.capacity,
            });
        }
        match self.tx.send(msg) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.shared.taken();
                self.check_failed()?;
                Err(AuditError::WriterClosed)
            }
        }
    }

    fn check_failed(&self) -> Result<(), AuditError> {
        match self.shared.failed.get() {
            Some(reason) => Err(AuditError::WriterFailed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Whether the writer has failed.
    pub fn has_failed(&self) -> bool {
        self.shared.failed.get().is_some()
    }

    /// Stops accepting records, lets the writer write everything queued and the final
    /// checkpoint, and waits for its thread. Returns the writer's result (the first error
    /// if it failed). Only the first call (from any clone) waits; later ones return `Ok`.
    ///
    /// It blocks only while the queue is written; calling it from a tokio runtime thread is
    /// safe (it blocks that thread briefly), or use `spawn_blocking`.
    pub fn close(&self) -> Result<(), AuditError> {
        match self.shared.closing.write() {
            Ok(mut c) => *c = true,
            Err(_) => return Err(AuditError::WriterPanicked),
        }
        // Never blocks; fails only if the writer is gone.
        let _ = self.tx.send(Msg::Close);
        let thread = self
            .shared
            .thread
            .lock()
            .map_err(|_| AuditError::WriterPanicked)?
            .take();
        match thread {
            Some(t) => t.join().map_err(|_| AuditError::WriterPanicked)?,
            None => Ok(()),
        }
    }

    /// [`AuditHandle::close`], consuming the handle.
    pub fn shutdown(self) -> Result<(), AuditError> {
        self.close()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::log::hooks::Gate;
    use crate::testing::open_log;
    use crate::{verify, AuditKey, CheckpointPolicy};

    fn user(name: &str) -> Vec<(String, String)> {
        vec![("user".to_owned(), name.to_owned())]
    }

    #[test]
    fn full_queue_is_an_error_and_blocked_records_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, log_path, head_path, public) = open_log(dir.path(), 0);
        let gate = Arc::new(Gate::default());
        log.hooks.gate = Some(Arc::clone(&gate));
        let syncs = Arc::clone(&log.hooks.syncs);
        let h = AuditWriter::spawn(log, 3, Box::new(|_| {}));
        h.record("session_opened", user("r0")).unwrap();
        // The writer took r0 and is held before writing it: the queue is empty and holds 3.
        gate.wait_until_blocked();
        for i in 1..=3 {
            h.record("session_opened", user(&format!("r{i}"))).unwrap();
        }
        let e = h.record("session_opened", user("r4")).unwrap_err();
        assert!(matches!(e, AuditError::QueueFull { capacity: 3 }), "{e}");
        assert!(e.to_string().contains("queue is full"), "{e}");
        let before = syncs.load(Ordering::SeqCst);
        gate.open();
        h.shutdown().unwrap();
        // r0 in one batch, r1..r3 in a second, the final checkpoint in a third.
        assert_eq!(syncs.load(Ordering::SeqCst) - before, 3);
        let report = verify(&log_path, Some(&head_path), Some(public));
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.unsigned_tail, 0);
        let recs = crate::tail(&log_path, 10).unwrap();
        let users: Vec<_> = recs.iter().filter_map(|r| r.field("user")).collect();
        assert_eq!(users, ["r0", "r1", "r2", "r3"]);
    }

    #[test]
    fn failed_write_calls_the_hook_once_and_later_records_fail() {
        let dir = tempfile::tempdir().unwrap();
        let (log, log_path, head_path, public) = open_log(dir.path(), 0);
        let fail = Arc::clone(&log.hooks.fail_writes);
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let hook_calls = Arc::clone(&calls);
        let tx = Mutex::new(tx);
        let h = AuditWriter::spawn(
            log,
            16,
            Box::new(move |e| {
                hook_calls.fetch_add(1, Ordering::SeqCst);
                let _ = tx.lock().unwrap().send(e.to_string());
            }),
        );
        h.record("session_opened", user("ok")).unwrap();
        fail.store(true, Ordering::SeqCst);
        h.record("session_opened", user("lost")).unwrap();
        let msg = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(msg.contains("injected failure"), "{msg}");
        let e = h.record("session_opened", user("after")).unwrap_err();
        assert!(matches!(e, AuditError::WriterFailed { .. }), "{e}");
        assert!(e.to_string().contains("injected failure"), "{e}");
        assert!(h.has_failed());
        let e = h.close().unwrap_err();
        assert!(e.to_string().contains("injected failure"), "{e}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The log up to the failure is intact (only its tail is unsigned).
        let report = verify(&log_path, Some(&head_path), Some(public));
        assert!(report.is_ok(), "{report}");
    }

    #[test]
    fn time_based_checkpoints_run_without_new_records_arriving() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("audit.log");
        let head_path = dir.path().join("audit.head");
        let key = AuditKey::generate();
        let log = AuditLog::open(
            &log_path,
            &head_path,
            key,
            CheckpointPolicy {
                every_records: 0,
                every: Duration::from_millis(50),
            },
        )
        .unwrap();
        let h = AuditWriter::spawn(log, 16, Box::new(|_| {}));
        h.record("tripwire", user("x")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let report = verify(&log_path, Some(&head_path), None);
            if report.is_ok() && report.records == 4 && report.unsigned_tail == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no time-based checkpoint: {report}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        h.shutdown().unwrap();
        let report = verify(&log_path, Some(&head_path), None);
        assert!(report.is_ok() && report.records == 4, "{report}");
    }
}
