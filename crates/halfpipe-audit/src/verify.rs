//! Verification: reads a log (and optionally its head file), rebuilds the chain and names
//! every way in which it was tampered with.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use ed25519_dalek::VerifyingKey;

use crate::live::settled_len;
use crate::record::{parse_genesis, Checkpoint, Record, CHECKPOINT_KIND, GENESIS_KIND};
use crate::MAX_LINE_BYTES;

/// One problem found by [`verify`]. Its `Display` is a sentence naming the record (by seq)
/// and the line of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The log file could not be read (from where it failed on, nothing was checked).
    LogUnreadable {
        /// The I/O error, with the path.
        reason: String,
    },
    /// The log has no lines at all.
    Empty,
    /// A line is not a record (not JSON, wrong shape, bad hex, too long, empty).
    Malformed {
        /// Line number (1-based).
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The last line has no newline: the log ends in the middle of a record.
    TornLine {
        /// Line number (1-based).
        line: u64,
    },
    /// A record's content does not match its hash.
    Edited {
        /// The record's seq.
        seq: u64,
        /// Line number.
        line: u64,
    },
    /// A record's content matches its hash but its line is not the exact text the writer
    /// writes (e.g. reformatted, keys reordered, escapes changed).
    NonCanonical {
        /// The record's seq.
        seq: u64,
        /// Line number.
        line: u64,
    },
    /// A record's prev hash is not the hash of the record before it in the chain.
    ChainBroken {
        /// The record's seq.
        seq: u64,
        /// Line number.
        line: u64,
        /// The seq of the record it should follow.
        prev_seq: u64,
    },
    /// The record that follows a record by hash carries the wrong seq.
    WrongSeq {
        /// The seq the record carries.
        seq: u64,
        /// Line number.
        line: u64,
        /// The seq it should carry.
        expected: u64,
    },
    /// A record that is not part of the chain.
    Inserted {
        /// The seq it carries.
        seq: u64,
        /// Line number.
        line: u64,
        /// The line of the chain record it is an exact copy of, if it is one.
        copy_of_line: Option<u64>,
    },
    /// Records missing from the middle of the chain.
    Deleted {
        /// First missing seq.
        first: u64,
        /// Last missing seq.
        last: u64,
        /// The line after which they are missing.
        after_line: u64,
    },
    /// A record that appears in the file before the record it follows in the chain.
    Reordered {
        /// The record's seq.
        seq: u64,
        /// Its line.
        line: u64,
        /// The seq of the record it follows in the chain.
        after_seq: u64,
        /// That record's line.
        after_line: u64,
    },
    /// The log does not start with record 0: its head was cut off.
    HeadTruncated {
        /// The lowest seq present.
        first_seq: u64,
        /// Its line.
        line: u64,
    },
    /// Record 0 is not a valid genesis record.
    GenesisInvalid {
        /// Its line.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A record other than record 0 claims to be a genesis record.
    MisplacedGenesis {
        /// The record's seq.
        seq: u64,
        /// Line number.
        line: u64,
    },
    /// The genesis record names another signing key than the expected one.
    GenesisKeyMismatch {
        /// The key the genesis record names (hex).
        found: String,
        /// The expected key (hex).
        expected: String,
    },
    /// The expected key given to [`verify`] is not a valid Ed25519 public key.
    ExpectedKeyInvalid {
        /// The key (hex).
        key: String,
    },
    /// A checkpoint record whose fields are not a valid checkpoint.
    CheckpointMalformed {
        /// The checkpoint's seq.
        seq: u64,
        /// Line number.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint whose signature is not valid under the trusted key.
    CheckpointForged {
        /// The checkpoint's seq.
        seq: u64,
        /// Line number.
        line: u64,
        /// The trusted key (hex).
        key: String,
    },
    /// A validly signed checkpoint whose head hash is not the hash of the record before it:
    /// records before it were changed (and the chain re-hashed).
    CheckpointHeadMismatch {
        /// The checkpoint's seq.
        seq: u64,
        /// Line number.
        line: u64,
    },
    /// The head file could not be read.
    HeadFileUnreadable {
        /// Why.
        reason: String,
    },
    /// The head file does not hold a valid checkpoint record.
    HeadFileInvalid {
        /// Why.
        reason: String,
    },
    /// The head file's checkpoint signature is not valid under the trusted key.
    HeadFileForged {
        /// The trusted key (hex).
        key: String,
    },
    /// The log ends before the head file's checkpoint: its tail was cut off.
    TailTruncated {
        /// How many records the log has.
        records: u64,
        /// How many records the head file's checkpoint covers (itself included).
        covered: u64,
    },
    /// The log's record at the head file's checkpoint differs from it.
    HeadFileMismatch {
        /// The checkpoint's seq.
        seq: u64,
        /// The line of the log's record with that seq.
        line: u64,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Finding::*;
        match self {
            LogUnreadable { reason } => write!(f, "the log could not be read: {reason}"),
            Empty => write!(f, "the log is empty: it has no genesis record"),
            Malformed { line, reason } => write!(f, "line {line} is not a record: {reason}"),
            TornLine { line } => write!(
                f,
                "line {line} is incomplete (no newline at the end of the file): the log was cut \
                 in the middle of a record, e.g. by a crash during a write"
            ),
            Edited { seq, line } => write!(
                f,
                "record {seq} (line {line}) was edited: its content does not match its hash"
            ),
            NonCanonical { seq, line } => write!(
                f,
                "record {seq} (line {line}) was edited: its line is not the exact text the writer \
                 wrote, although its content still matches its hash"
            ),
            ChainBroken {
                seq,
                line,
                prev_seq,
            } => write!(
                f,
                "record {seq} (line {line}) does not follow record {prev_seq}: its prev hash is \
                 not record {prev_seq}'s hash (one of the two was altered and re-hashed)"
            ),
            WrongSeq {
                seq,
                line,
                expected,
            } => write!(
                f,
                "record on line {line} carries seq {seq} but follows record {} by hash, so it \
                 should be record {expected} (its seq was altered and re-hashed)",
                expected.saturating_sub(1)
            ),
            Inserted {
                seq,
                line,
                copy_of_line,
            } => {
                write!(
                    f,
                    "record {seq} on line {line} was inserted: it is not part of the chain"
                )?;
                if let Some(orig) = copy_of_line {
                    write!(f, " (it is a copy of line {orig})")?;
                }
                Ok(())
            }
            Deleted {
                first,
                last,
                after_line,
            } => {
                if first == last {
                    write!(
                        f,
                        "record {first} was deleted: it is missing after line {after_line}"
                    )
                } else {
                    write!(
                        f,
                        "records {first} to {last} were deleted: they are missing after line \
                         {after_line}"
                    )
                }
            }
            Reordered {
                seq,
                line,
                after_seq,
                after_line,
            } => write!(
                f,
                "records were reordered: record {seq} (line {line}) appears before record \
                 {after_seq} (line {after_line}), which it follows in the chain"
            ),
            HeadTruncated { first_seq, line } => write!(
                f,
                "the log's head was truncated: it does not start with the genesis record \
                 (record 0); its first record is record {first_seq} (line {line})"
            ),
            GenesisInvalid { line, reason } => write!(
                f,
                "record 0 (line {line}) is not a valid genesis record: {reason}"
            ),
            MisplacedGenesis { seq, line } => write!(
                f,
                "record {seq} (line {line}) claims to be a genesis record, which only record 0 \
                 may be"
            ),
            GenesisKeyMismatch { found, expected } => write!(
                f,
                "the log's genesis record names signing key {found}, not the expected key \
                 {expected}: the log was replaced, or started with another key"
            ),
            ExpectedKeyInvalid { key } => write!(
                f,
                "the expected key {key} is not a valid Ed25519 public key; checkpoint \
                 signatures were not checked"
            ),
            CheckpointMalformed { seq, line, reason } => {
                write!(f, "checkpoint {seq} (line {line}) is malformed: {reason}")
            }
            CheckpointForged { seq, line, key } => write!(
                f,
                "checkpoint {seq} (line {line}) is forged: its signature is not valid under the \
                 log's signing key {key}"
            ),
            CheckpointHeadMismatch { seq, line } => write!(
                f,
                "records before checkpoint {seq} (line {line}) were changed (checkpoint head hash \
                 does not match)"
            ),
            HeadFileUnreadable { reason } => {
                write!(f, "the head file could not be read: {reason}")
            }
            HeadFileInvalid { reason } => write!(
                f,
                "the head file does not hold a valid checkpoint: {reason}"
            ),
            HeadFileForged { key } => write!(
                f,
                "the head file's checkpoint is forged: its signature is not valid under the log's \
                 signing key {key}"
            ),
            TailTruncated { records, covered } => write!(
                f,
                "the log's tail was truncated: it has {records} record(s) but the head file's \
                 signed checkpoint covers {covered}"
            ),
            HeadFileMismatch { seq, line } => write!(
                f,
                "record {seq} (line {line}) is not the checkpoint the head file holds for record \
                 {seq}: the log was rewritten after that checkpoint was made"
            ),
        }
    }
}

/// Something [`verify`] wants the user to know that is not a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Records after the last valid checkpoint: not yet covered by a signature (normal while
    /// the writer runs; a cleanly closed log has none).
    UnsignedTail {
        /// How many.
        count: u64,
        /// The seq of the last valid checkpoint, if there is one.
        after_checkpoint: Option<u64>,
    },
    /// No key was known, so no signature was checked.
    NoKey,
    /// The head file's checkpoint is older than the log's last checkpoint (the writer
    /// stopped between the two writes, or an older head file was restored).
    HeadFileBehind {
        /// The head file's checkpoint.
        head_file_seq: u64,
        /// The log's last valid checkpoint.
        log_seq: u64,
    },
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::UnsignedTail {
                count,
                after_checkpoint: Some(cp),
            } => write!(
                f,
                "unsigned tail: {count} record(s) after checkpoint {cp} are not yet covered by a \
                 signed checkpoint"
            ),
            Notice::UnsignedTail {
                count,
                after_checkpoint: None,
            } => write!(
                f,
                "unsigned tail: none of the {count} record(s) is covered by a valid signed \
                 checkpoint"
            ),
            Notice::NoKey => write!(
                f,
                "no signing key is known (no valid genesis record and no expected key): \
                 checkpoint signatures were not checked"
            ),
            Notice::HeadFileBehind {
                head_file_seq,
                log_seq,
            } => write!(
                f,
                "the head file holds checkpoint {head_file_seq}, older than the log's last \
                 checkpoint {log_seq}"
            ),
        }
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Lines in the file (including malformed ones).
    pub lines: u64,
    /// Lines that parsed as records.
    pub records: u64,
    /// Checkpoints in the chain with a valid signature and a matching head hash.
    pub checkpoints: u64,
    /// The `count` of the last such checkpoint: how many records it signs (0 if none).
    pub last_signed_count: u64,
    /// The seq of the last such checkpoint.
    pub last_checkpoint: Option<u64>,
    /// Records in the chain after the last such checkpoint (see [`Notice::UnsignedTail`]).
    pub unsigned_tail: u64,
    /// The signing key named by the genesis record.
    pub genesis_key: Option<[u8; 32]>,
    /// Problems, in the order they were found. Empty means the log verified.
    pub findings: Vec<Finding>,
    /// Information that is not a failure.
    pub notices: Vec<Notice>,
}

