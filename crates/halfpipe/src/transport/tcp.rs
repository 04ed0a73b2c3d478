//! `tcp://` and `tls://` legs: a TCP connection, with TLS 1.3 on top for `tls://`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use super::{tune_socket, BoxedLeg, TlsDialer, TransportError, Upgrade};
use crate::leg_url::{LegUrl, Scheme};
use crate::tls_stream::ClientTlsStream;

/// How long a leg's sent bytes may stay unacknowledged, or unsent behind a peer's zero
/// window, before the kernel drops the connection (`TCP_USER_TIMEOUT`). Keepalives do not
/// catch a peer that answers probes but never reads, and the session watches only the
/// receive leg for silence: without this, such a peer would hold the send leg's writer,
/// and the session with it, for good. The leg is then re-dialled and the session resumes.
pub const LEG_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// [`tune_socket`], plus [`LEG_USER_TIMEOUT`]: the options of a leg's TCP connection
/// (`tcp://`, `tls://`, and the `ws://`/`wss://` legs, which dial and accept through here).
fn tune_leg_socket(tcp: &TcpStream) -> io::Result<()> {
    tune_socket(tcp)?;
    socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(LEG_USER_TIMEOUT))
}

/// Opens a TCP connection to `url`'s host and port, tuned.
pub async fn connect(url: &LegUrl, timeout: Duration) -> Result<TcpStream, TransportError> {
    let addr = format!("{}:{}", url.host, url.port);
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
        Err(_) => {
            return Err(TransportError::Timeout {
                what: "connect",
                url: url.to_string(),
                after: timeout,
            })
        }
        Ok(Err(source)) => {
            return Err(TransportError::Connect {
                url: url.to_string(),
                source,
            })
        }
        Ok(Ok(s)) => s,
    };
    tune_leg_socket(&tcp).map_err(|source| TransportError::Connect {
        url: url.to_string(),
        source,
    })?;
    Ok(tcp)
}

