//! `quic://` legs: one QUIC connection (quinn, TLS 1.3 inside) carrying one bidirectional
//! stream per leg.
//!
//! Tuned for a tunnel rather than quinn's web defaults: an 8 MiB stream window (quinn's
//! default of 1.25 MB caps one stream at about 100 Mbit/s per 100 ms of RTT), cubic or BBR
//! congestion control, GSO/GRO through quinn-udp where the platform has them, connection
//! migration left on, and address validation (Retry) once handshakes pile up on a listener.
//!
//! Both ends use the ALPN `h3` by default, so handshakes look like ordinary HTTP/3. QUIC
//! requires an agreed ALPN (RFC 9001 §8.1), so a prober offering another one gets the TLS
//! `no_application_protocol` alert, exactly as from any HTTP/3 server; one that gets through
//! the handshake meets silence like every other unauthenticated peer.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, IdleTimeout, RecvStream, SendStream, TransportConfig, VarInt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{BoxedLeg, DialSettings, TransportError, Upgrade};
use crate::leg_url::LegUrl;

/// Receive window of the leg's stream.
const STREAM_WINDOW: u32 = 8 << 20;
/// Receive window of the whole connection (one stream plus slack).
const CONNECTION_WINDOW: u32 = 12 << 20;

/// Congestion controller for QUIC legs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (the default, as for TCP).
    #[default]
    Cubic,
    /// BBR (better on lossy long paths; experimental in quinn).
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Self::Cubic),
            "bbr" => Ok(Self::Bbr),
            other => Err(format!(
                "{other:?} is not a congestion controller: use \"cubic\" or \"bbr\""
            )),
        }
    }
}

/// QUIC tuning, with documented defaults.
#[derive(Clone, Debug)]
pub struct QuicOptions {
    /// Congestion controller (default cubic).
    pub congestion: Congestion,
    /// ALPN the client offers and the server requires (default `h3`).
    pub alpn: String,
    /// Handshakes in flight on one listener above which new peers must first prove their
    /// address with a Retry round trip (default 32).
    pub retry_above: usize,
    /// A connection with no packets for this long is closed (default 60 s).
    pub idle_timeout: Duration,
    /// Keepalive interval, so NATs keep the mapping (default 10 s).
    pub keepalive: Duration,
}

impl Default for QuicOptions {
    fn default() -> Self {
        Self {
            congestion: Congestion::Cubic,
            alpn: "h3".into(),
            retry_above: 32,
            idle_timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(10),
        }
    }
}

fn transport_config(o: &QuicOptions, server: bool) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(o.keepalive))
        .max_idle_timeout(IdleTimeout::try_from(o.idle_timeout).ok())
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    // A leg is one stream: the server lets the client open exactly one.
    t.max_concurrent_bidi_streams(VarInt::from_u32(if server { 1 } else { 0 }));
    match o.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
    };
    Arc::new(t)
}

fn quic_err(url: &LegUrl, e: impl std::fmt::Display) -> TransportError {
    TransportError::Quic {
        url: url.to_string(),
        reason: e.to_string(),
    }
}

/// Dials `url`: a fresh UDP endpoint per leg (so legs do not share a path), a QUIC
/// handshake verified with the client's TLS trust, and one bidirectional stream.
pub async fn dial(
    url: &LegUrl,
    settings: &DialSettings,
    timeout: Duration,
) -> Result<BoxedLeg, TransportError> {
    let tls = settings
        .tls
        .as_ref()
        .ok_or_else(|| TransportError::TlsNotConfigured(url.to_string()))?;
    let host = tls.server_name.clone().unwrap_or_else(|| url.host.clone());
    tls.name_for(url)?; // the same name check as tls://
    let mut rustls_cfg = (*tls.config).clone();
    rustls_cfg.alpn_protocols = vec![settings.quic.alpn.as_bytes().to_vec()];
    let crypto = QuicClientConfig::try_from(Arc::new(rustls_cfg)).map_err(|e| quic_err(url, e))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config(&settings.quic, false));

    let connect = async {
        let addr = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .map_err(|source| TransportError::Connect {
                url: url.to_string(),
                source,
            })?
            .next()
            .ok_or_else(|| quic_err(url, "the host name has no address"))?;
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let endpoint = Endpoint::client(local).map_err(|source| TransportError::Connect {
            url: url.to_string(),
            source,
        })?;
        let conn = endpoint
            .connect_with(cfg, addr, &host)
            .map_err(|e| quic_err(url, e))?
            .await
            .map_err(|e| quic_err(url, e))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| quic_err(url, e))?;
        Ok(Box::new(QuicLeg {
            _endpoint: Some(endpoint),
            _conn: conn,
            send,
            recv,
        }) as BoxedLeg)
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout {
            what: "QUIC handshake",
            url: url.to_string(),
            after: timeout,
        }),
    }
}

