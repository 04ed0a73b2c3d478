//! Every tamper class, produced on a real log written by `AuditLog` and then edited on disk;
//! `verify` must name exactly that class.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use halfpipe_audit::{
    verify, AuditKey, AuditLog, CheckpointPolicy, Finding, Notice, Record, Report,
};

struct Fixture {
    _dir: tempfile::TempDir,
    log: PathBuf,
    head: PathBuf,
    public: [u8; 32],
}

/// A closed log: genesis (0), checkpoint (1), records 2..=6, checkpoint 7, records 8..=12,
/// checkpoint 13, records 14..=15, final checkpoint 16. Record `seq` is on line `seq + 1`.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let head = dir.path().join("audit.head");
    let key = AuditKey::generate();
    let public = key.public_bytes();
    let mut w = AuditLog::open(
        &log,
        &head,
        key,
        CheckpointPolicy {
            every_records: 5,
            every: Duration::from_secs(3600),
        },
    )
    .unwrap();
    for i in 0..12u64 {
        let seq = w
            .append(
                "session_opened",
                &[("user", format!("u{i}")), ("peer", "192.0.2.1:1".into())],
                1_700_000_000_000 + i,
            )
            .unwrap();
        assert!(seq >= 2);
    }
    w.close(1_700_000_001_000).unwrap();
    Fixture {
        _dir: dir,
        log,
        head,
        public,
    }
}

impl Fixture {
    fn lines(&self) -> Vec<String> {
        let text = fs::read_to_string(&self.log).unwrap();
        text.lines().map(str::to_owned).collect()
    }
    fn write_lines(&self, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(&self.log, text).unwrap();
    }
    fn record(&self, seq: u64) -> Record {
        let line = &self.lines()[seq as usize];
        let r = Record::from_json_line(line.as_bytes()).unwrap();
        assert_eq!(r.seq, seq);
        r
    }
    fn verify(&self) -> Report {
        verify(&self.log, Some(&self.head), Some(self.public))
    }
    fn verify_without_head(&self) -> Report {
        verify(&self.log, None, Some(self.public))
    }
}

fn line_of(r: &Record) -> String {
    r.to_json_line().unwrap()
}

/// Asserts the report holds exactly one finding and returns it with its message.
fn only(report: &Report) -> (Finding, String) {
    assert_eq!(report.findings.len(), 1, "{report}");
    let f = report.findings[0].clone();
    let msg = f.to_string();
    (f, msg)
}

#[test]
fn an_untouched_log_verifies() {
    let fx = fixture();
    let r = fx.verify();
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.records, 17);
    assert_eq!(r.lines, 17);
    assert_eq!(r.checkpoints, 4);
    assert_eq!(r.last_checkpoint, Some(16));
    assert_eq!(r.last_signed_count, 16);
    assert_eq!(r.unsigned_tail, 0);
    assert_eq!(r.genesis_key, Some(fx.public));
    assert!(r.notices.is_empty(), "{r}");
    assert!(r.to_string().contains("OK: the log verifies"), "{r}");
    // Without a head file or key, too.
    assert!(verify(&fx.log, None, None).is_ok());
    // The documented shape.
    let lines = fx.lines();
    assert!(
        lines[0].starts_with(r#"{"seq":0,"time_ms":"#),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains(r#""kind":"genesis","fields":{"key":""#));
    assert!(lines[3].contains(
        r#""kind":"session_opened","fields":{"peer":"192.0.2.1:1","user":"u1"},"prev":""#
    ));
    assert!(lines[7].contains(r#""kind":"checkpoint","fields":{"count":"7","head":""#));
    let head = fs::read_to_string(&fx.head).unwrap();
    assert_eq!(head, format!("{}\n", lines[16]));
}

#[test]
fn an_edited_record_is_named() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines[4] = lines[4].replace("\"u2\"", "\"mallory\"");
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(f, Finding::Edited { seq: 4, line: 5 });
    assert_eq!(
        msg,
        "record 4 (line 5) was edited: its content does not match its hash"
    );
}

#[test]
fn an_edited_time_or_seq_is_an_edit() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines[9] = lines[9].replace("\"time_ms\":1700000000006", "\"time_ms\":1600000000006");
    // A changed seq on an unchanged line: the hash links still place it.
    lines[10] = lines[10].replacen("{\"seq\":10,", "{\"seq\":11,", 1);
    fx.write_lines(&lines);
    let r = fx.verify();
    assert_eq!(
        r.findings,
        [
            Finding::Edited { seq: 9, line: 10 },
            Finding::Edited { seq: 10, line: 11 }
        ],
        "{r}"
    );
}

#[test]
fn an_edited_and_rehashed_record_breaks_the_chain() {
    let fx = fixture();
    let mut rec = fx.record(5);
    rec.fields.insert("user".into(), "mallory".into());
    rec.hash = rec.compute_hash();
    let mut lines = fx.lines();
    lines[5] = line_of(&rec);
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::ChainBroken {
            seq: 6,
            line: 7,
            prev_seq: 5
        }
    );
    assert!(
        msg.contains("record 6 (line 7) does not follow record 5"),
        "{msg}"
    );
}

