//! `halfpipe ctl`: the admin API's client. It sends one request over the Unix socket and
//! renders the JSON answer for people (or passes it through with `--json`).
//!
//! Exit codes mean something, for scripts:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | the server failed (5xx) or answered something unreadable |
//! | 2 | the request was wrong (usage, 400) |
//! | 3 | the token was refused (401) or lacks the capability (403) |
//! | 4 | no such session, token or user (404) |
//! | 5 | refused as it stands (409: e.g. leaving LOCKDOWN without confirmation) |
//! | 6 | the server could not be reached |
//! | 7 | `log verify` found problems |

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// How long one admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read.
const MAX_ANSWER: usize = 16 << 20;

/// A failed `ctl` call, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The socket could not be reached.
    #[error("cannot reach the admin API at {path}: {source} (is the server running? is --socket, --tcp or --config right?)")]
    Unreachable {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// No token was given.
    #[error("no admin token: pass --token-file FILE, set HALFPIPE_TOKEN, or pass --config so the bootstrap token in the state directory is used")]
    NoToken,
    /// The token file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server answered with an error.
    #[error("{message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The exchange itself failed.
    #[error("admin request failed: {0}")]
    Protocol(String),
    /// `log verify` found problems (the report was printed).
    #[error("the audit log does not verify")]
    LogInvalid,
}

impl CtlError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Unreachable { .. } => 6,
            CtlError::NoToken | CtlError::TokenFile { .. } => 3,
            CtlError::Server { status, .. } => match status {
                400 | 405 | 413 => 2,
                401 | 403 => 3,
                404 => 4,
                409 => 5,
                _ => 1,
            },
            CtlError::Protocol(_) => 1,
            CtlError::LogInvalid => 7,
        }
    }
}

/// Where the admin API listens.
pub enum AdminAddr {
    /// The Unix socket.
    Unix(PathBuf),
    /// The loopback TCP listener with mutual TLS.
    Tls {
        /// Its address.
        addr: std::net::SocketAddr,
        /// Trust for the server's certificate and the client certificate to present.
        config: std::sync::Arc<rustls::ClientConfig>,
    },
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Unix(p) => write!(f, "{}", p.display()),
            AdminAddr::Tls { addr, .. } => write!(f, "{addr} (TLS)"),
        }
    }
}

/// Where the admin API is and which token to present.
pub struct CtlClient {
    addr: AdminAddr,
    token: String,
}