impl Report {
    /// True when nothing was found.
    pub fn is_ok(&self) -> bool {
        self.findings.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} record(s) on {} line(s), {} valid checkpoint(s), last signed count {}",
            self.records, self.lines, self.checkpoints, self.last_signed_count
        )?;
        if let Some(k) = self.genesis_key {
            writeln!(
                f,
                "signing key (from the genesis record): {}",
                hex::encode(k)
            )?;
        }
        for finding in &self.findings {
            writeln!(f, "FAIL: {finding}")?;
        }
        for notice in &self.notices {
            writeln!(f, "note: {notice}")?;
        }
        if self.is_ok() {
            write!(f, "OK: the log verifies")
        } else {
            write!(
                f,
                "the log does NOT verify: {} problem(s)",
                self.findings.len()
            )
        }
    }
}

/// Verifies the log at `log_path`.
///
/// With `head_file`, also checks the log against the checkpoint held there (tail truncation,
/// rewrites after it). With `expected_key`, checkpoints must be signed by that key and the
/// genesis record must name it; without, the key named by the genesis record is trusted.
/// On a live log, a batch the writer is appending is waited for; batches appended after
/// that are left out, so the report covers the log as it was when the length was taken.
/// Never panics, whatever the files hold.
pub fn verify(log_path: &Path, head_file: Option<&Path>, expected_key: Option<[u8; 32]>) -> Report {
    // The head file first: the writer replaces it only after the log holds the checkpoint,
    // so the log read next is never behind it.
    let head = head_file.map(read_head_file);
    let opened = File::open(log_path).and_then(|f| Ok((settled_len(&f)?, f)));
    match opened {
        Ok((len, f)) => analyze(BufReader::new(f.take(len)), head, expected_key).report,
        Err(e) => Report {
            findings: vec![Finding::LogUnreadable {
                reason: format!("{}: {e}", log_path.display()),
            }],
            ..Report::default()
        },
    }
}

