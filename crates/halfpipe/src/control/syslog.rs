//! Forwarding audit records to a remote syslog over TLS (RFC 5425: octet-counted RFC 5424
//! messages).
//!
//! The local audit log stays the record of truth; forwarding is a copy for a machine an
//! attacker on the exit does not control. Each line the audit writer has made durable is
//! queued (bounded; when the collector is away longer than the queue lasts, the oldest are
//! dropped and counted, and a `forward_gap` notice says how many) and sent as one message
//! whose MSGID is the record's kind and whose MSG is the record's JSON line, seq and hash
//! included, so the collector can check the chain too. The connection is re-made with
//! backoff; a message that failed is sent again on the next connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Lines held for the collector at most.
pub const QUEUE: usize = 16_384;
/// Connect and TLS handshake time limit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that takes longer means the collector is stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// RFC 5424 PRI: facility 13 (log audit) × 8 + severity 5 (notice).
const PRI: u8 = 13 * 8 + 5;

/// Where to forward.
#[derive(Clone, Debug)]
pub struct SyslogSettings {
    /// `host:port` of the collector (RFC 5425's port is 6514).
    pub address: String,
    /// The name its certificate must carry.
    pub server_name: ServerName<'static>,
    /// Trust (CA file or pin) and an optional client certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// HOSTNAME in the messages.
    pub hostname: String,
}

/// The writer side: hands lines to the forwarding task without blocking.
#[derive(Clone)]
pub struct SyslogQueue {
    tx: mpsc::Sender<String>,
    dropped: Arc<AtomicU64>,
}

impl SyslogQueue {
    /// Queues one audit line; when the queue is full the line is dropped and counted.
    pub fn push(&self, line: &str) {
        if self.tx.try_send(line.to_owned()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped so far because the collector was away too long.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Starts the forwarding task on the current runtime.
pub fn spawn(settings: SyslogSettings) -> SyslogQueue {
    let (tx, rx) = mpsc::channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    tokio::spawn(forward(settings, rx, dropped.clone()));
    SyslogQueue { tx, dropped }
}

/// One RFC 5425 frame: `MSG-LEN SP SYSLOG-MSG`, the message in RFC 5424 form.
pub fn frame(line: &str, hostname: &str, procid: u32) -> Vec<u8> {
    let record: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    let time_ms = record["time_ms"].as_u64().unwrap_or(0);
    let timestamp = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(time_ms));
    let msgid = printable(record["kind"].as_str().unwrap_or("-"), 32);
    let host = printable(hostname, 255);
    let msg = format!("<{PRI}>1 {timestamp} {host} halfpipe {procid} {msgid} - {line}");
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

/// RFC 5424 header fields: printable US-ASCII without spaces, at most `max`, `-` if empty.
fn printable(s: &str, max: usize) -> String {
    let v: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

async fn forward(
    settings: SyslogSettings,
    mut rx: mpsc::Receiver<String>,
    dropped: Arc<AtomicU64>,
) {
    let procid = std::process::id();
    let mut pending: Option<String> = None;
    let mut reported_drops = 0;
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut conn = match connect(&settings).await {
            Ok(c) => {
                backoff = Duration::from_millis(200);
                tracing::info!(collector = %settings.address, "audit forwarding connected");
                c
            }
            Err(e) => {
                tracing::warn!(collector = %settings.address, error = %e, "audit forwarding: cannot connect; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        loop {
            let now_dropped = dropped.load(Ordering::Relaxed);
            let line = if now_dropped > reported_drops {
                // Say so in the stream itself, so the collector sees the gap.
                let gap = now_dropped - reported_drops;
                reported_drops = now_dropped;
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                format!(r#"{{"kind":"forward_gap","time_ms":{t},"dropped":{gap}}}"#)
            } else if let Some(l) = pending.take() {
                l
            } else {
                match rx.recv().await {
                    Some(l) => l,
                    None => return,
                }
            };
            let bytes = frame(&line, &settings.hostname, procid);
            let sent = tokio::time::timeout(WRITE_TIMEOUT, async {
                conn.write_all(&bytes).await?;
                conn.flush().await
            })
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::warn!(collector = %settings.address, "audit forwarding: connection lost; reconnecting");
                pending = Some(line);
                break;
            }
        }
    }
}

async fn connect(s: &SyslogSettings) -> std::io::Result<crate::tls_stream::ClientTlsStream> {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(&s.address).await?;
        crate::transport::tune_socket(&tcp)?;
        crate::tls_stream::connect(s.tls.clone(), s.server_name.clone(), tcp).await
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_octet_counted_rfc5424_messages() {
        let line = r#"{"seq":3,"time_ms":1700000000123,"kind":"session_opened","fields":{"user":"alice"},"prev":"00","hash":"11"}"#;
        let f = frame(line, "exit one", 42);
        let text = String::from_utf8(f).unwrap();
        let (len, msg) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        assert_eq!(
            msg,
            format!("<109>1 2023-11-14T22:13:20.123Z exitone halfpipe 42 session_opened - {line}")
        );
        // A line that is not JSON still frames (MSGID "-"), and a non-ASCII host is cleaned.
        let f = String::from_utf8(frame("garbage", "ñ", 1)).unwrap();
        assert!(
            f.ends_with("<109>1 1970-01-01T00:00:00.000Z - halfpipe 1 - - garbage"),
            "{f}"
        );
    }
}
