//! The writer: creation, reopening, refusals, checkpoints, the threaded front, keys, tail.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use halfpipe_audit::{
    kinds, tail, verify, AuditError, AuditHandle, AuditKey, AuditLog, AuditWriter,
    CheckpointPolicy, NewRecord,
};

struct Paths {
    dir: tempfile::TempDir,
    log: PathBuf,
    head: PathBuf,
    key: PathBuf,
}

fn paths() -> Paths {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let head = dir.path().join("audit.head");
    let key = dir.path().join("audit.key");
    AuditKey::generate().write_new(&key).unwrap();
    Paths {
        dir,
        log,
        head,
        key,
    }
}

fn policy(every_records: u64) -> CheckpointPolicy {
    CheckpointPolicy {
        every_records,
        every: Duration::from_secs(3600),
    }
}

impl Paths {
    fn open(&self, every_records: u64) -> Result<AuditLog, AuditError> {
        AuditLog::open(
            &self.log,
            &self.head,
            AuditKey::load(&self.key).unwrap(),
            policy(every_records),
        )
    }
    fn public(&self) -> [u8; 32] {
        AuditKey::load(&self.key).unwrap().public_bytes()
    }
}

fn user(u: &str) -> [(&'static str, String); 1] {
    [("user", u.to_owned())]
}

#[test]
fn a_new_log_is_private_and_starts_with_genesis_and_a_checkpoint() {
    let p = paths();
    let log = p.open(10).unwrap();
    assert_eq!(log.next_seq(), 2);
    drop(log);
    let mode = fs::metadata(&p.log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let recs = tail(&p.log, 10).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].kind, "genesis");
    assert_eq!(recs[0].field("key"), Some(hex::encode(p.public()).as_str()));
    assert_eq!(recs[1].kind, "checkpoint");
    let r = verify(&p.log, Some(&p.head), Some(p.public()));
    assert!(r.is_ok(), "{r}");
}

#[test]
fn reopening_continues_the_chain() {
    let p = paths();
    let mut log = p.open(3).unwrap();
    for i in 0..4 {
        log.append(kinds::SESSION_OPENED, &user(&format!("a{i}")), 1)
            .unwrap();
    }
    // Not closed cleanly: the last record is unsigned.
    drop(log);
    let r = verify(&p.log, Some(&p.head), Some(p.public()));
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.unsigned_tail, 1);

    let mut log = p.open(3).unwrap();
    assert_eq!(log.unsigned_records(), 1);
    let seq = log
        .append(
            kinds::SESSION_CLOSED,
            &[("user", "a0".into()), ("bytes", "1234".into())],
            2,
        )
        .unwrap();
    // 0 genesis, 1 cp, 2..4 records, 5 cp, 6 record, then this one.
    assert_eq!(seq, 7);
    log.close(3).unwrap();
    let r = verify(&p.log, Some(&p.head), Some(p.public()));
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.unsigned_tail, 0);
    assert_eq!(r.records, 9);
    let recs = tail(&p.log, 100).unwrap();
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..9).collect::<Vec<_>>());
    assert_eq!(recs[7].field("bytes"), Some("1234"));
    assert_eq!(recs[8].kind, "checkpoint");
}

#[test]
fn reopening_a_corrupt_log_is_refused() {
    // A torn last line, as after a crash mid-write.
    let p = paths();
    let mut log = p.open(100).unwrap();
    log.append(kinds::AUTH_FAILURE, &user("x"), 1).unwrap();
    drop(log);
    let mut bytes = fs::read(&p.log).unwrap();
    bytes.extend_from_slice(b"{\"seq\":3,\"time_ms\":");
    fs::write(&p.log, &bytes).unwrap();
    let e = p.open(100).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, AuditError::LogCorrupt { findings, .. } if findings.len() == 1),
        "{e}"
    );
    assert!(msg.contains("refusing to append"), "{msg}");
    assert!(msg.contains("line 4 is incomplete"), "{msg}");
    assert!(msg.contains(&p.log.display().to_string()), "{msg}");
    // The log was not touched.
    assert_eq!(fs::read(&p.log).unwrap(), bytes);

    // An edited record.
    let p = paths();
    let mut log = p.open(100).unwrap();
    log.append(kinds::TOKEN_USE, &user("bob"), 1).unwrap();
    log.close(2).unwrap();
    let text = fs::read_to_string(&p.log)
        .unwrap()
        .replace("\"bob\"", "\"eve\"");
    fs::write(&p.log, text).unwrap();
    let e = p.open(100).unwrap_err();
    assert!(
        e.to_string().contains("record 2 (line 3) was edited"),
        "{e}"
    );
}

