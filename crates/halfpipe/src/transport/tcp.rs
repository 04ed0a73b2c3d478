//! `tcp://` and `tls://` legs: a TCP connection, with TLS 1.3 on top for `tls://`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::{tune_socket, BoxedLeg, TlsDialer, TransportError, Upgrade};
use crate::leg_url::{LegUrl, Scheme};
use crate::tls_stream::ClientTlsStream;

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
    tune_socket(&tcp).map_err(|source| TransportError::Connect {
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
        tune_socket(&s)?;
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
