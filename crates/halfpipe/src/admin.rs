//! The admin API: HTTP/1.1 with JSON bodies over a Unix socket, and the Prometheus page on
//! a loopback TCP address.
//!
//! The socket's directory is 0700 and the socket 0600; every connection's peer
//! credentials are read and only the server's own user (or root) is served — a failure
//! to read them refuses the connection. Every request carries `Authorization: Bearer
//! TOKEN`; the endpoint's capability comes from one exhaustive table
//! ([`halfpipe_control::endpoint`]), checked before any handler runs, and each use of a
//! token is audited (by token id; the token itself is never logged).
//!
//! [`handle`] is the whole API without HTTP, so tests drive it directly too.

use std::convert::Infallible;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halfpipe_control::capability::{Capability, CapabilitySet};
use halfpipe_control::endpoint::{authorize, route, Endpoint, RouteError};
use halfpipe_control::mode::{Authority, Mode, ModeRequest};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::control::{parse_deadline, wall_ms};
use crate::server::ServerHandle;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Time a connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection may stay open.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Admin connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// The admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Directory or socket problems.
    #[error("admin socket {path}: {what}: {source}")]
    Io {
        /// The path.
        path: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Something else owns the path.
    #[error("admin socket {0}: exists and is not a socket; remove it or choose another control.admin_socket")]
    NotASocket(String),
}

fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> AdminError + 'a {
    move |source| AdminError::Io {
        path: path.display().to_string(),
        what,
        source,
    }
}

/// Binds the admin socket: directory created 0700 (or tightened to 0700), a stale socket
/// replaced, the socket made 0600.
pub fn bind_socket(path: &Path) -> Result<UnixListener, AdminError> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(path, "cannot create its directory"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(path, "cannot make its directory 0700"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(io_err(path, "cannot remove the stale socket"))?
        }
        Ok(_) => return Err(AdminError::NotASocket(path.display().to_string())),
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(io_err(path, "cannot bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(path, "cannot make it 0600"))?;
    Ok(l)
}

/// The user id this process runs as.
fn own_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Whether a peer may use the admin API: same user as the server, or root.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    match stream.peer_cred() {
        Ok(c) if c.uid() == own_uid() || c.uid() == 0 => Ok(()),
        Ok(c) => Err(format!(
            "peer uid {} is neither the server's nor root",
            c.uid()
        )),
        Err(e) => Err(format!("cannot read peer credentials: {e}")),
    }
}

/// A listener the admin side serves: Unix socket or TCP.
trait Accept {
    /// One accepted connection.
    type Conn: Send + 'static;
    /// The next connection.
    fn accept_conn(&self) -> impl std::future::Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Accept for UnixListener {
    type Conn = UnixStream;
    async fn accept_conn(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);
    async fn accept_conn(&self) -> std::io::Result<Self::Conn> {
        let (s, peer) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok((s, peer))
    }
}

/// Accepts forever: `admit` turns each connection into the future that serves it, or
/// refuses it (`None`); at most [`MAX_CONNECTIONS`] are served at once, the rest dropped.
async fn accept_each<L, F, Fut>(listener: L, admit: F)
where
    L: Accept,
    F: Fn(L::Conn) -> Option<Fut>,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(conn) = listener.accept_conn().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(serve) = admit(conn) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(target: "security", limit = MAX_CONNECTIONS, "admin connection limit hit");
            continue;
        };
        tokio::spawn(async move {
            serve.await;
            drop(slot);
        });
    }
}

/// Serves the API (JSON over HTTP/1.1) on one connection.
async fn serve_api<I>(io: I, server: ServerHandle)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_connection(TokioIo::new(io), move |req| {
        let server = server.clone();
        async move { Ok::<_, Infallible>(http_handle(&server, req).await) }
    })
    .await
}

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve_socket(listener: UnixListener, server: ServerHandle) {
    accept_each(listener, |stream| match peer_allowed(&stream) {
        Ok(()) => Some(serve_api(stream, server.clone())),
        Err(why) => {
            tracing::warn!(target: "security", reason = %why, "admin connection refused");
            None
        }
    })
    .await
}

/// Serves the admin API on a loopback TCP listener with mutual TLS (the client certificate
/// is checked by `config`; the bearer token still decides what it may do).
pub async fn serve_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    server: ServerHandle,
) {
    accept_each(listener, |(stream, peer)| {
        if !peer.ip().is_loopback() {
            tracing::warn!(target: "security", %peer, "admin TLS connection from off the machine refused");
            return None;
        }
        let (server, config) = (server.clone(), config.clone());
        Some(async move {
            match tokio::time::timeout(HEAD_TIMEOUT, crate::tls_stream::accept(config, stream))
                .await
            {
                Ok(Ok(tls)) => serve_api(tls, server).await,
                Ok(Err(e)) => {
                    tracing::warn!(target: "security", %peer, error = %e, "admin TLS handshake refused")
                }
                Err(_) => {
                    tracing::warn!(target: "security", %peer, "admin TLS handshake timed out")
                }
            }
        })
    })
    .await
}

