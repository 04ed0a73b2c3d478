//! Leg transports: dial or accept an ordered, reliable byte pipe for one leg.
//!
//! `tcp://` is plain TCP (for use behind a TLS-terminating balancer: the Noise layer still
//! encrypts end to end); `tls://` is TCP + TLS 1.3 through rustls ([`crate::tls_stream`]). Every socket gets
//! TCP_NODELAY and TCP keepalive; dials and TLS handshakes run under a timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::leg_url::{LegUrl, Scheme};

/// Any byte pipe a leg can run over.
pub trait LegIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> LegIo for T {}

/// A boxed leg pipe.
pub type BoxedLeg = Box<dyn LegIo>;

/// A transport failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP connect failed.
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
    /// A `tls://` URL was used without TLS settings.
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

/// Client-side TLS settings for `tls://` legs.
#[derive(Clone)]
pub struct TlsDialer {
    /// The rustls configuration (trust roots or pin).
    pub config: Arc<rustls::ClientConfig>,
    /// Name to verify the certificate against (and send as SNI); `None`: each leg's own
    /// URL host, so legs on different hosts verify their own certificates.
    pub server_name: Option<String>,
}

/// Sets the options every socket of ours carries.
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
    tls: Option<&TlsDialer>,
    timeout: Duration,
) -> Result<BoxedLeg, TransportError> {
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
    tune_socket(&tcp).map_err(|source| TransportError::Connect {
        url: url.to_string(),
        source,
    })?;
    match url.scheme {
        Scheme::Tcp => Ok(Box::new(tcp)),
        Scheme::Tls => {
            let tls = tls.ok_or_else(|| TransportError::TlsNotConfigured(url.to_string()))?;
            let host = tls.server_name.clone().unwrap_or_else(|| url.host.clone());
            let name =
                ServerName::try_from(host.clone()).map_err(|_| TransportError::ServerName(host))?;
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
                Ok(Ok(s)) => Ok(Box::new(s)),
            }
        }
    }
}

/// A bound leg listener.
pub struct LegListener {
    url: LegUrl,
    tcp: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl LegListener {
    /// Binds `url`; `tls://` needs a server configuration.
    pub async fn bind(
        url: &LegUrl,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, TransportError> {
        let tls = match url.scheme {
            Scheme::Tcp => None,
            Scheme::Tls => {
                Some(tls.ok_or_else(|| TransportError::TlsNotConfigured(url.to_string()))?)
            }
        };
        let addr = format!("{}:{}", url.host, url.port);
        let tcp = TcpListener::bind(&addr)
            .await
            .map_err(|source| TransportError::Bind {
                url: url.to_string(),
                source,
            })?;
        Ok(Self {
            url: url.clone(),
            tcp,
            tls,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The URL this listener serves, with the bound port.
    pub fn url(&self) -> LegUrl {
        let mut u = self.url.clone();
        if let Ok(a) = self.tcp.local_addr() {
            u.port = a.port();
        }
        u
    }

    /// Accepts the next TCP connection (not yet upgraded).
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (s, peer) = self.tcp.accept().await?;
        tune_socket(&s)?;
        Ok((s, peer))
    }

    /// Runs the transport's own handshake (TLS) on an accepted connection.
    pub async fn upgrade(&self, tcp: TcpStream) -> io::Result<BoxedLeg> {
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(config) => Ok(Box::new(
                crate::tls_stream::accept(config.clone(), tcp).await?,
            )),
        }
    }
}