#[test]
fn rehashing_the_whole_chain_after_an_edit_is_caught_by_the_signed_checkpoints() {
    let fx = fixture();
    let mut lines = fx.lines();
    let mut prev = fx.record(2).hash;
    for seq in 3..=16u64 {
        let mut rec = fx.record(seq);
        if seq == 3 {
            rec.fields.insert("user".into(), "mallory".into());
        }
        // The attacker re-links and re-hashes everything (checkpoints keep their signed
        // fields: they cannot be re-signed).
        rec.prev = prev;
        rec.hash = rec.compute_hash();
        prev = rec.hash;
        lines[seq as usize] = line_of(&rec);
    }
    fx.write_lines(&lines);
    let r = fx.verify_without_head();
    let mismatches: Vec<u64> = r
        .findings
        .iter()
        .map(|f| match f {
            Finding::CheckpointHeadMismatch { seq, .. } => *seq,
            other => panic!("unexpected finding {other}"),
        })
        .collect();
    assert_eq!(mismatches, [7, 13, 16], "{r}");
    assert_eq!(
        r.findings[0].to_string(),
        "records before checkpoint 7 (line 8) were changed (checkpoint head hash does not match)"
    );
    // The head file's copy of checkpoint 16 no longer matches the log's record 16 either.
    let r = fx.verify();
    assert!(
        r.findings
            .contains(&Finding::HeadFileMismatch { seq: 16, line: 17 }),
        "{r}"
    );
}

#[test]
fn an_inserted_copy_is_named() {
    let fx = fixture();
    let mut lines = fx.lines();
    let copy = lines[4].clone();
    lines.insert(10, copy);
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::Inserted {
            seq: 4,
            line: 11,
            copy_of_line: Some(5)
        }
    );
    assert!(msg.contains("record 4 on line 11 was inserted"), "{msg}");
}

#[test]
fn an_inserted_fabricated_record_is_named() {
    let fx = fixture();
    // A well-formed record linked to record 9, claiming seq 10, placed before the real one.
    let r9 = fx.record(9);
    let fake = Record::new(
        10,
        r9.time_ms,
        "session_opened".into(),
        [("user".to_owned(), "ghost".to_owned())].into(),
        r9.hash,
    );
    let mut lines = fx.lines();
    lines.insert(10, line_of(&fake));
    fx.write_lines(&lines);
    let (f, _) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::Inserted {
            seq: 10,
            line: 11,
            copy_of_line: None
        }
    );
    // And one with a seq from nowhere, in the middle.
    let fx = fixture();
    let mut lines = fx.lines();
    let stray = Record::new(99, 1, "tripwire".into(), Default::default(), [9; 32]);
    lines.insert(3, line_of(&stray));
    fx.write_lines(&lines);
    let (f, _) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::Inserted {
            seq: 99,
            line: 4,
            copy_of_line: None
        }
    );
}

#[test]
fn a_deleted_record_is_named() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines.remove(9);
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::Deleted {
            first: 9,
            last: 9,
            after_line: 9
        }
    );
    assert_eq!(msg, "record 9 was deleted: it is missing after line 9");

    let fx = fixture();
    let mut lines = fx.lines();
    lines.drain(3..=8); // records 3..=8, checkpoint 7 included
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::Deleted {
            first: 3,
            last: 8,
            after_line: 3
        }
    );
    assert!(msg.starts_with("records 3 to 8 were deleted"), "{msg}");
}

#[test]
fn reordering_is_named() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines.swap(9, 10);
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::Reordered {
            seq: 10,
            line: 10,
            after_seq: 9,
            after_line: 11
        }
    );
    assert!(msg.starts_with("records were reordered"), "{msg}");
}

#[test]
fn head_truncation_is_named() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines.drain(0..3);
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::HeadTruncated {
            first_seq: 3,
            line: 1
        }
    );
    assert!(msg.contains("head was truncated"), "{msg}");
    // Without a key there is nothing to check signatures with, and it says so.
    let r = verify(&fx.log, Some(&fx.head), None);
    assert_eq!(r.findings.len(), 1, "{r}");
    assert!(r.notices.contains(&Notice::NoKey), "{r}");
}