/// Serves the metrics page on a loopback listener until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, server: ServerHandle) {
    accept_each(listener, |(stream, _)| {
        let server = server.clone();
        Some(serve_connection(
            TokioIo::new(stream),
            move |req: Request<Incoming>| {
                let resp = if req.uri().path() == "/metrics" {
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(server.metrics_page())))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"not found\n")))
                };
                std::future::ready(Ok::<_, Infallible>(resp.unwrap_or_default()))
            },
        ))
    })
    .await
}

async fn serve_connection<I, F, Fut>(io: I, f: F)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_BODY)
        .serve_connection(io, hyper::service::service_fn(f));
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
}

/// One HTTP request: read the (bounded) body, hand it to [`handle`], answer in JSON.
async fn http_handle(server: &ServerHandle, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let auth = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                error_body("request body too large or cut short"),
            )
        }
    };
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let (status, value) = handle(
        server,
        parts.method.as_str(),
        path,
        query,
        auth.as_deref(),
        &body,
    )
    .await;
    reply(status, value)
}

fn reply(status: StatusCode, value: Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn error_body(msg: impl Into<String>) -> Value {
    json!({ "error": msg.into() })
}

/// A handler's failure: HTTP status and message.
struct Fail(StatusCode, String);

impl Fail {
    fn bad(msg: impl Into<String>) -> Self {
        Fail(StatusCode::BAD_REQUEST, msg.into())
    }
}

/// The whole API without HTTP: `(status, JSON body)` for one request.
pub async fn handle(
    server: &ServerHandle,
    method: &str,
    path: &str,
    query: &str,
    bearer: Option<&str>,
    body: &[u8],
) -> (StatusCode, Value) {
    let route = match route(method, path) {
        Ok(r) => r,
        Err(RouteError::NotFound { .. }) => {
            return (
                StatusCode::NOT_FOUND,
                error_body(format!("no endpoint {path}")),
            )
        }
        Err(RouteError::MethodNotAllowed { .. }) => {
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                error_body(format!("{method} is not allowed on {path}")),
            )
        }
        Err(e) => return (StatusCode::BAD_REQUEST, error_body(e.to_string())),
    };
    let cp = server.control();
    let Some(bearer) = bearer else {
        return (
            StatusCode::UNAUTHORIZED,
            error_body("missing 'Authorization: Bearer TOKEN' (see 'halfpipe ctl --help')"),
        );
    };
    let token = match cp.authenticate(bearer) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(target: "security", endpoint = ?route.endpoint, reason = %e, "admin token refused");
            cp.audit(
                "token_use",
                vec![
                    ("endpoint".into(), route.endpoint.path_pattern().into()),
                    ("allowed".into(), "false".into()),
                    ("reason".into(), e.to_string()),
                ],
            );
            return (StatusCode::UNAUTHORIZED, error_body(e.to_string()));
        }
    };
    let allowed = authorize(route.endpoint, &token.caps).is_ok();
    cp.audit(
        "token_use",
        vec![
            ("token".into(), token.id.clone()),
            ("endpoint".into(), route.endpoint.path_pattern().into()),
            ("allowed".into(), allowed.to_string()),
        ],
    );
    if !allowed {
        return (
            StatusCode::FORBIDDEN,
            error_body(format!(
                "token {} ({}) lacks the capability {} needed for {}",
                token.id,
                token.name,
                route.endpoint.capability(),
                route.endpoint.path_pattern()
            )),
        );
    }
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    error_body(format!("body is not JSON: {e}")),
                )
            }
        }
    };
    let who = Authority::Token {
        id: token.id.clone(),
        caps: token.caps.clone(),
    };
    match dispatch(
        server,
        route.endpoint,
        route.param.as_deref(),
        query,
        &body,
        who,
    )
    .await
    {
        Ok(v) => (StatusCode::OK, v),
        Err(Fail(status, msg)) => (status, error_body(msg)),
    }
}

fn field<'a>(body: &'a Value, name: &str) -> Result<&'a str, Fail> {
    body.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| Fail::bad(format!("body needs a string field {name:?}")))
}

fn param(p: Option<&str>) -> Result<&str, Fail> {
    p.ok_or_else(|| Fail::bad("missing path parameter"))
}