/// Runs a TLS client handshake for `url` over `tcp`.
pub async fn tls_client(
    url: &LegUrl,
    tls: Option<&TlsDialer>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<ClientTlsStream, TransportError> {
    let tls = tls.ok_or_else(|| TransportError::TlsNotConfigured(url.to_string()))?;
    let name = tls.name_for(url)?;
    let handshake = crate::tls_stream::connect(tls.config.clone(), name, tcp);
    match tokio::time::timeout(timeout, handshake).await {
        Err(_) => Err(TransportError::Timeout {
            what: "TLS handshake",
            url: url.to_string(),
            after: timeout,
        }),
        Ok(Err(source)) => Err(TransportError::Tls {
            url: url.to_string(),
            source,
        }),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Dials `url` over TCP, with TLS when the scheme asks for it.
pub async fn dial(
    url: &LegUrl,
    tls: Option<&TlsDialer>,
    timeout: Duration,
) -> Result<BoxedLeg, TransportError> {
    let tcp = connect(url, timeout).await?;
    if url.scheme == Scheme::Tcp {
        return Ok(Box::new(tcp));
    }
    Ok(Box::new(tls_client(url, tls, tcp, timeout).await?))
}

/// A TCP listener, upgrading accepted connections to TLS when configured.
pub struct TcpLegListener {
    tcp: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl TcpLegListener {
    /// Binds `url`'s address.
    pub async fn bind(
        url: &LegUrl,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, TransportError> {
        let addr = format!("{}:{}", url.host, url.port);
        let tcp = TcpListener::bind(&addr)
            .await
            .map_err(|source| TransportError::Bind {
                url: url.to_string(),
                source,
            })?;
        Ok(Self { tcp, tls })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts a tuned TCP connection.
    pub async fn accept_tcp(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (s, peer) = self.tcp.accept().await?;
        tune_leg_socket(&s)?;
        Ok((s, peer))
    }

    /// Accepts a TCP connection; the upgrade runs the TLS handshake if any.
    pub async fn accept(&self) -> io::Result<(SocketAddr, Upgrade)> {
        let (s, peer) = self.accept_tcp().await?;
        let tls = self.tls.clone();
        let upgrade: Upgrade = Box::pin(async move {
            match tls {
                None => Ok(Box::new(s) as BoxedLeg),
                Some(config) => {
                    Ok(Box::new(crate::tls_stream::accept(config, s).await?) as BoxedLeg)
                }
            }
        });
        Ok((peer, upgrade))
    }
}

/// Keeps the TCP ACKs of a one-way receive leg delayed.
///
/// On a connection that carries data both ways, the kernel notices the exchange
/// ("ping-pong" mode) and lets the ACK of each request ride on the response. A halfpipe
/// receive leg never sends data, so the kernel would ACK every small segment with a
/// segment of its own, inside the very `recv` that the data waits on. Setting
/// `TCP_QUICKACK` off puts the socket in ping-pong mode: the kernel then ACKs every second
/// small segment (or a full one at once), which saves one segment per request/response
/// exchange. The kernel leaves that mode when its delayed-ACK timer fires (at least
/// 20 ms after a segment arrived, on a quiet leg), so the mode is set again after any
/// read that follows a quiet spell, and every [`DelayedAcks::REARM_EVERY`] reads in case
/// something else took it away. The sender is never held back: the kernel still ACKs at
/// least every second segment and at once when more than a full segment is unacknowledged.
#[derive(Debug, Default)]
pub struct DelayedAcks {
    /// The last read; `None` before the first.
    last_read: Option<Instant>,
    /// Reads since the mode was last set.
    reads: u32,
}

impl DelayedAcks {
    /// A quiet spell after which the kernel may have left delayed-ACK mode: shorter than its
    /// shortest delayed-ACK timer.
    pub const QUIET: Duration = Duration::from_millis(10);
    /// Reads after which the mode is set again anyway.
    pub const REARM_EVERY: u32 = 256;

    /// Call after each read, at `now`; when the mode may have been lost, sets it on the
    /// socket `tcp` gives (asked only then; a leg with no TCP socket under it gives none).
    /// Returns whether it did. A failure to set it costs only speed, so it is ignored.
    pub fn after_read<'a>(
        &mut self,
        now: Instant,
        tcp: impl FnOnce() -> Option<&'a TcpStream>,
    ) -> bool {
        let rearm = self.reads >= Self::REARM_EVERY
            || self
                .last_read
                .is_none_or(|at| now.saturating_duration_since(at) >= Self::QUIET);
        self.last_read = Some(now);
        self.reads = if rearm { 1 } else { self.reads + 1 };
        if rearm {
            if let Some(tcp) = tcp() {
                let _ = socket2::SockRef::from(tcp).set_quickack(false);
            }
        }
        rearm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_of_a_leg_carry_the_user_timeout_and_nodelay() {
        // Leg URLs name a port: take a free one.
        let port = crate::quickstart::Ports::pick([0; 4]).unwrap().uplink;
        let url: LegUrl = format!("tcp://127.0.0.1:{port}").parse().unwrap();
        let listener = TcpLegListener::bind(&url, None).await.unwrap();
        let (dialled, accepted) =
            tokio::join!(connect(&url, Duration::from_secs(5)), listener.accept_tcp());
        for tcp in [&dialled.unwrap(), &accepted.unwrap().0] {
            let sock = socket2::SockRef::from(tcp);
            assert_eq!(sock.tcp_user_timeout().unwrap(), Some(LEG_USER_TIMEOUT));
            assert!(sock.nodelay().unwrap());
        }
    }

    /// A connected loopback pair.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Whether the kernel delays this socket's ACKs (ping-pong mode).
    fn delays_acks(tcp: &TcpStream) -> bool {
        !socket2::SockRef::from(tcp).quickack().unwrap()
    }

    /// What the kernel's delayed-ACK timer does when it fires on a quiet leg.
    fn kernel_leaves_the_mode(tcp: &TcpStream) {
        socket2::SockRef::from(tcp).set_quickack(true).unwrap();
        assert!(!delays_acks(tcp));
    }

    #[tokio::test]
    async fn delayed_acks_are_set_on_the_first_read_and_after_a_quiet_spell() {
        let (leg, _peer) = pair().await;
        assert!(!delays_acks(&leg), "a new connection ACKs at once");
        let mut acks = DelayedAcks::default();
        let t0 = Instant::now();
        assert!(acks.after_read(t0, || Some(&leg)));
        assert!(delays_acks(&leg));

        kernel_leaves_the_mode(&leg);
        // Reads closer together than the kernel's shortest timer leave the socket alone...
        let busy = t0 + DelayedAcks::QUIET / 2;
        assert!(!acks.after_read(busy, || Some(&leg)));
        assert!(!delays_acks(&leg));
        // ...and the first read after a quiet spell sets the mode again.
        assert!(acks.after_read(busy + DelayedAcks::QUIET, || Some(&leg)));
        assert!(delays_acks(&leg));
    }

    #[tokio::test]
    async fn delayed_acks_are_set_again_every_so_many_reads_of_a_busy_leg() {
        let (leg, _peer) = pair().await;
        let mut acks = DelayedAcks::default();
        let t0 = Instant::now();
        assert!(acks.after_read(t0, || Some(&leg)));
        kernel_leaves_the_mode(&leg);
        let step = Duration::from_micros(100);
        // The socket is looked up only when the mode is set: not on every read.
        let mut lookups = 0;
        let rearmed: Vec<u32> = (1..=2 * DelayedAcks::REARM_EVERY)
            .filter(|&i| {
                acks.after_read(t0 + step * i, || {
                    lookups += 1;
                    Some(&leg)
                })
            })
            .collect();
        assert_eq!(
            rearmed,
            [DelayedAcks::REARM_EVERY, 2 * DelayedAcks::REARM_EVERY]
        );
        assert_eq!(lookups, rearmed.len());
        assert!(delays_acks(&leg));
    }
}
