//! Reading a log while its writer appends to it.
//!
//! A batch of records is one `write`, but the kernel may show a concurrent reader the file
//! grown by part of it, so a reader of a live log could see a last line without its newline:
//! the same thing a crash leaves. The writer and the readers therefore agree through an
//! advisory lock (`flock`) on the log file: the writer holds it exclusively while it
//! appends a batch, and a reader holds it shared only while it takes the file's length,
//! then reads that prefix. The log is append-only, so the prefix never changes: a reader
//! sees whole batches, and an unterminated last line really is a torn write. The readers
//! here are [`crate::tail`] and [`crate::verify`]; the lock works across processes too, so
//! `halfpipe log tail` or `log verify` on a running server's log is just as safe.
//!
//! On a filesystem without `flock` both sides go on unlocked: records are never refused
//! for it, and readers merely lose the promise above. Nor does the writer wait long for a
//! reader: one that holds the lock past [`WRITER_PATIENCE`] (a reader stopped inside its
//! `fstat`) is not allowed to stall the log, so the writer appends without the lock.

use std::fs::{File, TryLockError};
use std::io;
use std::time::{Duration, Instant};

/// How long the writer waits for readers to let go of the lock before it appends without
/// it. A reader holds the lock for one `fstat`, so this is only ever reached by a reader
/// that was stopped (`SIGSTOP`, a debugger) while holding it.
pub(crate) const WRITER_PATIENCE: Duration = Duration::from_secs(1);

/// The log file's lock, held exclusively by the writer while it appends a batch; let go
/// when dropped.
pub(crate) struct AppendLock<'a> {
    locked: Option<&'a File>,
}

impl<'a> AppendLock<'a> {
    /// Waits (up to [`WRITER_PATIENCE`]) for readers taking the length of the log `file`,
    /// then holds them off.
    pub(crate) fn take(file: &'a File) -> Self {
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return AppendLock { locked: Some(file) },
                Err(TryLockError::WouldBlock) if start.elapsed() < WRITER_PATIENCE => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                // No flock here, or a reader that does not let go: append unlocked.
                Err(_) => return AppendLock { locked: None },
            }
        }
    }
}

impl Drop for AppendLock<'_> {
    fn drop(&mut self) {
        if let Some(file) = self.locked {
            // A failed unlock leaves nothing behind that this open file's next `lock` would
            // wait for, and closing the file lets go too.
            let _ = file.unlock();
        }
    }
}

/// The length of the log `file` in whole batches: waits for a batch being appended.
pub(crate) fn settled_len(file: &File) -> io::Result<u64> {
    let locked = loop {
        match file.lock_shared() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            result => break result.is_ok(),
        }
    };
    let len = file.metadata().map(|m| m.len());
    if locked {
        let _ = file.unlock();
    }
    len
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use crate::testing::open_log;

    /// How many `flock` requests wait on the inode `ino` (Linux's `/proc/locks` marks a
    /// waiting request with `->`).
    fn waiters_for_a_lock_on(ino: u64) -> usize {
        let locks = std::fs::read_to_string("/proc/locks").expect("read /proc/locks (Linux)");
        let needle = format!(":{ino} ");
        locks
            .lines()
            .filter(|l| l.contains("->") && l.contains("FLOCK") && l.contains(&needle))
            .count()
    }

    #[test]
    fn readers_of_a_live_log_wait_for_the_batch_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, log_path, head_path, public) = open_log(dir.path(), 0);
        log.append("tripwire", &[], 1).unwrap();
        // Stand in for the writer halfway through a batch: the lock held, half a line out.
        let writer = OpenOptions::new().append(true).open(&log_path).unwrap();
        writer.lock().unwrap();
        (&writer).write_all(b"{\"seq\":").unwrap();
        let ino = writer.metadata().unwrap().ino();
        let (tx, rx) = mpsc::channel();
        let tail_path = log_path.clone();
        let tail_reader = std::thread::spawn(move || {
            let _ = tx.send(crate::tail(&tail_path, 10));
        });
        let (verify_path, verify_head) = (log_path.clone(), head_path.clone());
        let verifier = std::thread::spawn(move || {
            crate::verify(&verify_path, Some(&verify_head), Some(public))
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while waiters_for_a_lock_on(ino) < 2 {
            if let Ok(early) = rx.try_recv() {
                panic!("tail read past a batch being written: {early:?}");
            }
            if verifier.is_finished() {
                panic!(
                    "verify read past a batch being written: {}",
                    verifier.join().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the readers never waited for the lock"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // What the readers find once the lock is free is what they report, so let go of it
        // on whole lines only: take the stand-in's half line back off first.
        let whole = std::fs::read(&log_path).unwrap();
        let cut = whole.iter().rposition(|&b| b == b'\n').unwrap() + 1;
        writer.set_len(cut as u64).unwrap();
        writer.unlock().unwrap();
        let records = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("tail finished")
            .expect("tail of whole lines");
        assert_eq!(records.last().map(|r| r.kind.as_str()), Some("tripwire"));
        let report = verifier.join().unwrap();
        assert!(report.is_ok(), "{report}");
        tail_reader.join().unwrap();
    }

    #[test]
    fn a_reader_that_does_not_let_go_delays_the_writer_only_its_patience() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, log_path, head_path, public) = open_log(dir.path(), 0);
        // A reader stopped while it holds the lock.
        let stuck = std::fs::File::open(&log_path).unwrap();
        stuck.lock_shared().unwrap();
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        std::thread::spawn(move || {
            let _ = tx.send(log.append("tripwire", &[], 1).map(|_| log));
        });
        let log = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the writer stalled behind the reader")
            .expect("the append goes on without the lock");
        let waited = start.elapsed();
        assert!(
            waited >= super::WRITER_PATIENCE,
            "it did not wait at all: {waited:?}"
        );
        stuck.unlock().unwrap();
        drop(log);
        let report = crate::verify(&log_path, Some(&head_path), Some(public));
        assert!(report.is_ok(), "{report}");
        assert_eq!(
            crate::tail(&log_path, 1).unwrap()[0].kind,
            "tripwire",
            "the record is in the log"
        );
    }

    #[test]
    fn the_writer_holds_the_lock_while_it_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, log_path, _, _) = open_log(dir.path(), 0);
        let gate = std::sync::Arc::new(crate::log::hooks::Gate::default());
        log.hooks.gate = Some(std::sync::Arc::clone(&gate));
        let writing = std::thread::spawn(move || log.append("tripwire", &[], 1).map(|_| log));
        gate.wait_until_blocked();
        let reader = std::fs::File::open(&log_path).unwrap();
        assert!(
            reader.try_lock_shared().is_err(),
            "a reader could take the lock while the writer appends"
        );
        gate.open();
        let log = writing.join().unwrap().expect("append");
        reader.try_lock_shared().expect("the writer let go");
        drop(log);
    }
}