/// Reads a token: the file's first line, trimmed.
pub fn read_token(path: &Path) -> Result<String, CtlError> {
    let text = std::fs::read_to_string(path).map_err(|source| CtlError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    let t = text.lines().next().unwrap_or("").trim().to_string();
    if t.is_empty() {
        return Err(CtlError::NoToken);
    }
    Ok(t)
}

impl CtlClient {
    /// A client for the API at `addr` presenting `token`.
    pub fn new(addr: AdminAddr, token: String) -> Self {
        Self { addr, token }
    }

    /// One request; the JSON answer on 2xx, [`CtlError::Server`] otherwise.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, body))
            .await
            .map_err(|_| CtlError::Protocol(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        let unreachable = |source| CtlError::Unreachable {
            path: self.addr.to_string(),
            source,
        };
        match &self.addr {
            AdminAddr::Unix(p) => {
                let s = UnixStream::connect(p).await.map_err(unreachable)?;
                self.request_on(s, method, path, body).await
            }
            AdminAddr::Tls { addr, config } => {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(unreachable)?;
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = crate::tls_stream::connect(config.clone(), name, tcp)
                    .await
                    .map_err(unreachable)?;
                self.request_on(tls, method, path, body).await
            }
        }
    }

    async fn request_on<I>(
        &self,
        io: I,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let proto = |e: hyper::Error| CtlError::Protocol(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(proto)?;
        tokio::spawn(conn);
        let payload = body
            .map(|b| serde_json::to_vec(&b).unwrap_or_default())
            .unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "halfpipe-admin")
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| CtlError::Protocol(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(proto)?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| CtlError::Protocol(e.to_string()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| CtlError::Protocol(format!("answer is not JSON: {e}")))?;
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("error without a message")
                .to_string();
            Err(CtlError::Server { status, message })
        }
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// Human rendering of `status`.
pub fn render_status(v: &Value) -> String {
    let mut out = format!(
        "mode:      {}{}\n  set by {}: {}\nuptime:    {} s\nsessions:  {} ({} streams)\nusers:     {}\n",
        s(v, "mode"),
        if v["frozen"].as_bool() == Some(true) {
            " (de-escalation frozen: 'halfpipe ctl mode unfreeze')"
        } else {
            ""
        },
        s(v, "mode_changed_by"),
        s(v, "mode_reason"),
        s(v, "uptime_s"),
        s(v, "sessions"),
        s(v, "streams"),
        s(v, "users"),
    );
    if let Some(a) = v["audit_failure"].as_str() {
        out += &format!("AUDIT LOG FAILING: {a}\n");
    }
    if let Some(legs) = v["legs"].as_object() {
        let legs: Vec<String> = legs.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out += &format!(
            "legs:      {}\n",
            if legs.is_empty() {
                "none".into()
            } else {
                legs.join(", ")
            }
        );
    }
    if let Some(bytes) = v["bytes"].as_array() {
        for b in bytes
            .iter()
            .filter(|b| b["up"].as_u64().unwrap_or(0) + b["down"].as_u64().unwrap_or(0) > 0)
        {
            out += &format!(
                "bytes:     {} up {} down {}\n",
                s(b, "transport"),
                s(b, "up"),
                s(b, "down")
            );
        }
    }
    for (title, key) in [
        ("handshake failures", "handshake_failures"),
        ("limit hits", "limit_hits"),
    ] {
        if let Some(m) = v[key].as_object().filter(|m| !m.is_empty()) {
            let parts: Vec<String> = m.iter().map(|(k, n)| format!("{k} {n}")).collect();
            out += &format!("{title}: {}\n", parts.join(", "));
        }
    }
    out += "tripwires:\n";
    for t in v["tripwires"].as_array().into_iter().flatten() {
        out += &format!(
            "  {:<32} {:<16} fires {:<4} {}\n",
            s(t, "kind"),
            t["key"].as_str().unwrap_or("(all)"),
            s(t, "fires"),
            if t["in_episode"].as_bool() == Some(true) {
                "FIRING"
            } else {
                "quiet"
            }
        );
    }
    out
}

/// Human rendering of a list answer (`sessions`, `tokens`, `users`) as aligned columns.
pub fn render_table(v: &Value, list: &str, columns: &[&str]) -> String {
    let rows: Vec<Vec<String>> = v[list]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            columns
                .iter()
                .map(|c| match &r[*c] {
                    Value::Array(a) => a
                        .iter()
                        .map(|x| {
                            x.as_str()
                                .map(str::to_owned)
                                .unwrap_or_else(|| x.to_string())
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    _ => s(r, c),
                })
                .collect()
        })
        .collect();
    if rows.is_empty() {
        return format!("no {list}\n");
    }
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(columns.to_vec());
    for r in &rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exit_codes_follow_the_table() {
        let server = |status| CtlError::Server {
            status,
            message: String::new(),
        };
        assert_eq!(server(400).exit_code(), 2);
        assert_eq!(server(401).exit_code(), 3);
        assert_eq!(server(403).exit_code(), 3);
        assert_eq!(server(404).exit_code(), 4);
        assert_eq!(server(409).exit_code(), 5);
        assert_eq!(server(500).exit_code(), 1);
        assert_eq!(CtlError::LogInvalid.exit_code(), 7);
        assert_eq!(CtlError::NoToken.exit_code(), 3);
    }

    #[test]
    fn tables_align_and_join_lists() {
        let v = json!({ "tokens": [
            { "id": "ab", "name": "ops", "caps": ["status", "sessions.read"] },
            { "id": "cdef", "name": "x", "caps": [] },
        ]});
        let t = render_table(&v, "tokens", &["id", "name", "caps"]);
        assert_eq!(
            t,
            "id    name  caps\nab    ops   status,sessions.read\ncdef  x\n"
        );
        assert_eq!(render_table(&json!({}), "users", &["name"]), "no users\n");
    }
}