/// [`verify`] over a log and head file already in memory.
pub fn verify_bytes(
    log: &[u8],
    head_file: Option<&[u8]>,
    expected_key: Option<[u8; 32]>,
) -> Report {
    analyze(log, head_file.map(|h| Ok(h.to_vec())), expected_key).report
}

fn read_head_file(path: &Path) -> Result<Vec<u8>, String> {
    let f = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!("{} does not exist", path.display())
        } else {
            format!("{}: {e}", path.display())
        }
    })?;
    let mut out = Vec::new();
    f.take(MAX_LINE_BYTES as u64 + 2)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(out)
}

/// How a line ended.
struct LineEnd {
    terminated: bool,
    too_long: bool,
}

/// Reads one line into `buf` (without the newline), keeping at most [`MAX_LINE_BYTES`].
fn next_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<LineEnd>> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(any.then_some(LineEnd {
                terminated: false,
                too_long,
            }));
        }
        any = true;
        let (take, found) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        if !too_long {
            if buf.len() + take > MAX_LINE_BYTES {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&avail[..take]);
            }
        }
        r.consume(if found { take + 1 } else { take });
        if found {
            return Ok(Some(LineEnd {
                terminated: true,
                too_long,
            }));
        }
    }
}

/// What a record is, beyond its chain fields.
enum Class {
    Plain,
    Genesis(Result<[u8; 32], String>),
    Checkpoint(Box<Result<Checkpoint, String>>),
}

