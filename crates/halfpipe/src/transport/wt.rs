//! `wt://host:port/path` legs: WebTransport over HTTP/3 (the `wtransport` crate), one
//! bidirectional stream per leg, with the same QUIC tuning as `quic://`.
//!
//! The client sends an extended CONNECT for `path` with the settings current browsers
//! expect (wtransport advertises them); the exit accepts only sessions on its configured
//! path and answers every other request with `404 Not Found`, as a web server would. TLS
//! verification uses the URL's host (the `[tls] server_name` override does not apply).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream, ServerConfig};

use super::quic::{
    dual_stack_leg_socket, endpoint_config, leg_socket, server_parts, transport_config, QuicOptions,
};
use super::{BoxedLeg, DialSettings, TransportError, Upgrade};
use crate::leg_url::LegUrl;

/// The `quic://` tuning, with room for HTTP/3's own streams (control and QPACK streams
/// each way, the CONNECT request stream) beside the leg's stream.
fn wt_transport(o: &QuicOptions, server: bool, payload: u16) -> quinn::TransportConfig {
    let mut t = transport_config(o, server, payload);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(8));
    t
}

fn wt_err(url: &LegUrl, e: impl std::fmt::Display) -> TransportError {
    TransportError::Quic {
        url: url.to_string(),
        reason: format!("WebTransport: {e}"),
    }
}

/// Dials a `wt://` leg.
pub async fn dial(
    url: &LegUrl,
    settings: &DialSettings,
    timeout: Duration,
) -> Result<BoxedLeg, TransportError> {
    let tls = settings
        .tls
        .as_ref()
        .ok_or_else(|| TransportError::TlsNotConfigured(url.to_string()))?;
    let mut rustls_cfg = (*tls.config).clone();
    rustls_cfg.alpn_protocols = vec![wtransport::tls::WEBTRANSPORT_ALPN.to_vec()];
    let socket = dual_stack_leg_socket().map_err(|source| TransportError::Connect {
        url: url.to_string(),
        source,
    })?;
    // wtransport resolves the name itself, so loopback is read from the URL.
    let payload = settings.quic.udp_payload(url.host_is_loopback());
    let mut cfg = ClientConfig::builder()
        .with_bind_socket(socket)
        .with_custom_tls_and_transport(rustls_cfg, wt_transport(&settings.quic, false, payload))
        .build();
    *cfg.quic_endpoint_config_mut() = endpoint_config(payload);
    let endpoint = Endpoint::client(cfg).map_err(|source| TransportError::Connect {
        url: url.to_string(),
        source,
    })?;
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let target = format!("https://{host}:{}{}", url.port, url.path);
    let connect = async {
        let conn = endpoint.connect(target).await.map_err(|e| wt_err(url, e))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| wt_err(url, e))?
            .await
            .map_err(|e| wt_err(url, e))?;
        Ok(Box::new(WtLeg {
            _endpoint: Some(endpoint),
            _conn: conn,
            send,
            recv,
        }) as BoxedLeg)
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout {
            what: "WebTransport handshake",
            url: url.to_string(),
            after: timeout,
        }),
    }
}

/// A WebTransport endpoint accepting legs on one path.
pub struct WtLegListener {
    endpoint: Endpoint<wtransport::endpoint::endpoint_side::Server>,
    path: Arc<str>,
}

impl WtLegListener {
    /// Binds a UDP endpoint on `url`'s address.
    pub fn bind(
        url: &LegUrl,
        tls: Arc<rustls::ServerConfig>,
        o: &QuicOptions,
    ) -> Result<Self, TransportError> {
        let (addr, rustls_cfg) = server_parts(url, &tls, wtransport::tls::WEBTRANSPORT_ALPN)?;
        let bind_err = |source: io::Error| TransportError::Bind {
            url: url.to_string(),
            source,
        };
        let payload = o.udp_payload(addr.ip().is_loopback());
        let mut cfg = ServerConfig::builder()
            .with_bind_socket(leg_socket(addr).map_err(bind_err)?)
            .with_custom_tls_and_transport(rustls_cfg, wt_transport(o, true, payload))
            .build();
        *cfg.quic_endpoint_config_mut() = endpoint_config(payload);
        let endpoint = Endpoint::server(cfg).map_err(bind_err)?;
        Ok(Self {
            endpoint,
            path: url.path.as_str().into(),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next session attempt; the upgrade completes QUIC and HTTP/3, checks the path
    /// (anything else: 404) and takes the leg's stream.
    pub async fn accept(&self) -> io::Result<(SocketAddr, Upgrade)> {
        let incoming = self.endpoint.accept().await;
        let peer = incoming.remote_address();
        let path = self.path.clone();
        let upgrade: Upgrade = Box::pin(async move {
            let request = incoming.await.map_err(io::Error::other)?;
            if request.path() != &*path {
                request.not_found().await;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "WebTransport session on another path: 404 served",
                ));
            }
            let conn = request.accept().await.map_err(io::Error::other)?;
            let (send, recv) = conn.accept_bi().await.map_err(io::Error::other)?;
            Ok(Box::new(WtLeg {
                _endpoint: None,
                _conn: conn,
                send,
                recv,
            }) as BoxedLeg)
        });
        Ok((peer, upgrade))
    }
}

/// One leg: the stream halves, with the session (and client endpoint) kept alive.
struct WtLeg {
    _endpoint: Option<Endpoint<wtransport::endpoint::endpoint_side::Client>>,
    _conn: Connection,
    send: SendStream,
    recv: RecvStream,
}

impl super::LegIo for WtLeg {
    fn channel_binding(&self) -> Option<halfpipe_core::handshake::ChannelBinding> {
        crate::channel_binding::exported(|o, l, c| self._conn.export_keying_material(o, l, c))
    }
}

impl AsyncRead for WtLeg {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for WtLeg {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().send).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_shutdown(cx)
    }
}
