//! Per-user policies: expiry, concurrent sessions, speed limits, a transfer quota and the
//! destinations a user may reach.
//!
//! A policy is stored per user **name** (table `user_policies`), so it applies to users of
//! the configuration file as well as to runtime users; [`Users::set_policy`] commits it
//! and [`Users::policy`] reads an in-memory mirror (it is called for every session and
//! stream). A name without a stored policy has [`UserPolicy::default`]: every limit
//! `None`, no destination list, i.e. unlimited. Removing a runtime user does not remove
//! its policy (a user of the same name added later inherits it); set the default policy
//! to clear it.
//!
//! This crate stores and validates policies; the server enforces them (it parses
//! [`UserPolicy::allowed_destinations`] itself, or with [`Network::parse`]), and
//! [`Quotas`](crate::Quotas) keeps the transfer counters.
//!
//! # Encoding
//!
//! The stored value is this type's JSON (`None` fields and an empty list omitted). Unknown
//! fields are refused, so a policy written by a newer build with a restriction this build
//! does not know refuses the open ([`StateError::Corrupt`]) instead of being silently
//! dropped (fail closed); so is a stored policy that does not pass
//! [`UserPolicy::validate`].
//!
//! [`Users::set_policy`]: crate::Users::set_policy
//! [`Users::policy`]: crate::Users::policy

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::error::StateError;

/// Most entries in [`UserPolicy::allowed_destinations`].
pub const MAX_DESTINATIONS: usize = 1024;
/// Longest entry in [`UserPolicy::allowed_destinations`], in bytes (the longest valid one,
/// `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128`, has 49).
pub const MAX_DESTINATION_LEN: usize = 64;

/// What one user may do. The default (every field `None` or empty) is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserPolicy {
    /// The user's handshakes are refused from this moment on (milliseconds since the Unix
    /// epoch, **wall clock**: an expiry date is a calendar concept). `None`: never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Most sessions (devices) the user may hold at once; at least 1. `None`: only the
    /// server's global per-user limit applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<u32>,
    /// Upload speed limit (client to destination), bytes per second over all the user's
    /// sessions; at least 1. `None`: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub up_bytes_per_sec: Option<u64>,
    /// Download speed limit (destination to client), bytes per second over all the user's
    /// sessions; at least 1. `None`: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_bytes_per_sec: Option<u64>,
    /// Transfer quota (both directions together) per calendar period, counted by
    /// [`Quotas`](crate::Quotas). `None`: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// Networks the user may open streams to, as text: `a.b.c.d/n`, `x:y::/n` or a bare
    /// address (see [`Network::parse`]). Empty: every destination the server allows.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_destinations: Vec<String>,
}

/// A transfer quota: `bytes` per calendar `period` (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Bytes per period, both directions together; at least 1.
    pub bytes: u64,
    /// The period the counter covers.
    pub period: QuotaPeriod,
}

/// The calendar period a [`Quota`] covers, in UTC. Serialized as `"day"` or `"month"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    /// A UTC calendar day, 00:00:00 to 24:00:00.
    Day,
    /// A UTC calendar month, from 00:00:00 on the 1st to 00:00:00 on the 1st of the next.
    Month,
}

impl QuotaPeriod {
    /// `"day"` or `"month"`, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }
}

impl fmt::Display for QuotaPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl UserPolicy {
    /// Whether every limit is off (the policy of a name without a stored one).
    pub fn is_unlimited(&self) -> bool {
        *self == UserPolicy::default()
    }