/// A parsed line, with what the chain walk needs.
struct Entry {
    line: u64,
    seq: u64,
    hash: [u8; 32],
    prev: [u8; 32],
    content_ok: bool,
    canonical: bool,
    class: Class,
}

/// The result of an analysis, with what the writer needs to continue the chain.
pub(crate) struct Analysis {
    pub report: Report,
    /// The last record of the chain: (seq, hash).
    pub last: Option<(u64, [u8; 32])>,
}

struct Parsed {
    entries: Vec<Entry>,
    /// Lines that are not records, in order.
    bad_lines: Vec<u64>,
    lines: u64,
}

fn parse_log<R: BufRead>(mut log: R, findings: &mut Vec<Finding>) -> Parsed {
    let mut parsed = Parsed {
        entries: Vec::new(),
        bad_lines: Vec::new(),
        lines: 0,
    };
    let mut buf = Vec::new();
    loop {
        let end = match next_line(&mut log, &mut buf) {
            Ok(Some(end)) => end,
            Ok(None) => break,
            Err(e) => {
                findings.push(Finding::LogUnreadable {
                    reason: format!("after line {}: {e}", parsed.lines),
                });
                break;
            }
        };
        parsed.lines += 1;
        let line = parsed.lines;
        let reason = if !end.terminated {
            findings.push(Finding::TornLine { line });
            parsed.bad_lines.push(line);
            continue;
        } else if end.too_long {
            format!("it is longer than {MAX_LINE_BYTES} bytes")
        } else if buf.is_empty() {
            "it is empty".to_owned()
        } else {
            match Record::from_json_line(&buf) {
                Ok(rec) => {
                    parsed.entries.push(entry(line, &rec, &buf));
                    continue;
                }
                Err(reason) => reason,
            }
        };
        findings.push(Finding::Malformed { line, reason });
        parsed.bad_lines.push(line);
    }
    parsed
}

fn entry(line: u64, rec: &Record, text: &[u8]) -> Entry {
    let canonical = rec
        .to_json_line()
        .map(|s| s.as_bytes() == text)
        .unwrap_or(false);
    let class = match rec.kind.as_str() {
        GENESIS_KIND => Class::Genesis(parse_genesis(rec)),
        CHECKPOINT_KIND => Class::Checkpoint(Box::new(Checkpoint::parse(rec))),
        _ => Class::Plain,
    };
    Entry {
        line,
        seq: rec.seq,
        hash: rec.hash,
        prev: rec.prev,
        content_ok: rec.hash_matches(),
        canonical,
        class,
    }
}

