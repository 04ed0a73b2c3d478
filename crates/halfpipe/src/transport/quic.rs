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
use std::task::{ready, Context, Poll};
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

/// The largest UDP payload for which quinn's GSO batches (up to 10 datagrams) stay within
/// the 65 535-byte limit of one send: (65 535 - 20 IPv4 - 8 UDP) / 10. Above it, legs send
/// one datagram per system call.
pub const GSO_SAFE_PAYLOAD: u16 = 6550;

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
    /// Packets the peer may receive before it must acknowledge (QUIC ACK frequency
    /// extension; default 10, 1..=256). A leg's data flows one way, so fewer ACKs mean less
    /// packet work at both ends; the ACK delay bound (the peer's, at most 25 ms or one RTT)
    /// still applies.
    pub ack_every: u32,
    /// Largest UDP payload a leg may use (1200..=65527): the upper bound of path MTU
    /// discovery (RFC 8899) and the `max_udp_payload_size` this end advertises. Discovery
    /// probes upward from 1200 and falls back on loss, so a bound above the path's MTU
    /// costs only a few lost probes; on paths with larger MTUs (jumbo frames, loopback) a
    /// higher bound means fewer, larger packets. `None` picks per leg, see
    /// [`QuicOptions::udp_payload`].
    pub max_udp_payload: Option<u16>,
}

impl Default for QuicOptions {
    fn default() -> Self {
        Self {
            congestion: Congestion::Cubic,
            alpn: "h3".into(),
            retry_above: 32,
            idle_timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(10),
            ack_every: 10,
            max_udp_payload: None,
        }
    }
}

/// The smallest UDP payload QUIC allows (RFC 9000 §14), and so the lowest bound.
pub const MIN_UDP_PAYLOAD: u16 = 1200;

/// The default UDP payload bound off loopback: a 1500-byte Ethernet MTU less the IPv6
/// and UDP headers.
pub const ETHERNET_PAYLOAD: u16 = 1452;

/// The default UDP payload bound on loopback, whose MTU is 64 KiB: the largest UDP
/// payload QUIC allows.
pub const LOOPBACK_PAYLOAD: u16 = 65527;

impl QuicOptions {
    /// The UDP payload bound of a leg: the configured one, or by default
    /// [`LOOPBACK_PAYLOAD`] when the leg's own address (the dialled peer, or the address a
    /// listener is bound to) is loopback and [`ETHERNET_PAYLOAD`] otherwise; always within
    /// [`MIN_UDP_PAYLOAD`]..=[`LOOPBACK_PAYLOAD`].
    pub fn udp_payload(&self, loopback: bool) -> u16 {
        self.max_udp_payload
            .unwrap_or(if loopback {
                LOOPBACK_PAYLOAD
            } else {
                ETHERNET_PAYLOAD
            })
            .clamp(MIN_UDP_PAYLOAD, LOOPBACK_PAYLOAD)
    }
}

/// The QUIC transport configuration for legs (shared with `wt://`) whose UDP payloads are
/// bounded by `payload`.
pub(super) fn transport_config(o: &QuicOptions, server: bool, payload: u16) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(o.keepalive))
        .max_idle_timeout(IdleTimeout::try_from(o.idle_timeout).ok())
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(o.ack_every.saturating_sub(1)));
    t.ack_frequency_config(Some(ack));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(payload);
    t.mtu_discovery_config(Some(mtu));
    // quinn hands the kernel up to 10 datagrams per GSO send, and one send can carry at
    // most 64 KiB; a larger batch fails with EMSGSIZE, which quinn-udp drops silently.
    if payload > GSO_SAFE_PAYLOAD {
        t.enable_segmentation_offload(false);
    }
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
    t
}

