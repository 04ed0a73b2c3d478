//! `ws://` and `wss://` legs: a WebSocket (binary messages) on a configurable path, over
//! TCP or TLS 1.3, so a leg can cross an ordinary reverse proxy or CDN.
//!
//! The server reads the HTTP request itself: only a well-formed WebSocket upgrade on the
//! configured path becomes a leg; everything else (other paths, a bad key, plain GETs,
//! bytes that are not HTTP) gets the listener's [`Decoy`], the same answer an ordinary web
//! server would give.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::decoy::Decoy;
use super::tcp::{self, TcpLegListener};
use super::{BoxedLeg, DialSettings, TransportError, Upgrade};
use crate::leg_url::{LegUrl, Scheme};

/// Largest HTTP request head read before deciding (longer: decoy).
const MAX_HEAD: usize = 8 * 1024;
/// Plaintext carried per WebSocket message we send.
const WRITE_MESSAGE: usize = 64 * 1024;

/// WebSocket settings, with documented defaults.
#[derive(Clone, Debug)]
pub struct WsOptions {
    /// `Host` header to send (default: the URL's host), for CDNs that route on it.
    pub host: Option<String>,
    /// Extra request headers (client).
    pub headers: Vec<(String, String)>,
    /// Largest message accepted (default 1 MiB); bigger ones end the leg with an error.
    pub max_message: usize,
}

impl Default for WsOptions {
    fn default() -> Self {
        Self {
            host: None,
            headers: Vec::new(),
            max_message: 1 << 20,
        }
    }
}

fn ws_config(o: &WsOptions) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(o.max_message))
        .max_frame_size(Some(o.max_message))
}

fn ws_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Dials a `ws://` or `wss://` leg.
pub async fn dial(
    url: &LegUrl,
    settings: &DialSettings,
    timeout: Duration,
) -> Result<BoxedLeg, TransportError> {
    let tcp = tcp::connect(url, timeout).await?;
    if url.scheme == Scheme::Wss {
        let tls = tcp::tls_client(url, settings.tls.as_ref(), tcp, timeout).await?;
        client_handshake(url, &settings.ws, tls, timeout).await
    } else {
        client_handshake(url, &settings.ws, tcp, timeout).await
    }
}