/// The state of the chain walk.
struct Walk<'a> {
    entries: &'a [Entry],
    trusted: Option<(VerifyingKey, String)>,
    /// The genesis record's key when it differs from the expected key: a checkpoint signed
    /// with it is explained by [`Finding::GenesisKeyMismatch`] rather than reported as forged.
    other_key: Option<VerifyingKey>,
    findings: Vec<Finding>,
    chain: Vec<usize>,
    used: Vec<bool>,
    checkpoints: u64,
    /// Position in `chain` of the last good checkpoint.
    last_good: Option<usize>,
    no_key: bool,
    /// The chain seq of the last record visited.
    chain_seq: u64,
}

impl Walk<'_> {
    /// Adds entry `idx` to the chain, after `pred` (None at the start and after a gap);
    /// `linked` is whether its prev hash is `pred`'s hash.
    /// `seq` is the seq the record has in the chain (its own unless it was edited).
    fn visit(&mut self, idx: usize, seq: u64, pred: Option<usize>, linked: bool) {
        let entries = self.entries;
        let e = &entries[idx];
        if !e.content_ok {
            self.findings.push(Finding::Edited { seq, line: e.line });
        } else if !e.canonical {
            self.findings.push(Finding::NonCanonical {
                seq: e.seq,
                line: e.line,
            });
        }
        // A record whose content was edited explains its own broken link.
        let mut link_explained = linked || pred.is_none() || !e.content_ok;
        match &e.class {
            Class::Genesis(_) if !self.chain.is_empty() => {
                self.findings.push(Finding::MisplacedGenesis {
                    seq: e.seq,
                    line: e.line,
                });
            }
            Class::Genesis(_) | Class::Plain => {}
            Class::Checkpoint(parsed) => match parsed.as_ref() {
                Err(reason) => self.findings.push(Finding::CheckpointMalformed {
                    seq: e.seq,
                    line: e.line,
                    reason: reason.clone(),
                }),
                Ok(cp) => match &self.trusted {
                    None => self.no_key = true,
                    Some((key, key_hex)) => {
                        if !cp.signature_valid(key) {
                            if !self.other_key.is_some_and(|k| cp.signature_valid(&k)) {
                                self.findings.push(Finding::CheckpointForged {
                                    seq: e.seq,
                                    line: e.line,
                                    key: key_hex.clone(),
                                });
                            }
                        } else {
                            match pred.map(|p| entries[p].hash == cp.head) {
                                Some(false) => {
                                    self.findings.push(Finding::CheckpointHeadMismatch {
                                        seq: e.seq,
                                        line: e.line,
                                    });
                                    link_explained = true;
                                }
                                Some(true) if linked && e.content_ok => {
                                    self.checkpoints += 1;
                                    self.last_good = Some(self.chain.len());
                                }
                                _ => {}
                            }
                        }
                    }
                },
            },
        }
        if !link_explained {
            self.findings.push(Finding::ChainBroken {
                seq: e.seq,
                line: e.line,
                prev_seq: self.chain_seq,
            });
        }
        self.used[idx] = true;
        self.chain.push(idx);
        self.chain_seq = seq;
    }
}