async fn dispatch(
    server: &ServerHandle,
    endpoint: Endpoint,
    p: Option<&str>,
    query: &str,
    body: &Value,
    who: Authority,
) -> Result<Value, Fail> {
    let cp = server.control();
    let conflict = |e: String| Fail(StatusCode::CONFLICT, e);
    let not_found = |e: String| Fail(StatusCode::NOT_FOUND, e);
    Ok(match endpoint {
        Endpoint::Status => server.status(),
        Endpoint::SessionsList => json!({ "sessions": server.sessions_info() }),
        Endpoint::SessionsKill => {
            let id = param(p)?;
            server.kill_session(id).map_err(not_found)?;
            json!({ "killed": id })
        }
        Endpoint::ModeGet => mode_json(&cp.mode_state()),
        Endpoint::ModeSet => {
            let target: Mode = field(body, "mode")?
                .parse()
                .map_err(|e: halfpipe_control::mode::UnknownMode| Fail::bad(e.to_string()))?;
            let req = ModeRequest {
                target,
                by: who,
                confirm: body
                    .get("confirm")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                reason: body
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("set by an administrator")
                    .to_string(),
                now_ms: wall_ms(),
            };
            mode_json(&cp.request_mode(req).map_err(|e| conflict(e.to_string()))?)
        }
        Endpoint::ModeUnfreeze => {
            mode_json(&cp.unfreeze(who).map_err(|e| conflict(e.to_string()))?)
        }
        Endpoint::TokensCreate => {
            let name = field(body, "name")?;
            let caps = CapabilitySet::parse_list(field(body, "caps")?)
                .map_err(|e| Fail::bad(e.to_string()))?;
            if caps.is_empty() {
                return Err(Fail::bad("a token needs at least one capability"));
            }
            let expires = match body.get("expires_in").and_then(Value::as_str) {
                None => None,
                Some(s) => Some(
                    parse_deadline("expires_in", s, wall_ms())
                        .map_err(Fail::bad)?
                        .1,
                ),
            };
            let (info, secret) = cp
                .tokens()
                .create(name, caps, expires, wall_ms())
                .map_err(|e| Fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            cp.audit(
                "token_created",
                vec![
                    ("token".into(), info.id.clone()),
                    ("name".into(), info.name.clone()),
                    ("caps".into(), info.caps.to_list()),
                ],
            );
            let mut v = token_json(&info);
            v["token"] = Value::String(secret.expose().to_string());
            v
        }
        Endpoint::TokensList => {
            let list = cp
                .tokens()
                .list()
                .map_err(|e| Fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            json!({ "tokens": list.iter().map(token_json).collect::<Vec<_>>() })
        }
        Endpoint::TokensRevoke => {
            let id = param(p)?;
            cp.tokens()
                .revoke(id)
                .map_err(|e| not_found(e.to_string()))?;
            cp.audit("token_revoked", vec![("token".into(), id.into())]);
            json!({ "revoked": id })
        }
        Endpoint::UsersList => json!({ "users": server.users_info() }),
        Endpoint::UsersAdd => {
            let name = field(body, "name")?;
            match body.get("public_key").and_then(Value::as_str) {
                Some(key) => {
                    server.add_user(name, key).map_err(conflict)?;
                    json!({ "added": name })
                }
                // No key given: the exit makes the pair and hands out a link, once.
                None => server.add_user_with_link(name).map_err(conflict)?,
            }
        }
        Endpoint::UsersRemove => {
            let name = param(p)?;
            server.remove_user(name).map_err(conflict)?;
            json!({ "removed": name })
        }
        Endpoint::UsersDisable | Endpoint::UsersEnable => {
            let name = param(p)?;
            let disabled = endpoint == Endpoint::UsersDisable;
            server.set_user_disabled(name, disabled).map_err(conflict)?;
            json!({ "user": name, "disabled": disabled })
        }
        Endpoint::LogVerify => server.verify_log(),
        Endpoint::LogTail => {
            let n = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("n="))
                .map(|n| {
                    n.parse::<usize>()
                        .map_err(|_| Fail::bad("n must be a number"))
                })
                .transpose()?
                .unwrap_or(20)
                .min(10_000);
            server
                .log_tail(n)
                .map_err(|e| Fail(StatusCode::INTERNAL_SERVER_ERROR, e))?
        }
        Endpoint::Reload => server.reload().map_err(Fail::bad)?,
        Endpoint::KeysList => server.keys_info().map_err(conflict)?,
        Endpoint::KeysRotate => {
            let overlap = match body.get("overlap").and_then(Value::as_str) {
                None => None,
                Some(s) => Some(
                    parse_deadline("overlap", s, wall_ms())
                        .map_err(Fail::bad)?
                        .0,
                ),
            };
            server.rotate_keys(overlap).map_err(conflict)?
        }
        Endpoint::UsersPolicy => {
            let name = param(p)?;
            server.set_user_policy(name, body).map_err(conflict)?
        }
    })
}

fn mode_json(m: &halfpipe_control::mode::ModeState) -> Value {
    json!({
        "mode": m.mode.name(),
        "frozen": m.frozen,
        "changed_by": m.changed_by,
        "changed_at_ms": m.changed_at_ms,
        "reason": m.reason,
    })
}

fn token_json(t: &halfpipe_state::token::TokenInfo) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "caps": t.caps.iter().map(Capability::name).collect::<Vec<_>>(),
        "created_ms": t.created_ms,
        "expires_ms": t.expires_ms,
        "revoked": t.revoked,
    })
}