/// The QUIC endpoint configuration for legs (shared with `wt://`): quinn's defaults with
/// the largest UDP payload the leg accepts.
pub(super) fn endpoint_config(payload: u16) -> quinn::EndpointConfig {
    let mut e = quinn::EndpointConfig::default();
    // `QuicOptions::udp_payload` keeps it within quinn's range; out of range would keep
    // quinn's default.
    let _ = e.max_udp_payload_size(payload);
    e
}

/// Socket buffers asked for on QUIC sockets. The kernel's default (about 208 KiB) holds
/// only a few dozen datagrams, so a burst at tunnel speed overflows it and every drop
/// costs a congestion-window cut. The kernel caps the request at `net.core.rmem_max` /
/// `wmem_max`.
const UDP_SOCKET_BUFFER: usize = 4 << 20;

/// Asks for [`UDP_SOCKET_BUFFER`] both ways; a refusal keeps the kernel's default.
fn size_socket_buffers(socket: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    for (what, r) in [
        ("receive", s.set_recv_buffer_size(UDP_SOCKET_BUFFER)),
        ("send", s.set_send_buffer_size(UDP_SOCKET_BUFFER)),
    ] {
        if let Err(e) = r {
            tracing::debug!(error = %e, "QUIC socket {what} buffer left at the kernel default");
        }
    }
}

/// A UDP socket for a QUIC leg bound to `addr`, its buffers sized for tunnel bursts.
pub(super) fn leg_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    size_socket_buffers(&socket);
    Ok(socket)
}

/// A client leg socket on an ephemeral port that reaches IPv4 and IPv6 peers alike.
pub(super) fn dual_stack_leg_socket() -> io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from(([0u16; 8], 0)).into())?;
    let socket: std::net::UdpSocket = s.into();
    size_socket_buffers(&socket);
    Ok(socket)
}

/// A quinn endpoint on a fresh leg socket bound to `addr`.
fn endpoint_on(
    addr: SocketAddr,
    payload: u16,
    server: Option<quinn::ServerConfig>,
) -> io::Result<Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime"))?;
    Endpoint::new(endpoint_config(payload), server, leg_socket(addr)?, runtime)
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
        let payload = settings.quic.udp_payload(addr.ip().is_loopback());
        cfg.transport_config(Arc::new(transport_config(&settings.quic, false, payload)));
        let endpoint =
            endpoint_on(local, payload, None).map_err(|source| TransportError::Connect {
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
            finished: false,
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

/// What a UDP listener needs from its URL and TLS settings (shared with `wt://`): the
/// address to bind, and the server TLS configuration with `alpn` and no early data.
pub(super) fn server_parts(
    url: &LegUrl,
    tls: &rustls::ServerConfig,
    alpn: &[u8],
) -> Result<(SocketAddr, rustls::ServerConfig), TransportError> {
    let bind_err = |source: io::Error| TransportError::Bind {
        url: url.to_string(),
        source,
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(url.host.as_str(), url.port))
        .map_err(bind_err)?
        .next()
        .ok_or_else(|| bind_err(io::Error::new(io::ErrorKind::InvalidInput, "no address")))?;
    let mut cfg = tls.clone();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.max_early_data_size = 0;
    Ok((addr, cfg))
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
        let (addr, rustls_cfg) = server_parts(url, &tls, o.alpn.as_bytes())?;
        let bind_err = |source: io::Error| TransportError::Bind {
            url: url.to_string(),
            source,
        };
        let crypto = QuicServerConfig::try_from(Arc::new(rustls_cfg))
            .map_err(|e| bind_err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let payload = o.udp_payload(addr.ip().is_loopback());
        cfg.transport_config(Arc::new(transport_config(o, true, payload)))
            .migration(true);
        let endpoint = endpoint_on(addr, payload, Some(cfg)).map_err(bind_err)?;
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
                    finished: false,
                }) as BoxedLeg)
            });
            return Ok((peer, upgrade));
        }
    }
}

/// How long a closed leg's connection lingers for the peer to acknowledge the last bytes.
const LINGER: Duration = Duration::from_secs(5);

