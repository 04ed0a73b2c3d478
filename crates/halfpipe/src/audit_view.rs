//! The audit-log verification report as JSON (admin API, `--json`) and as text.

use halfpipe_audit::Report;
use serde_json::{json, Value};

/// The report as JSON: `ok`, counts, and every finding and notice as a sentence.
pub fn audit_report_json(r: &Report) -> Value {
    json!({
        "ok": r.is_ok(),
        "lines": r.lines,
        "records": r.records,
        "checkpoints": r.checkpoints,
        "last_signed_count": r.last_signed_count,
        "unsigned_tail": r.unsigned_tail,
        "genesis_key": r.genesis_key.map(hex::encode),
        "findings": r.findings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "notices": r.notices.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

/// The report as text, one line per finding.
pub fn render_audit_report(r: &Report) -> String {
    format!("{r}\n")
}

/// Text for a report that arrived as JSON (from the admin API).
pub fn render_audit_json(v: &Value) -> String {
    let mut out = format!(
        "{} record(s) on {} line(s), {} valid checkpoint(s), last signed count {}\n",
        v["records"], v["lines"], v["checkpoints"], v["last_signed_count"]
    );
    for (prefix, key) in [("FAIL", "findings"), ("note", "notices")] {
        for f in v[key].as_array().into_iter().flatten() {
            out += &format!("{prefix}: {}\n", f.as_str().unwrap_or_default());
        }
    }
    out += if v["ok"].as_bool() == Some(true) {
        "OK: the log verifies\n"
    } else {
        "the log does NOT verify\n"
    };
    out
}
