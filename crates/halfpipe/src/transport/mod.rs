//! Leg transports: dial or accept an ordered, reliable byte pipe for one leg.
//!
//! Each scheme has its own module: [`tcp`] (`tcp://` plain TCP, for use behind a
//! TLS-terminating balancer, and `tls://` TCP + TLS 1.3 through [`crate::tls_stream`]),
//! [`quic`] (`quic://`, one QUIC connection with one bidirectional stream per leg) and
//! [`ws`] (`ws://`/`wss://`, a WebSocket through proxies and CDNs, with a [`decoy`] for
//! everything that is not a leg). The
//! Noise layer above encrypts end to end whatever the transport. Every TCP socket gets
//! TCP_NODELAY and keepalive; dials and transport handshakes run under a timeout.
//!
//! A listener's [`LegListener::accept`] returns at once with the peer address and an
//! [`Upgrade`] future that runs the transport's own handshake, so the server can count
//! and time-limit handshakes in flight before spending anything on them.

pub mod decoy;
pub mod quic;
pub mod tcp;
pub mod ws;
pub mod wt;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::leg_url::{LegUrl, Scheme};
pub use decoy::{Decoy, DecoyKind};
use halfpipe_core::handshake::ChannelBinding;
pub use quic::{Congestion, QuicOptions};
pub use ws::WsOptions;

/// Any byte pipe a leg can run over.
pub trait LegIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The [`ChannelBinding`] of the TLS 1.3 connection under this pipe, when this process
    /// terminates that TLS itself (`tls://`, `wss://`, `quic://`, `wt://`); `None` for
    /// plain pipes. See [`crate::channel_binding`].
    fn channel_binding(&self) -> Option<ChannelBinding> {
        None
    }

    /// For a channel-bound leg: hands this pipe's TLS traffic keys to the leg's record
    /// layer, which then writes and reads TLS records itself while the pipe passes raw
    /// bytes (`tls://`). `None` where the TLS stays inside the pipe (`wss://`, whose
    /// WebSocket frames sit between TLS and the records) or there is none.
    fn hand_over_tls_keys(&mut self) -> Option<io::Result<crate::tls_stream::HandedOver>> {
        None
    }

    /// The TCP socket this pipe reads and writes directly, where there is one.
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl LegIo for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// In-memory pipes, for tests of the layers above the transports.
impl LegIo for tokio::io::DuplexStream {}

impl<C: crate::tls_stream::TlsSide> LegIo for crate::tls_stream::TlsStream<C> {
    fn channel_binding(&self) -> Option<ChannelBinding> {
        crate::tls_stream::TlsStream::channel_binding(self)
    }

    fn hand_over_tls_keys(&mut self) -> Option<io::Result<crate::tls_stream::HandedOver>> {
        Some(self.hand_over_keys())
    }

    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref())
    }
}

/// A boxed leg pipe.
pub type BoxedLeg = Box<dyn LegIo>;

/// A server leg pipe that holds a slot of its listener's connection cap for as long as it
/// lives, and counts its bytes per transport (read: up, written: down).
pub struct Counted {
    inner: BoxedLeg,
    _slot: tokio::sync::OwnedSemaphorePermit,
    metrics: std::sync::Arc<crate::control::metrics::Metrics>,
    scheme: crate::leg_url::Scheme,
}

impl Counted {
    /// Wraps `inner`, keeping `slot` until the pipe is dropped.
    pub fn new(
        inner: BoxedLeg,
        slot: tokio::sync::OwnedSemaphorePermit,
        metrics: std::sync::Arc<crate::control::metrics::Metrics>,
        scheme: crate::leg_url::Scheme,
    ) -> Self {
        Self {
            inner,
            _slot: slot,
            metrics,
            scheme,
        }
    }
}

impl LegIo for Counted {
    fn channel_binding(&self) -> Option<ChannelBinding> {
        self.inner.channel_binding()
    }

    fn hand_over_tls_keys(&mut self) -> Option<io::Result<crate::tls_stream::HandedOver>> {
        self.inner.hand_over_tls_keys()
    }

    fn tcp(&self) -> Option<&TcpStream> {
        self.inner.tcp()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let c = &this.metrics.leg_bytes(this.scheme).up;
            c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            let c = &this.metrics.leg_bytes(this.scheme).down;
            c.fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The transport handshake of an accepted connection, yielding the leg pipe.
pub type Upgrade = Pin<Box<dyn Future<Output = io::Result<BoxedLeg>> + Send>>;

/// A transport failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connect failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The leg URL.
        url: String,
        /// The socket error.
        source: io::Error,
    },
    /// The dial or TLS handshake did not finish in time.
    #[error("{what} to {url} timed out after {after:?}")]
    Timeout {
        /// Which step.
        what: &'static str,
        /// The leg URL.
        url: String,
        /// The limit.
        after: Duration,
    },
    /// The TLS handshake failed (certificate, pin, protocol).
    #[error("TLS handshake with {url} failed: {source}")]
    Tls {
        /// The leg URL.
        url: String,
        /// The TLS error as reported by rustls.
        source: io::Error,
    },
    /// The QUIC connection failed or was refused.
    #[error("QUIC connection to {url} failed: {reason}")]
    Quic {
        /// The leg URL.
        url: String,
        /// What quinn reported.
        reason: String,
    },
    /// A TLS-based URL was used without TLS settings.
    #[error("{0} needs TLS settings ([tls] section)")]
    TlsNotConfigured(String),
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// Binding a listener failed.
    #[error("cannot listen on {url}: {source}")]
    Bind {
        /// The leg URL.
        url: String,
        /// The socket error.
        source: io::Error,
    },
}