async fn client_handshake<S>(
    url: &LegUrl,
    o: &WsOptions,
    stream: S,
    timeout: Duration,
) -> Result<BoxedLeg, TransportError>
where
    S: super::LegIo,
{
    let fail = |e: &dyn std::fmt::Display| TransportError::Connect {
        url: url.to_string(),
        source: ws_err(format!("WebSocket handshake: {e}")),
    };
    let ws_url = format!(
        "{}://{}:{}{}",
        if url.scheme == Scheme::Wss {
            "wss"
        } else {
            "ws"
        },
        if url.host.contains(':') {
            format!("[{}]", url.host)
        } else {
            url.host.clone()
        },
        url.port,
        url.path
    );
    let mut req = ws_url.into_client_request().map_err(|e| fail(&e))?;
    if let Some(host) = &o.host {
        let v = HeaderValue::from_str(host).map_err(|e| fail(&e))?;
        req.headers_mut().insert("host", v);
    }
    for (k, v) in &o.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| fail(&e))?;
        let value = HeaderValue::from_str(v).map_err(|e| fail(&e))?;
        req.headers_mut().insert(name, value);
    }
    let handshake = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config(o)));
    match tokio::time::timeout(timeout, handshake).await {
        Err(_) => Err(TransportError::Timeout {
            what: "WebSocket handshake",
            url: url.to_string(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(fail(&e)),
        Ok(Ok((ws, _response))) => Ok(Box::new(WsLeg::new(ws))),
    }
}

/// A WebSocket listener (`ws://` or `wss://`) with its decoy.
pub struct WsLegListener {
    tcp: TcpLegListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    path: Arc<str>,
    decoy: Decoy,
    options: WsOptions,
}

impl WsLegListener {
    /// Binds `url`; `tls` is set for `wss://`.
    pub async fn bind(
        url: &LegUrl,
        tls: Option<Arc<rustls::ServerConfig>>,
        decoy: Decoy,
        options: WsOptions,
    ) -> Result<Self, TransportError> {
        Ok(Self {
            tcp: TcpLegListener::bind(url, None).await?,
            tls,
            path: url.path.as_str().into(),
            decoy,
            options,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts a connection; the upgrade runs TLS (wss), reads the HTTP request, and
    /// either completes the WebSocket handshake or hands the connection to the decoy.
    pub async fn accept(&self) -> io::Result<(SocketAddr, Upgrade)> {
        let (tcp, peer) = self.tcp.accept_tcp().await?;
        let (tls, path, decoy, options) = (
            self.tls.clone(),
            self.path.clone(),
            self.decoy.clone(),
            self.options.clone(),
        );
        let upgrade: Upgrade = Box::pin(async move {
            match tls {
                Some(cfg) => {
                    let s = crate::tls_stream::accept(cfg, tcp).await?;
                    server_handshake(s, &path, &decoy, &options).await
                }
                None => server_handshake(tcp, &path, &decoy, &options).await,
            }
        });
        Ok((peer, upgrade))
    }
}

/// Reads up to the end of the HTTP head (or `MAX_HEAD`, or EOF).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while head.len() < MAX_HEAD {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Ok(head)
}

/// The `Sec-WebSocket-Key` of a valid upgrade request for `path`, and the head length.
fn upgrade_key(head: &[u8], path: &str) -> Option<(String, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = req.parse(head).ok()? else {
        return None;
    };
    if req.method != Some("GET") || req.path != Some(path) || req.version != Some(1) {
        return None;
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return None;
    }
    if header("sec-websocket-version") != Some("13") {
        return None;
    }
    let key = header("sec-websocket-key")?.trim();
    let raw = base64::engine::general_purpose::STANDARD.decode(key).ok()?;
    (raw.len() == 16).then(|| (key.to_owned(), len))
}

async fn server_handshake<S>(
    mut stream: S,
    path: &str,
    decoy: &Decoy,
    options: &WsOptions,
) -> io::Result<BoxedLeg>
where
    S: super::LegIo,
{
    let head = read_head(&mut stream).await?;
    let Some((key, len)) = upgrade_key(&head, path) else {
        decoy.spawn(stream, head);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a WebSocket leg request: decoy served",
        ));
    };
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.flush().await?;
    let rest = head[len..].to_vec();
    let ws =
        WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(ws_config(options)))
            .await;
    Ok(Box::new(WsLeg::new(ws)))
}

/// A WebSocket as a byte pipe: each write is one binary message; reads hand out message
/// payloads in order. Pings are answered by tungstenite; text messages are a protocol error.
struct WsLeg<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
}

impl<S> WsLeg<S> {
    fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
        }
    }
}

impl<S: super::LegIo> super::LegIo for WsLeg<S> {
    fn channel_binding(&self) -> Option<halfpipe_core::handshake::ChannelBinding> {
        self.ws.get_ref().channel_binding()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsLeg<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(ws_err("text message on a WebSocket leg")))
                }
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsLeg<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_err)?;
        let n = data.len().min(WRITE_MESSAGE);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&data[..n])))
            .map_err(ws_err)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_err)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(ws_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, key: &str, version: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n\r\n").into_bytes()
    }

    #[test]
    fn only_a_well_formed_upgrade_on_the_path_is_a_leg() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        assert_eq!(
            upgrade_key(&req("/hp", key, "13"), "/hp").map(|k| k.0),
            Some(key.into())
        );
        assert!(upgrade_key(&req("/other", key, "13"), "/hp").is_none());
        assert!(
            upgrade_key(&req("/hp", "c2hvcnQ=", "13"), "/hp").is_none(),
            "8-byte key"
        );
        assert!(upgrade_key(&req("/hp", "not base64!", "13"), "/hp").is_none());
        assert!(upgrade_key(&req("/hp", key, "8"), "/hp").is_none());
        assert!(upgrade_key(b"GET /hp HTTP/1.1\r\nHost: x\r\n\r\n", "/hp").is_none());
        assert!(upgrade_key(b"\x16\x03\x01\x02\x00garbage", "/hp").is_none());
    }
}
