//! Where a stream goes and how its connect attempt ended.
//!
//! Both types travel inside OPEN and OPEN_RESULT frames (see `docs/PROTOCOL.md`).

use std::fmt;
use std::net::SocketAddr;

/// The destination an application asked for: an IP socket address or a domain name with a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    /// A literal IPv4 or IPv6 address and port.
    Ip(SocketAddr),
    /// A domain name (1..=255 bytes, resolved by the exit) and port.
    Domain(String, u16),
}

impl TargetAddr {
    /// The port, whichever the form.
    pub fn port(&self) -> u16 {
        match self {
            TargetAddr::Ip(a) => a.port(),
            TargetAddr::Domain(_, p) => *p,
        }
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddr::Ip(a) => write!(f, "{a}"),
            TargetAddr::Domain(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// The outcome of the exit's connect to a target, carried back in OPEN_RESULT.
///
/// Each value maps onto one SOCKS5 reply code (RFC 1928 §6), so the client can answer the
/// application precisely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnectStatus {
    /// Connected.
    Succeeded = 0,
    /// The exit failed for a reason not listed here.
    GeneralFailure = 1,
    /// The exit's egress policy (or a limit) forbids this target.
    NotAllowed = 2,
    /// The network is unreachable from the exit.
    NetworkUnreachable = 3,
    /// The host is unreachable, or its name did not resolve.
    HostUnreachable = 4,
    /// The target refused the connection.
    ConnectionRefused = 5,
    /// The connect attempt timed out.
    TimedOut = 6,
    /// The address type is not supported.
    AddressTypeNotSupported = 8,
}

impl ConnectStatus {
    /// Decodes a wire value; unknown values are `None` (the caller treats them as malformed).
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Succeeded,
            1 => Self::GeneralFailure,
            2 => Self::NotAllowed,
            3 => Self::NetworkUnreachable,
            4 => Self::HostUnreachable,
            5 => Self::ConnectionRefused,
            6 => Self::TimedOut,
            8 => Self::AddressTypeNotSupported,
            _ => return None,
        })
    }

    /// A short human description, used in logs and HTTP CONNECT replies.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::GeneralFailure => "general failure at the exit",
            Self::NotAllowed => "not allowed by the exit's policy",
            Self::NetworkUnreachable => "network unreachable",
            Self::HostUnreachable => "host unreachable",
            Self::ConnectionRefused => "connection refused",
            Self::TimedOut => "connect timed out",
            Self::AddressTypeNotSupported => "address type not supported",
        }
    }
}