/// Client-side TLS settings for `tls://` and `quic://` legs.
#[derive(Clone)]
pub struct TlsDialer {
    /// The rustls configuration (trust roots or pin).
    pub config: Arc<rustls::ClientConfig>,
    /// Name to verify the certificate against (and send as SNI); `None`: each leg's own
    /// URL host, so legs on different hosts verify their own certificates.
    pub server_name: Option<String>,
}

impl TlsDialer {
    /// The name to verify for `url`.
    fn name_for(
        &self,
        url: &LegUrl,
    ) -> Result<rustls::pki_types::ServerName<'static>, TransportError> {
        let host = self.server_name.clone().unwrap_or_else(|| url.host.clone());
        rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| TransportError::ServerName(host))
    }
}

/// Everything a client needs to dial any leg URL.
#[derive(Clone, Default)]
pub struct DialSettings {
    /// TLS trust for TLS-based schemes.
    pub tls: Option<TlsDialer>,
    /// QUIC tuning.
    pub quic: QuicOptions,
    /// WebSocket request settings (Host header, extra headers, message cap).
    pub ws: WsOptions,
}

/// Everything a server needs to listen on any leg URL.
#[derive(Clone, Default)]
pub struct ListenSettings {
    /// Certificate and key for TLS-based schemes.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// QUIC tuning.
    pub quic: QuicOptions,
    /// WebSocket settings (message cap).
    pub ws: WsOptions,
    /// What HTTP-based listeners answer to anything that is not a leg.
    pub decoy: Decoy,
}

/// Sets the options every TCP socket of ours carries.
pub fn tune_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    sock.set_tcp_keepalive(&ka)?;
    Ok(())
}

/// Dials a leg URL and returns the pipe.
pub async fn dial(
    url: &LegUrl,
    settings: &DialSettings,
    timeout: Duration,
) -> Result<BoxedLeg, TransportError> {
    match url.scheme {
        Scheme::Tcp | Scheme::Tls => tcp::dial(url, settings.tls.as_ref(), timeout).await,
        Scheme::Quic => quic::dial(url, settings, timeout).await,
        Scheme::Ws | Scheme::Wss => ws::dial(url, settings, timeout).await,
        Scheme::Wt => wt::dial(url, settings, timeout).await,
    }
}

enum Inner {
    Tcp(tcp::TcpLegListener),
    Quic(quic::QuicLegListener),
    Ws(ws::WsLegListener),
    Wt(wt::WtLegListener),
}

/// A bound leg listener of any scheme.
pub struct LegListener {
    url: LegUrl,
    inner: Inner,
}

impl LegListener {
    /// Binds `url`; TLS-based schemes need `settings.tls`.
    pub async fn bind(url: &LegUrl, settings: &ListenSettings) -> Result<Self, TransportError> {
        let required = || {
            settings
                .tls
                .clone()
                .ok_or_else(|| TransportError::TlsNotConfigured(url.to_string()))
        };
        let tls = if url.scheme.uses_tls() {
            Some(required()?)
        } else {
            None
        };
        let inner = match url.scheme {
            Scheme::Tcp | Scheme::Tls => Inner::Tcp(tcp::TcpLegListener::bind(url, tls).await?),
            Scheme::Quic => Inner::Quic(quic::QuicLegListener::bind(
                url,
                required()?,
                &settings.quic,
            )?),
            Scheme::Ws | Scheme::Wss => Inner::Ws(
                ws::WsLegListener::bind(url, tls, settings.decoy.clone(), settings.ws.clone())
                    .await?,
            ),
            Scheme::Wt => Inner::Wt(wt::WtLegListener::bind(url, required()?, &settings.quic)?),
        };
        Ok(Self {
            url: url.clone(),
            inner,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            Inner::Tcp(l) => l.local_addr(),
            Inner::Quic(l) => l.local_addr(),
            Inner::Ws(l) => l.local_addr(),
            Inner::Wt(l) => l.local_addr(),
        }
    }

    /// The URL this listener serves, with the bound port.
    pub fn url(&self) -> LegUrl {
        let mut u = self.url.clone();
        if let Ok(a) = self.local_addr() {
            u.port = a.port();
        }
        u
    }

    /// Waits for the next connection attempt; its transport handshake is the returned
    /// [`Upgrade`], still to be driven (under the caller's limits and timeout).
    pub async fn accept(&self) -> io::Result<(SocketAddr, Upgrade)> {
        match &self.inner {
            Inner::Tcp(l) => l.accept().await,
            Inner::Quic(l) => l.accept().await,
            Inner::Ws(l) => l.accept().await,
            Inner::Wt(l) => l.accept().await,
        }
    }
}
