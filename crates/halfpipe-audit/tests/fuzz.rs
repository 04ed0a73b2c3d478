//! `verify` never panics, whatever the files hold, and notices every change to a closed log.

use std::fs;
use std::sync::OnceLock;
use std::time::Duration;

use halfpipe_audit::{verify, verify_bytes, AuditKey, AuditLog, CheckpointPolicy};
use proptest::prelude::*;

struct Sample {
    log: Vec<u8>,
    head: Vec<u8>,
    key: [u8; 32],
}

/// A real, cleanly closed log (written once).
fn sample() -> &'static Sample {
    static SAMPLE: OnceLock<Sample> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("a.log");
        let head_path = dir.path().join("a.head");
        let key = AuditKey::generate();
        let public = key.public_bytes();
        let mut log = AuditLog::open(
            &log_path,
            &head_path,
            key,
            CheckpointPolicy {
                every_records: 4,
                every: Duration::from_secs(3600),
            },
        )
        .unwrap();
        for i in 0..10u64 {
            log.append(
                "session_opened",
                &[("user", format!("user{i}")), ("n", i.to_string())],
                1_000 + i,
            )
            .unwrap();
        }
        log.close(2_000).unwrap();
        Sample {
            log: fs::read(&log_path).unwrap(),
            head: fs::read(&head_path).unwrap(),
            key: public,
        }
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipByte(usize, u8),
    DeleteLine(usize),
    DuplicateLine(usize, usize),
    SwapLines(usize, usize),
    Truncate(usize),
    InsertBytes(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::FlipByte(i, x)),
        any::<usize>().prop_map(Mutation::DeleteLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::DuplicateLine(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..20)
        )
            .prop_map(|(i, b)| Mutation::InsertBytes(i, b)),
    ]
}

fn apply(log: &[u8], m: &Mutation) -> Vec<u8> {
    if log.is_empty() {
        // (An earlier mutation truncated it all away.)
        return match m {
            Mutation::InsertBytes(_, bytes) => bytes.clone(),
            _ => Vec::new(),
        };
    }
    let mut lines: Vec<Vec<u8>> = log
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    let n = lines.len();
    match m {
        Mutation::FlipByte(i, x) => {
            let mut out = log.to_vec();
            let i = i % out.len();
            out[i] ^= x;
            return out;
        }
        Mutation::DeleteLine(i) => {
            lines.remove(i % n);
        }
        Mutation::DuplicateLine(a, b) => {
            let l = lines[a % n].clone();
            lines.insert(b % (n + 1), l);
        }
        Mutation::SwapLines(a, b) => lines.swap(a % n, b % n),
        Mutation::Truncate(i) => return log[..i % log.len()].to_vec(),
        Mutation::InsertBytes(i, bytes) => {
            let mut out = log.to_vec();
            let i = i % (out.len() + 1);
            out.splice(i..i, bytes.iter().copied());
            return out;
        }
    }
    lines.concat()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(
        log in proptest::collection::vec(any::<u8>(), 0..2000),
        head in proptest::collection::vec(any::<u8>(), 0..300),
        key in any::<[u8; 32]>(),
    ) {
        let _ = verify_bytes(&log, Some(&head), Some(key));
        let _ = verify_bytes(&log, None, None);
    }

    #[test]
    fn json_looking_garbage_never_panics(
        lines in proptest::collection::vec(
            "\\{\"seq\":[0-9]{1,3},\"time_ms\":[0-9]{1,3},\"kind\":\"(genesis|checkpoint|x)\",\"fields\":\\{(\"(key|count|head|signature|version)\":\"[0-9a-f]{0,8}\")?\\},\"prev\":\"[0-9a-f]{64}\",\"hash\":\"[0-9a-f]{64}\"\\}\n",
            0..12,
        ),
    ) {
        let log = lines.concat();
        let _ = verify_bytes(log.as_bytes(), Some(log.as_bytes()), None);
    }

    #[test]
    fn every_change_to_a_closed_log_is_noticed(ms in proptest::collection::vec(mutation(), 1..4)) {
        let s = sample();
        let mut log = s.log.clone();
        for m in &ms {
            log = apply(&log, m);
        }
        let report = verify_bytes(&log, Some(&s.head), Some(s.key));
        // Findings render without panicking.
        let _ = report.to_string();
        if log == s.log {
            prop_assert!(report.is_ok(), "{report}");
        } else {
            prop_assert!(!report.is_ok(), "undetected change {ms:?}: {report}");
        }
        // The same without head file or key: must not panic.
        let _ = verify_bytes(&log, None, None).to_string();
    }
}

#[test]
fn mutated_files_never_panic_verify_on_disk() {
    let s = sample();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("m.log");
    let head_path = dir.path().join("m.head");
    fs::write(&head_path, &s.head).unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    runner
        .run(&mutation(), |m| {
            fs::write(&log_path, apply(&s.log, &m)).unwrap();
            let r = verify(&log_path, Some(&head_path), Some(s.key));
            let _ = r.to_string();
            Ok(())
        })
        .unwrap();
}