#[test]
fn reopening_with_another_key_is_refused() {
    let p = paths();
    p.open(10).unwrap().close(1).unwrap();
    let other = AuditKey::generate();
    let other_hex = other.public_hex();
    let e = AuditLog::open(&p.log, &p.head, other, policy(10)).unwrap_err();
    assert!(matches!(e, AuditError::KeyMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&other_hex), "{e}");
    assert!(e.to_string().contains(&hex::encode(p.public())), "{e}");
}

#[test]
fn a_missing_head_file_or_log_is_refused() {
    let p = paths();
    let mut log = p.open(10).unwrap();
    log.append(kinds::MODE_CHANGE, &[("mode", "lockdown".into())], 1)
        .unwrap();
    log.close(2).unwrap();
    fs::rename(&p.head, p.dir.path().join("away")).unwrap();
    let e = p.open(10).unwrap_err();
    assert!(matches!(e, AuditError::HeadFileMissing { .. }), "{e}");
    assert!(e.to_string().contains("truncation"), "{e}");

    fs::rename(p.dir.path().join("away"), &p.head).unwrap();
    fs::remove_file(&p.log).unwrap();
    let e = p.open(10).unwrap_err();
    assert!(matches!(e, AuditError::LogMissing { .. }), "{e}");
    assert!(e.to_string().contains("deleted or moved"), "{e}");
}

#[test]
fn even_a_fresh_log_without_its_head_file_is_refused() {
    // Accepting it would let whoever deletes the head file cut the log back to its first
    // checkpoint (and the writer would then vouch for the result).
    let p = paths();
    let mut log = p.open(10).unwrap();
    log.append(kinds::CONFIG_RELOAD, &[], 1).unwrap();
    log.close(2).unwrap();
    let text = fs::read_to_string(&p.log).unwrap();
    let first_two: String = text.split_inclusive('\n').take(2).collect();
    fs::write(&p.log, first_two).unwrap();
    fs::remove_file(&p.head).unwrap();
    let e = p.open(10).unwrap_err();
    assert!(matches!(e, AuditError::HeadFileMissing { .. }), "{e}");
    assert!(!p.head.exists());
}

#[test]
fn an_empty_log_left_by_a_crash_at_creation_is_initialized() {
    let p = paths();
    fs::write(&p.log, "").unwrap();
    let log = p.open(10).unwrap();
    assert_eq!(log.next_seq(), 2);
    log.close(1).unwrap();
    let r = verify(&p.log, Some(&p.head), Some(p.public()));
    assert!(r.is_ok() && r.records == 2, "{r}");
}

#[test]
fn a_huge_time_interval_means_never() {
    let p = paths();
    let mut log = AuditLog::open(
        &p.log,
        &p.head,
        AuditKey::load(&p.key).unwrap(),
        CheckpointPolicy {
            every_records: 0,
            every: Duration::MAX,
        },
    )
    .unwrap();
    log.append(kinds::TRIPWIRE, &[], 1).unwrap();
    log.checkpoint_if_due(Instant::now(), 2).unwrap();
    assert_eq!(log.unsigned_records(), 1);
    let h = AuditWriter::spawn(log, 4, Box::new(|_| {}));
    h.record(kinds::TRIPWIRE, vec![]).unwrap();
    h.shutdown().unwrap();
    let r = verify(&p.log, Some(&p.head), Some(p.public()));
    assert!(r.is_ok() && r.unsigned_tail == 0, "{r}");
}