    /// Whether the user has expired at `now_wall_ms` (wall clock, ms since the Unix
    /// epoch): `now_wall_ms >= expires_at_ms`.
    pub fn expired(&self, now_wall_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_wall_ms >= at)
    }

    /// Checks every field: limits of at least 1 and destinations that parse as networks
    /// ([`Network::parse`]). The error names the field and, for a destination, its index.
    pub fn validate(&self) -> Result<(), StateError> {
        let at_least_one = |what: &'static str, v: Option<u64>, zero_means: &str| {
            if v == Some(0) {
                return Err(StateError::Invalid {
                    what,
                    reason: format!("must be at least 1 when set (0 would {zero_means}); leave it unset for no limit"),
                });
            }
            Ok(())
        };
        at_least_one(
            "max_sessions",
            self.max_sessions.map(u64::from),
            "refuse every session: disable the user instead",
        )?;
        at_least_one(
            "up_bytes_per_sec",
            self.up_bytes_per_sec,
            "stall every upload",
        )?;
        at_least_one(
            "down_bytes_per_sec",
            self.down_bytes_per_sec,
            "stall every download",
        )?;
        at_least_one(
            "quota bytes",
            self.quota.map(|q| q.bytes),
            "refuse every byte: disable the user instead",
        )?;
        if self.allowed_destinations.len() > MAX_DESTINATIONS {
            return Err(StateError::Invalid {
                what: "allowed_destinations",
                reason: format!(
                    "{} entries, at most {MAX_DESTINATIONS}: merge them into wider networks",
                    self.allowed_destinations.len()
                ),
            });
        }
        for (i, d) in self.allowed_destinations.iter().enumerate() {
            Network::parse(d).map_err(|reason| StateError::Invalid {
                what: "allowed_destinations",
                reason: format!("entry {i}: {reason}"),
            })?;
        }
        Ok(())
    }

    /// The parsed [`UserPolicy::allowed_destinations`]; an entry that does not parse is an
    /// error (as in [`UserPolicy::validate`]).
    pub fn networks(&self) -> Result<Vec<Network>, StateError> {
        self.allowed_destinations
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Network::parse(d).map_err(|reason| StateError::Invalid {
                    what: "allowed_destinations",
                    reason: format!("entry {i}: {reason}"),
                })
            })
            .collect()
    }

    /// Whether `dest` is allowed: the list is empty (no restriction), or one of its
    /// networks contains `dest` ([`Network::contains`]). An entry that does not parse
    /// allows nothing (a policy from [`Users::policy`](crate::Users::policy) is always
    /// valid). Parses the list on every call: a server checking many streams should keep
    /// [`UserPolicy::networks`] instead.
    pub fn allows_destination(&self, dest: IpAddr) -> bool {
        self.allowed_destinations.is_empty()
            || self
                .allowed_destinations
                .iter()
                .filter_map(|d| Network::parse(d).ok())
                .any(|n| n.contains(dest))
    }

    /// Whether `self` restricts at least as much as `other` in every field (so replacing
    /// `other` by `self` grants nothing). Quotas of different periods are not comparable
    /// (`false`).
    pub fn at_least_as_strict_as(&self, other: &UserPolicy) -> bool {
        // `None` is no limit: a Some is stricter than None, and the smaller Some stricter.
        fn le<T: Ord + Copy>(new: Option<T>, old: Option<T>) -> bool {
            match (new, old) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(n), Some(o)) => n <= o,
            }
        }
        let quota = match (self.quota, other.quota) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(n), Some(o)) => n.period == o.period && n.bytes <= o.bytes,
        };
        let destinations = if other.allowed_destinations.is_empty() {
            true
        } else if self.allowed_destinations.is_empty() {
            false
        } else {
            match (self.networks(), other.networks()) {
                (Ok(new), Ok(old)) => new.iter().all(|n| old.iter().any(|o| o.covers(n))),
                _ => false,
            }
        };
        le(self.expires_at_ms, other.expires_at_ms)
            && le(self.max_sessions, other.max_sessions)
            && le(self.up_bytes_per_sec, other.up_bytes_per_sec)
            && le(self.down_bytes_per_sec, other.down_bytes_per_sec)
            && quota
            && destinations
    }
}

/// An IP network: an address and a prefix length, with every bit after the prefix zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Network {
    addr: IpAddr,
    prefix_len: u8,
}

