//! Leg URLs: `tcp://host:port`, `tls://host:port`, `quic://host:port`, and the HTTP-based
//! `ws://host:port/path` and `wss://host:port/path` (IPv6 in brackets).

use std::fmt;
use std::str::FromStr;

/// The transport a leg URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Plain TCP (behind a TLS-terminating balancer).
    Tcp,
    /// TCP with TLS 1.3.
    Tls,
    /// QUIC (TLS 1.3 inside), one bidirectional stream per leg.
    Quic,
    /// WebSocket over plain HTTP (behind a TLS-terminating proxy or CDN).
    Ws,
    /// WebSocket over TLS 1.3.
    Wss,
    /// WebTransport over HTTP/3 (QUIC).
    Wt,
}

impl Scheme {
    /// Every scheme, in the order of [`Scheme::index`].
    pub const ALL: [Scheme; 6] = [
        Scheme::Tcp,
        Scheme::Tls,
        Scheme::Quic,
        Scheme::Ws,
        Scheme::Wss,
        Scheme::Wt,
    ];

    /// Position in [`Scheme::ALL`] (for per-transport counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name in URLs.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Tls => "tls",
            Scheme::Quic => "quic",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
            Scheme::Wt => "wt",
        }
    }

    /// Whether the scheme speaks HTTP (has a path, answers non-legs with a decoy).
    pub fn is_http(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss | Scheme::Wt)
    }

    /// Whether the transport runs TLS and so needs certificates (server) or trust
    /// settings (client).
    pub fn uses_tls(self) -> bool {
        match self {
            Scheme::Tcp | Scheme::Ws => false,
            Scheme::Tls | Scheme::Quic | Scheme::Wss | Scheme::Wt => true,
        }
    }
}

/// A parsed leg URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegUrl {
    /// The transport.
    pub scheme: Scheme,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// HTTP path for `ws`/`wss` (starts with `/`); empty for other schemes.
    pub path: String,
}

/// A leg URL that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegUrlError {
    /// No `scheme://`.
    #[error("{0:?} has no scheme: write tcp://host:port or tls://host:port")]
    NoScheme(String),
    /// A scheme this version does not support.
    #[error("unsupported scheme {0:?}: use tcp://, tls:// or quic://")]
    Scheme(String),
    /// Missing or invalid port.
    #[error("{0:?} needs a port between 1 and 65535, as in tls://host:8443")]
    Port(String),
    /// A path, query or user part that legs do not use.
    #[error("{0:?} must be scheme://host:port (ws and wss may add a /path, without ?, # or ..)")]
    Extra(String),
    /// Empty host.
    #[error("{0:?} has an empty host")]
    Host(String),
}

impl FromStr for LegUrl {
    type Err = LegUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| LegUrlError::NoScheme(s.to_owned()))?;
        let scheme = match scheme {
            "tcp" => Scheme::Tcp,
            "tls" => Scheme::Tls,
            "quic" => Scheme::Quic,
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            "wt" => Scheme::Wt,
            other => return Err(LegUrlError::Scheme(other.to_owned())),
        };
        let (rest, path) = match rest.find('/') {
            Some(i) if scheme.is_http() => (&rest[..i], rest[i..].to_owned()),
            None if scheme.is_http() => (rest, "/".to_owned()),
            _ => (rest, String::new()),
        };
        if path.contains(['?', '#', ' ']) || path.contains("..") {
            return Err(LegUrlError::Extra(s.to_owned()));
        }
        if rest.contains(['/', '?', '#', '@']) {
            return Err(LegUrlError::Extra(s.to_owned()));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6
                .split_once("]:")
                .ok_or_else(|| LegUrlError::Port(s.to_owned()))?;
            (h, p)
        } else {
            rest.rsplit_once(':')
                .ok_or_else(|| LegUrlError::Port(s.to_owned()))?
        };
        if host.is_empty() {
            return Err(LegUrlError::Host(s.to_owned()));
        }
        let port: u16 = port.parse().map_err(|_| LegUrlError::Port(s.to_owned()))?;
        if port == 0 {
            return Err(LegUrlError::Port(s.to_owned()));
        }
        Ok(Self {
            scheme,
            host: host.to_owned(),
            port,
            path,
        })
    }
}

impl LegUrl {
    /// Whether the host names loopback without a lookup: a loopback IP literal, or
    /// `localhost` and the names under it (the egress policy's reading of them).
    pub fn host_is_loopback(&self) -> bool {
        crate::egress::is_localhost_name(&self.host)
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for LegUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.scheme.name();
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_known_without_a_lookup() {
        for (url, loopback) in [
            ("wt://127.0.0.1:1/", true),
            ("wt://127.9.9.9:1/", true),
            ("wt://[::1]:1/", true),
            ("wt://localhost:1/", true),
            ("wt://Edge.LOCALHOST.:1/", true),
            ("wt://10.0.0.1:1/", false),
            ("wt://[::2]:1/", false),
            ("wt://example.com:1/", false),
            ("wt://localhost.example:1/", false),
        ] {
            let u: LegUrl = url.parse().unwrap();
            assert_eq!(u.host_is_loopback(), loopback, "{url}");
        }
    }

    #[test]
    fn parses_and_prints() {
        for s in [
            "tcp://127.0.0.1:80",
            "tls://example.com:443",
            "tls://[::1]:8443",
            "quic://example.com:443",
            "wss://cdn.example.com:443/api/v1/stream",
            "ws://127.0.0.1:8080/",
        ] {
            assert_eq!(s.parse::<LegUrl>().unwrap().to_string(), s);
        }
        assert_eq!("tls://[::1]:8443".parse::<LegUrl>().unwrap().host, "::1");
        let ws = "wss://[::1]:443".parse::<LegUrl>().unwrap();
        assert_eq!((ws.host.as_str(), ws.path.as_str()), ("::1", "/"));
        assert!(matches!(
            "tls://h:1/path".parse::<LegUrl>(),
            Err(LegUrlError::Extra(_))
        ));
        assert!(matches!(
            "wss://h:1/a?b".parse::<LegUrl>(),
            Err(LegUrlError::Extra(_))
        ));
    }

    #[test]
    fn errors_are_precise() {
        assert!(matches!(
            "h:1".parse::<LegUrl>(),
            Err(LegUrlError::NoScheme(_))
        ));
        assert!(matches!(
            "udp://h:1".parse::<LegUrl>(),
            Err(LegUrlError::Scheme(_))
        ));
        assert!(matches!(
            "tls://h".parse::<LegUrl>(),
            Err(LegUrlError::Port(_))
        ));
        assert!(matches!(
            "tls://h:0".parse::<LegUrl>(),
            Err(LegUrlError::Port(_))
        ));
        assert!(matches!(
            "tls://h:99999".parse::<LegUrl>(),
            Err(LegUrlError::Port(_))
        ));
        assert!(matches!(
            "tls://h:1/x".parse::<LegUrl>(),
            Err(LegUrlError::Extra(_))
        ));
        assert!(matches!(
            "tls://:1".parse::<LegUrl>(),
            Err(LegUrlError::Host(_))
        ));
    }
}
