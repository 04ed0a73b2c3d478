//! The exit's outbound connector: connects a stream's target, behind the egress policy.

use std::io;
use std::time::Duration;

use halfpipe_core::{ConnectStatus, TargetAddr};
use tokio::net::TcpStream;

use crate::egress::EgressPolicy;
use crate::transport::tune_socket;

/// Connects to `target`, trying the allowed addresses in order within `timeout` overall.
pub async fn connect(
    policy: &EgressPolicy,
    target: &TargetAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectStatus> {
    let attempt = async {
        let addrs = policy.resolve_and_check(target).await?;
        let mut last = ConnectStatus::HostUnreachable;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tune_socket(&s).map_err(|e| status_of(&e))?;
                    return Ok(s);
                }
                Err(e) => last = status_of(&e),
            }
        }
        Err(last)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(ConnectStatus::TimedOut))
}

/// Maps a connect error onto the SOCKS-compatible status.
pub fn status_of(e: &io::Error) -> ConnectStatus {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectStatus::ConnectionRefused,
        io::ErrorKind::TimedOut => ConnectStatus::TimedOut,
        io::ErrorKind::HostUnreachable => ConnectStatus::HostUnreachable,
        io::ErrorKind::NetworkUnreachable => ConnectStatus::NetworkUnreachable,
        io::ErrorKind::AddrNotAvailable => ConnectStatus::AddressTypeNotSupported,
        _ => ConnectStatus::GeneralFailure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_when_allowed_and_maps_refusal() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = EgressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
        let s = connect(&open, &TargetAddr::Ip(addr), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(s.nodelay().unwrap());
        drop(l);
        assert_eq!(
            connect(&open, &TargetAddr::Ip(addr), Duration::from_secs(5))
                .await
                .err(),
            Some(ConnectStatus::ConnectionRefused)
        );
        let closed = EgressPolicy::default();
        assert_eq!(
            connect(&closed, &TargetAddr::Ip(addr), Duration::from_secs(5))
                .await
                .err(),
            Some(ConnectStatus::NotAllowed)
        );
    }
}