impl Network {
    /// Parses `a.b.c.d/n` (n ≤ 32), `x:y::/n` (n ≤ 128), or a bare address (a network of
    /// one: `/32` or `/128`).
    ///
    /// Strict, so that an allow-list means exactly what it says: no whitespace, no zone
    /// (`%eth0`), no brackets, a prefix of plain decimal digits without leading zeros, IPv4
    /// octets without leading zeros (std's parser), and no bits set after the prefix
    /// (`10.0.0.1/8` is refused with a hint to write `10.0.0.0/8`). The error is a
    /// sentence naming the entry.
    pub fn parse(s: &str) -> Result<Network, String> {
        if s.is_empty() {
            return Err("an empty entry: write a network such as 10.0.0.0/8 or an address".into());
        }
        if s.len() > MAX_DESTINATION_LEN {
            return Err(format!(
                "longer than {MAX_DESTINATION_LEN} bytes: not an IP network"
            ));
        }
        if s.chars().any(|c| c.is_whitespace()) {
            return Err(format!("{s:?}: contains whitespace"));
        }
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            let which = if prefix_text.is_some() {
                format!("{s:?}: {addr_text:?}")
            } else {
                format!("{s:?}")
            };
            format!("{which} is not an IPv4 or IPv6 address (no host names, zones or brackets)")
        })?;
        let max = match addr {
            IpAddr::V4(_) => 32u8,
            IpAddr::V6(_) => 128u8,
        };
        let prefix_len = match prefix_text {
            None => max,
            Some(p) => {
                let digits_ok = !p.is_empty()
                    && p.len() <= 3
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (p == "0" || !p.starts_with('0'));
                let n = if digits_ok {
                    p.parse::<u8>().ok()
                } else {
                    None
                };
                match n {
                    Some(n) if n <= max => n,
                    _ => {
                        return Err(format!(
                            "{s:?}: the prefix length after '/' must be a number from 0 to {max}"
                        ))
                    }
                }
            }
        };
        let net = Network { addr, prefix_len };
        let masked = net.network_address();
        if masked != addr {
            return Err(format!(
                "{s:?}: bits are set after the /{prefix_len} prefix; did you mean {masked}/{prefix_len}?"
            ));
        }
        Ok(net)
    }

    /// The network's (first) address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length: 0 to 32 for IPv4, 0 to 128 for IPv6.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is
    /// taken as the IPv4 address it maps (that is where a connection to it goes); otherwise
    /// an IPv4 address is never in an IPv6 network, nor the reverse.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask32(self.prefix_len);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask128(self.prefix_len);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Network) -> bool {
        self.prefix_len <= other.prefix_len && self.contains(other.addr)
    }

    fn network_address(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(self.prefix_len)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(self.prefix_len)).into()),
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

fn mask32(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0)
}