/// Reads and checks a log; see the crate documentation for what each finding means.
pub(crate) fn analyze<R: BufRead>(
    log: R,
    head: Option<Result<Vec<u8>, String>>,
    expected_key: Option<[u8; 32]>,
) -> Analysis {
    let mut findings = Vec::new();
    let parsed = parse_log(log, &mut findings);
    let entries = &parsed.entries[..];
    let mut report = Report {
        lines: parsed.lines,
        records: entries.len() as u64,
        ..Report::default()
    };
    if parsed.lines == 0 && findings.is_empty() {
        findings.push(Finding::Empty);
    }

    let mut by_prev: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
    let mut by_seq: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_prev.entry(e.prev).or_default().push(i);
        by_seq.entry(e.seq).or_default().push(i);
    }

    // The start of the chain: the genesis record (one that the next record links to, if
    // there are several), else whatever comes first.
    let genesis_like = |e: &Entry| e.seq == 0 && matches!(e.class, Class::Genesis(_));
    let start = entries
        .iter()
        .position(|e| genesis_like(e) && by_prev.contains_key(&e.hash))
        .or_else(|| entries.iter().position(genesis_like))
        .or_else(|| entries.iter().position(|e| e.seq == 0))
        .or_else(|| {
            let min = entries.iter().map(|e| e.seq).min()?;
            entries.iter().position(|e| e.seq == min)
        });
    let mut genesis_key = None;
    if let Some(s) = start {
        let e = &entries[s];
        match &e.class {
            _ if e.seq != 0 => findings.push(Finding::HeadTruncated {
                first_seq: e.seq,
                line: e.line,
            }),
            Class::Genesis(Ok(key)) => genesis_key = Some((*key, e.content_ok)),
            Class::Genesis(Err(reason)) => findings.push(Finding::GenesisInvalid {
                line: e.line,
                reason: reason.clone(),
            }),
            _ => findings.push(Finding::GenesisInvalid {
                line: e.line,
                reason: "its kind is not \"genesis\"".into(),
            }),
        }
    }
    report.genesis_key = genesis_key.map(|(k, _)| k);

    // The key checkpoints must be signed with.
    let trusted_bytes = match (expected_key, genesis_key) {
        (Some(exp), Some((found, _))) => {
            if exp != found {
                findings.push(Finding::GenesisKeyMismatch {
                    found: hex::encode(found),
                    expected: hex::encode(exp),
                });
            }
            Some(exp)
        }
        (Some(exp), None) => Some(exp),
        // An edited genesis record's key is not trusted.
        (None, Some((found, true))) => Some(found),
        (None, _) => None,
    };
    let other_key = match (trusted_bytes, genesis_key) {
        (Some(t), Some((g, true))) if t != g => VerifyingKey::from_bytes(&g).ok(),
        _ => None,
    };
    let trusted = match trusted_bytes {
        Some(bytes) => match VerifyingKey::from_bytes(&bytes) {
            Ok(k) => Some((k, hex::encode(bytes))),
            Err(_) => {
                findings.push(Finding::ExpectedKeyInvalid {
                    key: hex::encode(bytes),
                });
                None
            }
        },
        None => None,
    };

    let mut walk = Walk {
        entries,
        trusted,
        other_key,
        findings,
        chain: Vec::new(),
        used: vec![false; entries.len()],
        checkpoints: 0,
        last_good: None,
        no_key: false,
        chain_seq: 0,
    };

    if let Some(s) = start {
        walk.visit(s, entries[s].seq, None, false);
        let mut cur = s;
        loop {
            let c = &entries[cur];
            let Some(next_seq) = walk.chain_seq.checked_add(1) else {
                break;
            };
            let used = &walk.used;
            let linked: Vec<usize> = by_prev
                .get(&c.hash)
                .map(|v| v.iter().copied().filter(|&i| !used[i]).collect())
                .unwrap_or_default();
            if let Some(&pick) = linked.iter().min_by_key(|&&i| {
                let e = &entries[i];
                let has_successor = by_prev
                    .get(&e.hash)
                    .is_some_and(|v| v.iter().any(|&j| j != i && !used[j]));
                (e.seq != next_seq, !has_successor, i <= cur, i)
            }) {
                let e = &entries[pick];
                if e.seq != next_seq && e.content_ok {
                    walk.findings.push(Finding::WrongSeq {
                        seq: e.seq,
                        line: e.line,
                        expected: next_seq,
                    });
                }
                walk.visit(pick, next_seq, Some(cur), true);
                cur = pick;
                continue;
            }
            let by_number = by_seq.get(&next_seq).and_then(|v| {
                v.iter()
                    .copied()
                    .filter(|&i| !used[i])
                    .min_by_key(|&i| (i <= cur, i))
            });
            if let Some(pick) = by_number {
                walk.visit(pick, next_seq, Some(cur), false);
                cur = pick;
                continue;
            }
            // A gap: the next unused record in the file, if it carries a later seq.
            let Some(next) = (cur + 1..entries.len()).find(|&i| !used[i]) else {
                break;
            };
            let n = &entries[next];
            if n.seq <= next_seq {
                break;
            }
            let missing = n.seq - next_seq;
            let bad = &parsed.bad_lines; // sorted
            let bad_between = (bad.partition_point(|&l| l < n.line)
                - bad.partition_point(|&l| l <= c.line)) as u64;
            if bad_between < missing {
                walk.findings.push(Finding::Deleted {
                    first: next_seq,
                    last: n.seq - 1,
                    after_line: c.line,
                });
            }
            walk.visit(next, n.seq, None, false);
            cur = next;
        }
    }

    // Records left over were inserted.
    let chain_lines: HashMap<[u8; 32], u64> = walk
        .chain
        .iter()
        .map(|&i| (entries[i].hash, entries[i].line))
        .collect();
    for (i, e) in entries.iter().enumerate() {
        if !walk.used[i] {
            let copy_of_line = chain_lines.get(&e.hash).copied();
            walk.findings.push(Finding::Inserted {
                seq: e.seq,
                line: e.line,
                copy_of_line,
            });
        }
    }
    // The chain in the file's order.
    for w in walk.chain.windows(2) {
        let (a, b) = (&entries[w[0]], &entries[w[1]]);
        if b.line < a.line {
            walk.findings.push(Finding::Reordered {
                seq: b.seq,
                line: b.line,
                after_seq: a.seq,
                after_line: a.line,
            });
        }
    }

    let mut notices = Vec::new();
    let last_good_seq = walk.last_good.map(|p| entries[walk.chain[p]].seq);
    if let Some(head) = head {
        check_head_file(&head, &mut walk, &mut notices, last_good_seq);
    }

    report.checkpoints = walk.checkpoints;
    report.last_checkpoint = last_good_seq;
    report.last_signed_count = last_good_seq.unwrap_or(0);
    report.unsigned_tail = match walk.last_good {
        Some(p) => (walk.chain.len() - 1 - p) as u64,
        None => walk.chain.len() as u64,
    };
    if walk.no_key {
        notices.insert(0, Notice::NoKey);
    }
    if report.unsigned_tail > 0 {
        notices.push(Notice::UnsignedTail {
            count: report.unsigned_tail,
            after_checkpoint: last_good_seq,
        });
    }
    let last = walk
        .chain
        .last()
        .map(|&i| (entries[i].seq, entries[i].hash));
    report.findings = walk.findings;
    report.notices = notices;
    Analysis { report, last }
}