#[test]
fn tail_truncation_is_caught_against_the_head_file() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines.truncate(13); // back to record 12: checkpoint 7 is the last in the log
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::TailTruncated {
            records: 13,
            covered: 17
        }
    );
    assert_eq!(
        msg,
        "the log's tail was truncated: it has 13 record(s) but the head file's signed \
         checkpoint covers 17"
    );
    // Without the head file the cut is invisible, but the unsigned tail is reported.
    let r = fx.verify_without_head();
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.unsigned_tail, 5);
    assert_eq!(r.last_signed_count, 7);
    assert!(r.notices.contains(&Notice::UnsignedTail {
        count: 5,
        after_checkpoint: Some(7)
    }));
}

#[test]
fn a_tail_cut_back_and_padded_to_the_same_length_is_caught() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines.truncate(8); // up to checkpoint 7
    let mut prev = fx.record(7).hash;
    for seq in 8..=16u64 {
        let fake = Record::new(seq, 5, "config_reload".into(), Default::default(), prev);
        prev = fake.hash;
        lines.push(line_of(&fake));
    }
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(f, Finding::HeadFileMismatch { seq: 16, line: 17 });
    assert!(msg.contains("rewritten"), "{msg}");
}

/// Signs a checkpoint the way the documented format says, with any key.
fn signed_checkpoint(key: &SigningKey, count: u64, head: [u8; 32], time_ms: u64) -> Record {
    let domain = b"halfpipe-audit checkpoint v1";
    let mut msg = Vec::new();
    msg.extend_from_slice(&(domain.len() as u64).to_be_bytes());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(&count.to_be_bytes());
    msg.extend_from_slice(&head);
    msg.extend_from_slice(&time_ms.to_be_bytes());
    let sig = key.sign(&msg).to_bytes();
    let fields = [
        ("count".to_owned(), count.to_string()),
        ("head".to_owned(), hex::encode(head)),
        ("signature".to_owned(), hex::encode(sig)),
    ]
    .into();
    Record::new(count, time_ms, "checkpoint".into(), fields, head)
}

#[test]
fn a_checkpoint_signed_with_another_key_is_forged() {
    let fx = fixture();
    let mut lines = fx.lines();
    // Append a record and a checkpoint signed with the attacker's key.
    let last = fx.record(16);
    let extra = Record::new(
        17,
        9,
        "key_event".into(),
        [("what".to_owned(), "rotated".to_owned())].into(),
        last.hash,
    );
    let attacker = SigningKey::from_bytes(&[7u8; 32]);
    let cp = signed_checkpoint(&attacker, 18, extra.hash, 10);
    lines.push(line_of(&extra));
    lines.push(line_of(&cp));
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::CheckpointForged {
            seq: 18,
            line: 19,
            key: hex::encode(fx.public)
        }
    );
    assert!(
        msg.starts_with("checkpoint 18 (line 19) is forged"),
        "{msg}"
    );
    // The same when only the genesis key is trusted.
    let r = verify(&fx.log, None, None);
    assert_eq!(r.findings.len(), 1, "{r}");
    assert!(matches!(
        r.findings[0],
        Finding::CheckpointForged { seq: 18, .. }
    ));

    // A genuine checkpoint whose signature was altered (and re-hashed) is forged too.
    let fx = fixture();
    let mut cp = fx.record(13);
    let sig = cp.fields["signature"].clone();
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    cp.fields
        .insert("signature".into(), format!("{flipped}{}", &sig[1..]));
    cp.hash = cp.compute_hash();
    let mut lines = fx.lines();
    lines[13] = line_of(&cp);
    fx.write_lines(&lines);
    let r = fx.verify();
    assert!(
        matches!(
            r.findings[..],
            [
                Finding::CheckpointForged {
                    seq: 13,
                    line: 14,
                    ..
                },
                Finding::ChainBroken { seq: 14, .. }
            ]
        ),
        "{r}"
    );
}

#[test]
fn a_log_started_with_another_key_is_named() {
    let fx = fixture();
    let other = AuditKey::generate().public_bytes();
    let r = verify(&fx.log, Some(&fx.head), Some(other));
    let (f, msg) = only(&r);
    assert_eq!(
        f,
        Finding::GenesisKeyMismatch {
            found: hex::encode(fx.public),
            expected: hex::encode(other)
        }
    );
    assert!(msg.contains("not the expected key"), "{msg}");
    // None of its checkpoints counts as signed by the expected key.
    assert_eq!(r.checkpoints, 0);
}