fn mask128(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len.min(128)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_networks_and_bare_addresses() {
        let n = Network::parse("10.0.0.0/8").unwrap();
        assert_eq!((n.addr(), n.prefix_len()), (ip("10.0.0.0"), 8));
        assert!(n.contains(ip("10.255.1.2")));
        assert!(!n.contains(ip("11.0.0.0")));
        assert!(n.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!n.contains(ip("::a00:1")));

        let n = Network::parse("192.0.2.7").unwrap();
        assert_eq!(n.prefix_len(), 32);
        assert!(n.contains(ip("192.0.2.7")) && !n.contains(ip("192.0.2.8")));

        let n = Network::parse("2001:db8::/32").unwrap();
        assert!(n.contains(ip("2001:db8:ffff::1")));
        assert!(!n.contains(ip("2001:db9::")));
        assert!(!n.contains(ip("10.0.0.1")));
        assert_eq!(n.to_string(), "2001:db8::/32");

        let n = Network::parse("::1").unwrap();
        assert_eq!(n.prefix_len(), 128);
        assert!(n.contains(ip("::1")));

        let all4 = Network::parse("0.0.0.0/0").unwrap();
        assert!(all4.contains(ip("255.255.255.255")) && all4.contains(ip("0.0.0.0")));
        let all6 = Network::parse("::/0").unwrap();
        assert!(all6.contains(ip("ffff::")) && !all6.contains(ip("1.2.3.4")));
        assert!(Network::parse("255.255.255.255/32").is_ok());
        assert!(Network::parse("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128").is_ok());
        assert!(Network::parse("::ffff:10.0.0.0/104").is_ok());
    }

    #[test]
    fn refuses_anything_ambiguous_with_a_reason() {
        for (bad, says) in [
            ("", "empty"),
            (" 10.0.0.0/8", "whitespace"),
            ("10.0.0.0/8 ", "whitespace"),
            ("10.0.0.0 /8", "whitespace"),
            ("example.com", "not an IPv4 or IPv6 address"),
            ("10.0.0/8", "not an IPv4 or IPv6 address"),
            ("010.0.0.0/8", "not an IPv4 or IPv6 address"),
            ("[::1]/128", "not an IPv4 or IPv6 address"),
            ("fe80::1%eth0", "not an IPv4 or IPv6 address"),
            ("10.0.0.0/33", "0 to 32"),
            ("::/129", "0 to 128"),
            ("10.0.0.0/", "0 to 32"),
            ("10.0.0.0/08", "0 to 32"),
            ("10.0.0.0/+8", "0 to 32"),
            ("10.0.0.0/-1", "0 to 32"),
            ("10.0.0.0/8/8", "0 to 32"),
            ("10.0.0.0/0008", "0 to 32"),
            ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
            ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
            ("/8", "not an IPv4 or IPv6 address"),
        ] {
            let e = Network::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert!(Network::parse(&"1".repeat(65))
            .unwrap_err()
            .contains("longer"));
    }

    #[test]
    fn covers_is_containment_of_networks() {
        let p = |s| Network::parse(s).unwrap();
        assert!(p("10.0.0.0/8").covers(&p("10.1.0.0/16")));
        assert!(p("10.0.0.0/8").covers(&p("10.0.0.0/8")));
        assert!(!p("10.1.0.0/16").covers(&p("10.0.0.0/8")));
        assert!(!p("10.0.0.0/8").covers(&p("11.0.0.0/16")));
        assert!(!p("::/0").covers(&p("10.0.0.0/8")));
    }

    #[test]
    fn strictness_compares_every_field() {
        let open = UserPolicy::default();
        let strict = UserPolicy {
            expires_at_ms: Some(10),
            max_sessions: Some(1),
            up_bytes_per_sec: Some(1),
            down_bytes_per_sec: Some(1),
            quota: Some(Quota {
                bytes: 1,
                period: QuotaPeriod::Day,
            }),
            allowed_destinations: vec!["10.0.0.0/8".into()],
        };
        assert!(strict.at_least_as_strict_as(&open));
        assert!(!open.at_least_as_strict_as(&strict));
        assert!(strict.at_least_as_strict_as(&strict));
        let narrower = UserPolicy {
            allowed_destinations: vec!["10.1.0.0/16".into(), "10.2.0.1".into()],
            ..strict.clone()
        };
        assert!(narrower.at_least_as_strict_as(&strict));
        assert!(!strict.at_least_as_strict_as(&narrower));
        let monthly = UserPolicy {
            quota: Some(Quota {
                bytes: 1,
                period: QuotaPeriod::Month,
            }),
            ..strict.clone()
        };
        assert!(!monthly.at_least_as_strict_as(&strict), "periods differ");
        let later = UserPolicy {
            expires_at_ms: Some(11),
            ..strict.clone()
        };
        assert!(!later.at_least_as_strict_as(&strict));
    }

    #[test]
    fn expiry_and_destinations() {
        let p = UserPolicy {
            expires_at_ms: Some(1_000),
            allowed_destinations: vec!["192.0.2.0/24".into(), "2001:db8::/32".into()],
            ..UserPolicy::default()
        };
        assert!(!p.expired(999));
        assert!(p.expired(1_000));
        assert!(!UserPolicy::default().expired(u64::MAX));
        assert!(p.allows_destination(ip("192.0.2.200")));
        assert!(p.allows_destination(ip("2001:db8::5")));
        assert!(!p.allows_destination(ip("198.51.100.1")));
        assert!(UserPolicy::default().allows_destination(ip("198.51.100.1")));
        assert_eq!(p.networks().unwrap().len(), 2);
    }

    #[test]
    fn serde_is_lowercase_compact_and_strict() {
        let p = UserPolicy {
            quota: Some(Quota {
                bytes: 5,
                period: QuotaPeriod::Month,
            }),
            ..UserPolicy::default()
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"quota":{"bytes":5,"period":"month"}}"#);
        assert_eq!(serde_json::from_str::<UserPolicy>(&json).unwrap(), p);
        assert_eq!(
            serde_json::from_str::<UserPolicy>("{}").unwrap(),
            UserPolicy::default()
        );
        assert!(serde_json::from_str::<UserPolicy>(r#"{"max_sesions":1}"#).is_err());
        assert!(serde_json::from_str::<Quota>(r#"{"bytes":1,"period":"Day"}"#).is_err());
        assert!(serde_json::from_str::<Quota>(r#"{"bytes":1,"period":"week"}"#).is_err());
    }
}
