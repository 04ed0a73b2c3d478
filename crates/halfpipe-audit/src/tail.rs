//! Reading the last records of a log without reading all of it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::AuditError;
use crate::live::settled_len;
use crate::record::{Record, MAX_LINE_BYTES};

const CHUNK: u64 = 64 * 1024;

/// The last `n` records of the log at `log_path`, oldest first (fewer if the log is shorter).
///
/// Reads backwards from the end, so it is cheap on a large log. It parses the records but
/// does not verify the chain (use [`crate::verify`] for that); a line that does not parse, or
/// a last line cut short by a crash, is an error. A batch the writer is appending right now
/// is waited for, not read half-written.
pub fn tail(log_path: &Path, n: usize) -> Result<Vec<Record>, AuditError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let io = |op: &'static str| move |e| AuditError::io(log_path, op, e);
    let unreadable = |reason: String| AuditError::TailUnreadable {
        path: log_path.to_owned(),
        reason,
    };
    let mut f = File::open(log_path).map_err(io("open"))?;
    let len = settled_len(&f).map_err(io("stat"))?;
    if len == 0 {
        return Ok(Vec::new());
    }
    // Read chunks from the end until the buffer holds n + 1 newlines (so the first of the
    // last n lines is complete) or the start of the file.
    let mut pos = len;
    let mut buf: Vec<u8> = Vec::new();
    let mut newlines = 0usize;
    let limit = (n as u64)
        .saturating_add(1)
        .saturating_mul(MAX_LINE_BYTES as u64 + 1);
    while pos > 0 && newlines <= n {
        if len - pos > limit {
            return Err(unreadable(format!(
                "its last {n} line(s) are longer than {MAX_LINE_BYTES} bytes each"
            )));
        }
        let step = CHUNK.min(pos);
        pos -= step;
        f.seek(SeekFrom::Start(pos)).map_err(io("seek"))?;
        let mut chunk = vec![0u8; step as usize];
        f.read_exact(&mut chunk).map_err(io("read"))?;
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    let Some(body) = buf.strip_suffix(b"\n") else {
        return Err(unreadable(
            "its last line is incomplete (no newline at the end): it was cut short, e.g. by a \
             crash during a write"
                .into(),
        ));
    };
    let mut lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    if pos > 0 && !lines.is_empty() {
        // The first piece may start in the middle of a line.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    let from_end = lines.len() - skip;
    lines[skip..]
        .iter()
        .enumerate()
        .map(|(i, line)| {
            Record::from_json_line(line).map_err(|reason| {
                unreadable(format!(
                    "line {} from the end is not a record: {reason}",
                    from_end - i
                ))
            })
        })
        .collect()
}