#[test]
fn a_malformed_line_is_named_by_number() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines[5] = "this is not json".into();
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert!(matches!(f, Finding::Malformed { line: 6, .. }), "{f:?}");
    assert!(msg.starts_with("line 6 is not a record"), "{msg}");

    let fx = fixture();
    let mut lines = fx.lines();
    lines[5] = lines[5].replace("{\"peer\"", "{\"user\":\"mallory\",\"peer\"");
    fx.write_lines(&lines);
    let (f, msg) = only(&fx.verify());
    assert!(matches!(f, Finding::Malformed { line: 6, .. }), "{f:?}");
    assert!(msg.contains("appears twice"), "{msg}");
}

#[test]
fn a_torn_last_line_is_named() {
    let fx = fixture();
    let bytes = fs::read(&fx.log).unwrap();
    fs::write(&fx.log, &bytes[..bytes.len() - 10]).unwrap();
    let r = fx.verify_without_head();
    let (f, msg) = only(&r);
    assert_eq!(f, Finding::TornLine { line: 17 });
    assert!(msg.contains("cut in the middle of a record"), "{msg}");
    // Against the head file, the missing checkpoint is also a truncation.
    let r = fx.verify();
    assert_eq!(
        r.findings,
        [
            Finding::TornLine { line: 17 },
            Finding::TailTruncated {
                records: 16,
                covered: 17
            }
        ]
    );
}

#[test]
fn a_reformatted_line_is_named() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines[3] = lines[3].replace("\"kind\":", "\"kind\": ");
    fx.write_lines(&lines);
    let (f, _) = only(&fx.verify());
    assert_eq!(f, Finding::NonCanonical { seq: 3, line: 4 });
}

#[test]
fn a_forged_or_missing_head_file_is_named() {
    let fx = fixture();
    let r16 = fx.record(16);
    let attacker = SigningKey::from_bytes(&[9u8; 32]);
    let fake = signed_checkpoint(&attacker, 40, r16.hash, 1);
    fs::write(&fx.head, format!("{}\n", line_of(&fake))).unwrap();
    let (f, _) = only(&fx.verify());
    assert!(matches!(f, Finding::HeadFileForged { .. }), "{f:?}");

    fs::remove_file(&fx.head).unwrap();
    let (f, msg) = only(&fx.verify());
    assert!(matches!(f, Finding::HeadFileUnreadable { .. }), "{f:?}");
    assert!(msg.contains("does not exist"), "{msg}");

    fs::write(&fx.head, "garbage").unwrap();
    let (f, _) = only(&fx.verify());
    assert!(matches!(f, Finding::HeadFileInvalid { .. }), "{f:?}");
}

#[test]
fn an_empty_or_missing_log_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.log");
    let (f, _) = only(&verify(&path, None, None));
    assert!(matches!(f, Finding::LogUnreadable { .. }), "{f:?}");
    fs::write(&path, "").unwrap();
    let (f, _) = only(&verify(&path, None, None));
    assert_eq!(f, Finding::Empty);
}

#[test]
fn record_zero_must_be_a_genesis_record() {
    let fx = fixture();
    let mut g = fx.record(0);
    g.fields.insert("key".into(), "zz".into());
    g.hash = g.compute_hash();
    let mut lines = fx.lines();
    lines[0] = line_of(&g);
    fx.write_lines(&lines);
    let r = fx.verify();
    assert!(
        matches!(&r.findings[0], Finding::GenesisInvalid { line: 1, reason } if reason.contains("key")),
        "{r}"
    );
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn corrupt_log_findings_name_the_file_when_the_writer_refuses() {
    let fx = fixture();
    let mut lines = fx.lines();
    lines.swap(3, 4);
    fx.write_lines(&lines);
    let key = AuditKey::generate();
    let e = AuditLog::open(&fx.log, &fx.head, key, CheckpointPolicy::default()).unwrap_err();
    // Another key is refused first, as such.
    assert!(
        matches!(e, halfpipe_audit::AuditError::KeyMismatch { .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&path_str(&fx.log)), "{e}");
}

#[test]
fn a_fake_genesis_in_front_is_an_insertion() {
    let fx = fixture();
    let attacker = SigningKey::from_bytes(&[3u8; 32]);
    let mut g = fx.record(0);
    g.fields.insert(
        "key".into(),
        hex::encode(attacker.verifying_key().to_bytes()),
    );
    g.hash = g.compute_hash();
    let mut lines = fx.lines();
    lines.insert(0, line_of(&g));
    fx.write_lines(&lines);
    let (f, _) = only(&fx.verify());
    assert_eq!(
        f,
        Finding::Inserted {
            seq: 0,
            line: 1,
            copy_of_line: None
        }
    );
}