/// One leg: the stream halves, and the connection (and client endpoint) kept alive.
struct QuicLeg {
    _endpoint: Option<Endpoint>,
    _conn: Connection,
    send: SendStream,
    recv: RecvStream,
    /// The send side was finished cleanly (shutdown), so the last bytes deserve delivery.
    finished: bool,
}

impl Drop for QuicLeg {
    fn drop(&mut self) {
        // Dropping the connection would discard unacknowledged data: after a clean
        // shutdown, keep it (and the endpoint) until the peer has everything, bounded.
        if !self.finished {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let acked = self.send.stopped();
        let conn = self._conn.clone();
        let endpoint = self._endpoint.take();
        rt.spawn(async move {
            let _ = tokio::time::timeout(LINGER, acked).await;
            drop((conn, endpoint));
        });
    }
}

impl super::LegIo for QuicLeg {
    fn channel_binding(&self) -> Option<halfpipe_core::handshake::ChannelBinding> {
        crate::channel_binding::exported(|o, l, c| self._conn.export_keying_material(o, l, c))
    }
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
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.send).poll_shutdown(cx));
        this.finished = r.is_ok();
        Poll::Ready(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TlsDialer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A dev certificate: the server config and a CA-file client dialer.
    fn certs() -> (Arc<rustls::ServerConfig>, TlsDialer) {
        let certs = crate::cert::TestCerts::new("quic");
        let (c, k, _) = certs.write("cert");
        let server = crate::tls::server_config(&c, &k).unwrap();
        let client = crate::tls::client_config(&crate::tls::ServerTrust::CaFile(c)).unwrap();
        let _ = std::fs::remove_dir_all(&certs.dir);
        let dialer = TlsDialer {
            config: client,
            server_name: Some("localhost".into()),
        };
        (server, dialer)
    }

    fn url(port: u16) -> LegUrl {
        format!("quic://127.0.0.1:{port}").parse().unwrap()
    }

    /// Echoes one 5-byte message per accepted leg.
    async fn serve_echo(l: Arc<QuicLegListener>) {
        while let Ok((_, upgrade)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut leg) = upgrade.await {
                    let mut buf = [0u8; 5];
                    if leg.read_exact(&mut buf).await.is_ok() {
                        let _ = leg.write_all(&buf).await;
                        let _ = leg.shutdown().await;
                    }
                }
            });
        }
    }

    #[test]
    fn udp_payload_defaults_to_the_link_and_obeys_the_config() {
        let auto = QuicOptions::default();
        assert_eq!(auto.udp_payload(true), LOOPBACK_PAYLOAD);
        assert_eq!(auto.udp_payload(false), ETHERNET_PAYLOAD);
        let set = QuicOptions {
            max_udp_payload: Some(8952),
            ..QuicOptions::default()
        };
        assert_eq!(
            (set.udp_payload(true), set.udp_payload(false)),
            (8952, 8952)
        );
        for (asked, got) in [(100, MIN_UDP_PAYLOAD), (u16::MAX, LOOPBACK_PAYLOAD)] {
            let o = QuicOptions {
                max_udp_payload: Some(asked),
                ..QuicOptions::default()
            };
            assert_eq!(o.udp_payload(false), got, "{asked} not clamped");
        }
    }

    /// quinn's TransportConfig has no getters; its Debug output names every field.
    fn transport_debug(payload: u16) -> String {
        format!(
            "{:?}",
            transport_config(&QuicOptions::default(), false, payload)
        )
    }

    #[test]
    fn segmentation_offload_only_where_a_batch_fits_one_send() {
        let small = transport_debug(ETHERNET_PAYLOAD);
        assert!(
            small.contains("enable_segmentation_offload: true"),
            "{small}"
        );
        assert!(small.contains("upper_bound: 1452"), "{small}");
        let edge = transport_debug(GSO_SAFE_PAYLOAD);
        assert!(edge.contains("enable_segmentation_offload: true"), "{edge}");
        // Ten segments of the largest GSO-safe payload under one UDP and IPv4 header fit
        // the 65 535 bytes of one IP packet; one byte more would not.
        assert!(10 * u32::from(GSO_SAFE_PAYLOAD) + 8 + 20 <= 65_535);
        assert!(10 * (u32::from(GSO_SAFE_PAYLOAD) + 1) + 8 + 20 > 65_535);
        let large = transport_debug(LOOPBACK_PAYLOAD);
        assert!(
            large.contains("enable_segmentation_offload: false"),
            "{large}"
        );
        assert!(large.contains("upper_bound: 65527"), "{large}");
    }

    #[test]
    fn leg_sockets_get_large_buffers() {
        // The kernel grants at most net.core.rmem_max / wmem_max (and reports double).
        let cap = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(UDP_SOCKET_BUFFER)
                .min(UDP_SOCKET_BUFFER)
        };
        for socket in [
            leg_socket(([127, 0, 0, 1], 0).into()).unwrap(),
            dual_stack_leg_socket().unwrap(),
        ] {
            let s = socket2::SockRef::from(&socket);
            assert!(s.recv_buffer_size().unwrap() >= cap("rmem_max"));
            assert!(s.send_buffer_size().unwrap() >= cap("wmem_max"));
        }
    }

    async fn round_trip(port: u16, settings: &DialSettings) -> Result<Vec<u8>, TransportError> {
        let mut leg = dial(&url(port), settings, Duration::from_secs(5)).await?;
        leg.write_all(b"hello").await.unwrap();
        let mut out = Vec::new();
        leg.read_to_end(&mut out).await.unwrap();
        Ok(out)
    }

    #[tokio::test]
    async fn retry_under_pressure_then_wrong_alpn_and_wrong_pin_refused() {
        let (server_tls, dialer) = certs();
        // retry_above = 0: every new peer must prove its address first.
        let strict = QuicOptions {
            retry_above: 0,
            ..QuicOptions::default()
        };
        let bind = |o: &QuicOptions| {
            let mut u = url(1);
            u.port = 0; // any free port
            Arc::new(QuicLegListener::bind(&u, server_tls.clone(), o).unwrap())
        };
        let l = bind(&strict);
        let port = l.local_addr().unwrap().port();
        tokio::spawn(serve_echo(l.clone()));
        let settings = DialSettings {
            tls: Some(dialer.clone()),
            ..DialSettings::default()
        };
        assert_eq!(round_trip(port, &settings).await.unwrap(), b"hello");
        assert!(
            l.retries_sent() >= 1,
            "a Retry was sent and the client passed it"
        );

        // The default threshold: no Retry for a lone handshake.
        let relaxed = bind(&QuicOptions::default());
        let port = relaxed.local_addr().unwrap().port();
        tokio::spawn(serve_echo(relaxed.clone()));
        assert_eq!(round_trip(port, &settings).await.unwrap(), b"hello");
        assert_eq!(relaxed.retries_sent(), 0);

        // A client offering another ALPN is refused in the TLS handshake.
        let mut wrong = settings.clone();
        wrong.quic.alpn = "halfpipe-probe".into();
        let e = round_trip(port, &wrong).await.unwrap_err().to_string();
        assert!(e.contains("protocol"), "{e}");

        // A wrong pin is refused with a clear error.
        use base64::Engine;
        let bad_pin = format!(
            "sha256/{}",
            base64::engine::general_purpose::STANDARD.encode([9u8; 32])
        );
        let pinned = DialSettings {
            tls: Some(TlsDialer {
                config: crate::tls::client_config(&crate::tls::ServerTrust::Pin(bad_pin)).unwrap(),
                server_name: Some("localhost".into()),
            }),
            ..DialSettings::default()
        };
        let e = round_trip(port, &pinned).await.unwrap_err().to_string();
        assert!(e.contains("pin mismatch"), "{e}");
    }
}