/// Counts a handshake in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A QUIC endpoint accepting legs.
pub struct QuicLegListener {
    endpoint: Endpoint,
    in_flight: Arc<AtomicUsize>,
    retry_above: usize,
    retries: AtomicU64,
}

impl QuicLegListener {
    /// Binds a UDP endpoint on `url`'s address.
    pub fn bind(
        url: &LegUrl,
        tls: Arc<rustls::ServerConfig>,
        o: &QuicOptions,
    ) -> Result<Self, TransportError> {
        let bind_err = |source: io::Error| TransportError::Bind {
            url: url.to_string(),
            source,
        };
        let addr: SocketAddr =
            std::net::ToSocketAddrs::to_socket_addrs(&(url.host.as_str(), url.port))
                .map_err(bind_err)?
                .next()
                .ok_or_else(|| {
                    bind_err(io::Error::new(io::ErrorKind::InvalidInput, "no address"))
                })?;
        let mut rustls_cfg = (*tls).clone();
        rustls_cfg.alpn_protocols = vec![o.alpn.as_bytes().to_vec()];
        rustls_cfg.max_early_data_size = 0;
        let crypto = QuicServerConfig::try_from(Arc::new(rustls_cfg))
            .map_err(|e| bind_err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport_config(o, true))
            .migration(true);
        let endpoint = Endpoint::server(cfg, addr).map_err(bind_err)?;
        Ok(Self {
            endpoint,
            in_flight: Arc::new(AtomicUsize::new(0)),
            retry_above: o.retry_above,
            retries: AtomicU64::new(0),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Retry packets sent so far (address validation under handshake pressure).
    pub fn retries_sent(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// The next connection attempt. Under pressure, unvalidated peers are sent a Retry
    /// first and only come back here once they have proved their address.
    pub async fn accept(&self) -> io::Result<(SocketAddr, Upgrade)> {
        loop {
            let incoming = self.endpoint.accept().await.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "QUIC endpoint closed")
            })?;
            if !incoming.remote_address_validated()
                && self.in_flight.load(Ordering::SeqCst) >= self.retry_above
                && incoming.may_retry()
            {
                if incoming.retry().is_ok() {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            let peer = incoming.remote_address();
            let guard = InFlight::enter(&self.in_flight);
            let upgrade: Upgrade = Box::pin(async move {
                let _guard = guard;
                let conn = incoming.await.map_err(io::Error::other)?;
                let (send, recv) = conn.accept_bi().await.map_err(io::Error::other)?;
                Ok(Box::new(QuicLeg {
                    _endpoint: None,
                    _conn: conn,
                    send,
                    recv,
                }) as BoxedLeg)
            });
            return Ok((peer, upgrade));
        }
    }
}

/// One leg: the stream halves, and the connection (and client endpoint) kept alive.
struct QuicLeg {
    _endpoint: Option<Endpoint>,
    _conn: Connection,
    send: SendStream,
    recv: RecvStream,
}

impl AsyncRead for QuicLeg {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicLeg {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().send)
            .poll_write(cx, buf)
            .map_err(io::Error::from)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_shutdown(cx)
    }
}