fn check_head_file(
    head: &Result<Vec<u8>, String>,
    walk: &mut Walk<'_>,
    notices: &mut Vec<Notice>,
    last_good_seq: Option<u64>,
) {
    let bytes = match head {
        Ok(b) => b,
        Err(reason) => {
            walk.findings.push(Finding::HeadFileUnreadable {
                reason: reason.clone(),
            });
            return;
        }
    };
    let invalid = |reason: &str| Finding::HeadFileInvalid {
        reason: reason.to_owned(),
    };
    let Some(text) = bytes.strip_suffix(b"\n") else {
        walk.findings
            .push(invalid("it does not end with a newline (it was cut short)"));
        return;
    };
    let rec = match Record::from_json_line(text) {
        Ok(r) => r,
        Err(reason) => {
            walk.findings.push(invalid(&reason));
            return;
        }
    };
    if !rec.hash_matches() {
        walk.findings
            .push(invalid("its content does not match its hash"));
        return;
    }
    let cp = match Checkpoint::parse(&rec) {
        Ok(cp) => cp,
        Err(reason) => {
            walk.findings.push(invalid(&reason));
            return;
        }
    };
    if cp.head != rec.prev {
        walk.findings
            .push(invalid("its prev hash differs from the head hash it signs"));
        return;
    }
    match &walk.trusted {
        None => walk.no_key = true,
        Some((key, key_hex)) => {
            if !cp.signature_valid(key) {
                if !walk.other_key.is_some_and(|k| cp.signature_valid(&k)) {
                    walk.findings.push(Finding::HeadFileForged {
                        key: key_hex.clone(),
                    });
                }
                return;
            }
        }
    }
    let entries = walk.entries;
    let found = walk.chain.iter().find(|&&i| entries[i].seq == rec.seq);
    match found {
        Some(&i) => {
            if entries[i].hash != rec.hash {
                walk.findings.push(Finding::HeadFileMismatch {
                    seq: rec.seq,
                    line: entries[i].line,
                });
            }
        }
        None => {
            let max = walk.chain.iter().map(|&i| entries[i].seq).max();
            if max.is_none_or(|m| m < rec.seq) {
                walk.findings.push(Finding::TailTruncated {
                    records: entries.len() as u64,
                    covered: rec.seq.saturating_add(1),
                });
            }
        }
    }
    if let Some(log_seq) = last_good_seq {
        if log_seq > rec.seq {
            notices.push(Notice::HeadFileBehind {
                head_file_seq: rec.seq,
                log_seq,
            });
        }
    }
}