#[test]
fn invalid_records_are_refused_before_anything_is_written() {
    let p = paths();
    let mut log = p.open(10).unwrap();
    for kind in ["", "checkpoint", "genesis", "has space", &"k".repeat(65)] {
        let e = log.append(kind, &[], 1).unwrap_err();
        assert!(matches!(e, AuditError::InvalidKind { .. }), "{kind:?}: {e}");
    }
    let e = log
        .append("tripwire", &[("a", "1".into()), ("a", "2".into())], 1)
        .unwrap_err();
    assert!(e.to_string().contains("given twice"), "{e}");
    let e = log
        .append("tripwire", &[("x", "y".repeat(2 << 20))], 1)
        .unwrap_err();
    assert!(matches!(e, AuditError::RecordTooLarge { .. }), "{e}");
    // A bad record in a batch stops the whole batch.
    let batch = [
        NewRecord {
            kind: "tripwire".into(),
            fields: vec![],
            time_ms: 1,
        },
        NewRecord {
            kind: "bad kind".into(),
            fields: vec![],
            time_ms: 1,
        },
    ];
    assert!(log.append_batch(&batch).is_err());
    assert_eq!(log.next_seq(), 2);
    // Values are free-form and round-trip.
    let odd = "line\nbreak \"quoted\" \u{7f} ünïcödé \\".to_owned();
    let seq = log.append("tripwire", &[("what", odd.clone())], 1).unwrap();
    log.close(2).unwrap();
    let r = verify(&p.log, Some(&p.head), Some(p.public()));
    assert!(r.is_ok(), "{r}");
    let recs = tail(&p.log, 2).unwrap();
    assert_eq!(recs[0].seq, seq);
    assert_eq!(recs[0].field("what"), Some(odd.as_str()));
}

#[test]
fn checkpoints_come_by_count_and_by_time() {
    let p = paths();
    let mut log = AuditLog::open(
        &p.log,
        &p.head,
        AuditKey::load(&p.key).unwrap(),
        CheckpointPolicy {
            every_records: 0,
            every: Duration::from_secs(10),
        },
    )
    .unwrap();
    log.append(kinds::TRIPWIRE, &user("t"), 1).unwrap();
    let now = Instant::now();
    log.checkpoint_if_due(now, 2).unwrap();
    assert_eq!(log.unsigned_records(), 1, "not due yet");
    log.checkpoint_if_due(now + Duration::from_secs(11), 3)
        .unwrap();
    assert_eq!(log.unsigned_records(), 0);
    // Nothing new: no empty checkpoint.
    let before = log.next_seq();
    log.checkpoint_if_due(now + Duration::from_secs(60), 4)
        .unwrap();
    assert_eq!(log.next_seq(), before);
    drop(log);
    let head = fs::read_to_string(&p.head).unwrap();
    assert!(head.contains("\"seq\":3,"), "{head}");
    assert!(head.contains("\"time_ms\":3,"), "{head}");

    let mut log = p.open(2).unwrap();
    let a = log.append(kinds::TRIPWIRE, &user("a"), 5).unwrap();
    let b = log.append(kinds::TRIPWIRE, &user("b"), 6).unwrap();
    assert_eq!((a, b), (4, 5));
    assert_eq!(log.next_seq(), 7, "checkpoint 6 after two records");
    assert_eq!(log.unsigned_records(), 0);
    drop(log);
    let r = verify(&p.log, Some(&p.head), Some(p.public()));
    assert!(r.is_ok() && r.last_checkpoint == Some(6), "{r}");
}

#[test]
fn key_files_are_private_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    let key = AuditKey::generate();
    key.write_new(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let e = AuditKey::generate().write_new(&path).unwrap_err();
    assert!(matches!(e, AuditError::KeyFileExists { .. }), "{e}");
    assert!(e.to_string().contains("refusing to overwrite"), "{e}");
    let loaded = AuditKey::load(&path).unwrap();
    assert_eq!(loaded.public_bytes(), key.public_bytes());
    assert_eq!(loaded.public_hex(), hex::encode(key.public_bytes()));

    // Debug shows the public key only.
    let secret = fs::read_to_string(&path).unwrap();
    let secret = secret.trim();
    let dbg = format!("{key:?}");
    assert!(dbg.contains(&key.public_hex()), "{dbg}");
    assert!(!dbg.contains(secret), "{dbg}");

    for mode in [0o640, 0o604, 0o660] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let e = AuditKey::load(&path).unwrap_err();
        assert!(matches!(e, AuditError::KeyFilePermissions { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("chmod 600 {}", path.display())),
            "{msg}"
        );
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&path, "not a key\n").unwrap();
    let e = AuditKey::load(&path).unwrap_err();
    assert!(matches!(e, AuditError::KeyFileInvalid { .. }), "{e}");
}

#[test]
fn tail_returns_the_last_records_across_chunks() {
    let p = paths();
    let mut log = p.open(1000).unwrap();
    let big = "x".repeat(10_000);
    for i in 0..40 {
        log.append(
            kinds::SESSION_OPENED,
            &[("user", format!("u{i}")), ("pad", big.clone())],
            i,
        )
        .unwrap();
    }
    drop(log);
    let last3 = tail(&p.log, 3).unwrap();
    let users: Vec<_> = last3.iter().filter_map(|r| r.field("user")).collect();
    assert_eq!(users, ["u37", "u38", "u39"]);
    let all = tail(&p.log, 1000).unwrap();
    assert_eq!(all.len(), 42);
    assert_eq!(all[0].kind, "genesis");
    assert!(tail(&p.log, 0).unwrap().is_empty());
    // A torn end is an error, not a silently shorter answer.
    let bytes = fs::read(&p.log).unwrap();
    fs::write(&p.log, &bytes[..bytes.len() - 1]).unwrap();
    let e = tail(&p.log, 2).unwrap_err();
    assert!(e.to_string().contains("incomplete"), "{e}");
}

fn assert_send_sync<T: Send + Sync + Clone>() {}

#[test]
fn threaded_writer_keeps_order_from_many_threads() {
    assert_send_sync::<AuditHandle>();
    let p = paths();
    let log = p.open(7).unwrap();
    let h = AuditWriter::spawn(log, 10_000, Box::new(|_| {}));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    h.record(
                        kinds::SESSION_OPENED,
                        vec![("user".into(), format!("t{t}-{i}"))],
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    h.clone().shutdown().unwrap();
    let e = h.record(kinds::TRIPWIRE, vec![]).unwrap_err();
    assert!(matches!(e, AuditError::WriterClosed), "{e}");
    assert!(h.close().is_ok(), "a second close is fine");

    let r = verify(&p.log, Some(&p.head), Some(p.public()));
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.unsigned_tail, 0);
    let recs = tail(&p.log, 10_000).unwrap();
    for t in 0..4 {
        let mine: Vec<_> = recs
            .iter()
            .filter_map(|r| r.field("user"))
            .filter(|u| u.starts_with(&format!("t{t}-")))
            .map(str::to_owned)
            .collect();
        let want: Vec<_> = (0..50).map(|i| format!("t{t}-{i}")).collect();
        assert_eq!(mine, want);
    }
}

#[test]
fn threaded_writer_failure_is_reported_once_and_then_every_record_fails() {
    let p = paths();
    // The head file lives in a directory that will vanish: the next checkpoint cannot be
    // made durable (a real failure, whoever runs the test).
    let heads = p.dir.path().join("heads");
    fs::create_dir(&heads).unwrap();
    let head = heads.join("audit.head");
    let log = AuditLog::open(&p.log, &head, AuditKey::load(&p.key).unwrap(), policy(1)).unwrap();
    fs::remove_dir_all(&heads).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let c = Arc::clone(&calls);
    let h = AuditWriter::spawn(
        log,
        16,
        Box::new(move |e: &AuditError| {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = tx.lock().unwrap().send(e.to_string());
        }),
    );
    h.record(kinds::KEY_EVENT, vec![("what".into(), "rotate".into())])
        .unwrap();
    let msg = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(msg.contains("audit.head.tmp"), "{msg}");
    for _ in 0..3 {
        let e = h.record(kinds::KEY_EVENT, vec![]).unwrap_err();
        assert!(matches!(e, AuditError::WriterFailed { .. }), "{e}");
    }
    assert!(h.shutdown().is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn invalid_kinds_are_refused_by_the_handle_at_once() {
    let p = paths();
    let h = AuditWriter::spawn(p.open(10).unwrap(), 4, Box::new(|_| {}));
    let e = h.record("checkpoint", vec![]).unwrap_err();
    assert!(matches!(e, AuditError::InvalidKind { .. }), "{e}");
    h.shutdown().unwrap();
}

#[test]
fn the_sink_sees_every_durable_line_in_file_order() {
    let p = paths();
    let mut log = p.open(3).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = Arc::clone(&seen);
    log.set_sink(Box::new(move |l| s.lock().unwrap().push(l.to_owned())));
    for u in ["a", "b", "c", "d"] {
        log.append(kinds::SESSION_OPENED, &user(u), 1).unwrap();
    }
    log.close(2).unwrap();
    let file = fs::read_to_string(&p.log).unwrap();
    let lines: Vec<&str> = file.lines().collect();
    let seen = seen.lock().unwrap();
    // Everything written after the sink was set: the file's tail, line for line
    // (four records and the checkpoints the policy and the close added).
    assert!(seen.len() >= 6, "{seen:?}");
    assert_eq!(&lines[lines.len() - seen.len()..], &seen[..]);
}
