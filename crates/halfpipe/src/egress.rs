//! The exit's egress policy: which destination addresses a stream may reach.
//!
//! An exit must never be an open door into its own network. By default every address
//! that is not globally routable is denied — loopback, private, link-local, CGNAT,
//! multicast, reserved, documentation, the unspecified address — and so are the server's
//! own addresses. IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64,
//! 6to4) are judged by that IPv4 address. An operator may allow specific ranges.
//! Domains are judged after resolution, and the connector connects only to the addresses
//! judged here, so a DNS answer cannot smuggle a denied address in.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use halfpipe_core::{ConnectStatus, TargetAddr};
use ipnet::IpNet;

/// The class of address that was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeniedRange {
    /// 0.0.0.0/8, ::
    Unspecified,
    /// 127.0.0.0/8, ::1
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7
    Private,
    /// 169.254/16, fe80::/10
    LinkLocal,
    /// 100.64/10
    SharedCgnat,
    /// 224/4, ff00::/8
    Multicast,
    /// 240/4, 255.255.255.255, 192.0.0/24, other special-purpose blocks
    Reserved,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 198.18/15, 2001:db8::/32
    Documentation,
    /// One of the exit's own addresses.
    OwnAddress,
    /// Not on the RESTRICTED mode's destination list.
    NotOnRestrictedList,
}

impl fmt::Display for DeniedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "unspecified address",
            Self::Loopback => "loopback range",
            Self::Private => "private range",
            Self::LinkLocal => "link-local range",
            Self::SharedCgnat => "shared (CGNAT) range",
            Self::Multicast => "multicast range",
            Self::Reserved => "reserved range",
            Self::Documentation => "documentation/benchmark range",
            Self::OwnAddress => "the exit's own address",
            Self::NotOnRestrictedList => {
                "ranges outside the allowed destinations (RESTRICTED mode's or this user's)"
            }
        })
    }
}

/// An address the policy refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{ip} is in the {range} (allow it explicitly in [egress] allow if intended)")]
pub struct Denied {
    /// The address.
    pub ip: IpAddr,
    /// Why.
    pub range: DeniedRange,
}

/// The policy itself.
#[derive(Clone, Debug, Default)]
pub struct EgressPolicy {
    allow: Vec<IpNet>,
    own: Vec<IpAddr>,
    /// Lists an address must be on, each (RESTRICTED mode, a user's allowed
    /// destinations), on top of everything else.
    only: Vec<Vec<IpNet>>,
}

impl EgressPolicy {
    /// A policy allowing the `allow` ranges despite the default deny, and denying `own`.
    pub fn new(allow: Vec<IpNet>, own: Vec<IpAddr>) -> Self {
        Self {
            allow,
            own,
            only: Vec::new(),
        }
    }

    /// The same policy narrowed to `only` (RESTRICTED mode's destination list, a user's
    /// allowed destinations): an address must be on it *and* pass every other check.
    pub fn restricted_to(&self, only: &[IpNet]) -> Self {
        let mut p = self.clone();
        p.only.push(only.to_vec());
        p
    }

    /// Adds the addresses of this machine's network interfaces to the denied own addresses
    /// (so an exit listening on 0.0.0.0 still refuses to connect to itself).
    pub fn with_interface_addresses(mut self) -> std::io::Result<Self> {
        for iface in if_addrs::get_if_addrs()? {
            let ip = iface.ip();
            if !self.own.contains(&ip) {
                self.own.push(ip);
            }
        }
        Ok(self)
    }

    /// Judges one address.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Denied> {
        let ip = canonical(ip);
        if self
            .only
            .iter()
            .any(|list| !list.iter().any(|n| n.contains(&ip)))
        {
            return Err(Denied {
                ip,
                range: DeniedRange::NotOnRestrictedList,
            });
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        if self.own.iter().any(|o| canonical(*o) == ip) {
            return Err(Denied {
                ip,
                range: DeniedRange::OwnAddress,
            });
        }
        match classify(ip) {
            Some(range) => Err(Denied { ip, range }),
            None => Ok(()),
        }
    }

    /// Resolves a target and keeps only addresses the policy allows. `NotAllowed` when
    /// none is, `HostUnreachable` when the name does not resolve.
    pub async fn resolve_and_check(
        &self,
        target: &TargetAddr,
    ) -> Result<Vec<SocketAddr>, ConnectStatus> {
        let candidates: Vec<SocketAddr> = match target {
            TargetAddr::Ip(a) => vec![*a],
            // RFC 6761: `localhost` names are loopback, answered here without a resolver.
            TargetAddr::Domain(host, port) if is_localhost_name(host) => vec![
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), *port),
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), *port),
            ],
            TargetAddr::Domain(host, port) => tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|_| ConnectStatus::HostUnreachable)?
                .collect(),
        };
        if candidates.is_empty() {
            return Err(ConnectStatus::HostUnreachable);
        }
        let allowed: Vec<SocketAddr> = candidates
            .iter()
            .filter(|a| self.check_ip(a.ip()).is_ok())
            .copied()
            .collect();
        if allowed.is_empty() {
            if let Some(d) = candidates.iter().find_map(|a| self.check_ip(a.ip()).err()) {
                tracing::info!(target: "security", %target, reason = %d, "egress denied");
            }
            return Err(ConnectStatus::NotAllowed);
        }
        Ok(allowed)
    }
}

/// Whether `host` is `localhost` or a name under it (RFC 6761 §6.3), any letter case, with
/// or without a trailing dot.
pub(crate) fn is_localhost_name(host: &str) -> bool {
    let h = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    h == "localhost" || h.ends_with(".localhost")
}

/// The IPv4 address an IPv6 address stands for, if it embeds one; else the address itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4); // ::ffff:a.b.c.d
    }
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return Some(tail); // ::a.b.c.d (deprecated IPv4-compatible)
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail); // 64:ff9b::/96 NAT64
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])); // 6to4
    }
    None
}

/// The denied class of an address, `None` when it is globally routable.
fn classify(ip: IpAddr) -> Option<DeniedRange> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<DeniedRange> {
    let o = ip.octets();
    use DeniedRange::*;
    Some(match o {
        [0, ..] => Unspecified,
        [127, ..] => Loopback,
        [10, ..] => Private,
        [172, b, ..] if (16..=31).contains(&b) => Private,
        [192, 168, ..] => Private,
        [169, 254, ..] => LinkLocal,
        [100, b, ..] if (64..=127).contains(&b) => SharedCgnat,
        [a, ..] if (224..=239).contains(&a) => Multicast,
        [a, ..] if a >= 240 => Reserved,
        [192, 0, 0, _] => Reserved,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Documentation,
        [198, b, ..] if b == 18 || b == 19 => Documentation,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<DeniedRange> {
    use DeniedRange::*;
    let s = ip.segments();
    Some(if ip.is_unspecified() {
        Unspecified
    } else if ip.is_loopback() {
        Loopback
    } else if s[0] & 0xfe00 == 0xfc00 {
        Private
    } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
        LinkLocal
    } else if s[0] & 0xff00 == 0xff00 {
        Multicast
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Documentation
    } else if s[0] & 0xe000 != 0x2000 {
        // Only 2000::/3 is global unicast; everything else is reserved or special.
        Reserved
    } else if s[0] == 0x2001 && s[1] < 0x0200 {
        // 2001::/23: IETF protocol assignments (Teredo, ORCHID, benchmarking, ...).
        Reserved
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(p: &EgressPolicy, ip: &str) -> DeniedRange {
        p.check_ip(ip.parse().unwrap())
            .expect_err(&format!("{ip} must be denied"))
            .range
    }

    #[test]
    fn restricted_narrows_but_never_widens() {
        let allow_lo: IpNet = "127.0.0.0/8".parse().unwrap();
        let p = EgressPolicy::new(vec![allow_lo], vec![]);
        let r = p.restricted_to(&["8.8.8.0/24".parse().unwrap(), allow_lo]);
        // On the list and otherwise allowed.
        assert!(r.check_ip("8.8.8.8".parse().unwrap()).is_ok());
        assert!(r.check_ip("127.0.0.1".parse().unwrap()).is_ok());
        // Allowed by the base policy, but not on the restricted list.
        assert_eq!(deny(&r, "1.1.1.1"), DeniedRange::NotOnRestrictedList);
        assert!(p.check_ip("1.1.1.1".parse().unwrap()).is_ok());
        // On the list, but denied by the base policy: still denied.
        let r = EgressPolicy::default().restricted_to(&["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(deny(&r, "10.1.2.3"), DeniedRange::Private);
        // Two narrowings (RESTRICTED and a user's list): an address must be on both.
        let both = p
            .restricted_to(&["8.8.0.0/16".parse().unwrap()])
            .restricted_to(&["8.8.8.0/24".parse().unwrap()]);
        assert!(both.check_ip("8.8.8.8".parse().unwrap()).is_ok());
        assert_eq!(deny(&both, "8.8.4.4"), DeniedRange::NotOnRestrictedList);
    }

    #[test]
    fn every_non_global_range_is_denied_by_default() {
        use DeniedRange::*;
        let p = EgressPolicy::default();
        let cases = [
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("::", Unspecified),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("::1", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("169.254.169.254", LinkLocal),
            ("fe80::1", LinkLocal),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.255", SharedCgnat),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::1", Multicast),
            ("240.0.0.1", Reserved),
            ("255.255.255.255", Reserved),
            ("192.0.0.8", Reserved),
            ("192.0.2.1", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("198.18.0.1", Documentation),
            ("198.19.255.1", Documentation),
            ("2001:db8::1", Documentation),
            ("100::1", Reserved),
            ("2001::1", Reserved),
            // IPv6 forms embedding IPv4 are judged by the IPv4 address.
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::127.0.0.1", Loopback),
            ("64:ff9b::a9fe:a9fe", LinkLocal),
            ("64:ff9b::c0a8:0101", Private),
            ("2002:7f00:0001::1", Loopback),
            ("2002:0a00:0001::", Private),
        ];
        for (ip, want) in cases {
            assert_eq!(deny(&p, ip), want, "{ip}");
        }
    }

    #[test]
    fn public_addresses_pass_and_allow_list_opens_exceptions() {
        let p = EgressPolicy::default();
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::808:808",
        ] {
            assert_eq!(p.check_ip(ip.parse().unwrap()), Ok(()), "{ip}");
        }
        let p = EgressPolicy::new(
            vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            vec![],
        );
        assert_eq!(p.check_ip("127.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(p.check_ip("::1".parse().unwrap()), Ok(()));
        assert_eq!(p.check_ip("::ffff:127.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(deny(&p, "10.0.0.1"), DeniedRange::Private);
    }

    #[test]
    fn own_addresses_are_denied_even_when_public() {
        let p = EgressPolicy::new(vec![], vec!["203.0.114.5".parse().unwrap()]);
        assert_eq!(deny(&p, "203.0.114.5"), DeniedRange::OwnAddress);
        assert_eq!(deny(&p, "::ffff:203.0.114.5"), DeniedRange::OwnAddress);
        assert_eq!(p.check_ip("203.0.114.6".parse().unwrap()), Ok(()));
    }

    #[test]
    fn interface_addresses_are_own_addresses() {
        let p = EgressPolicy::default().with_interface_addresses().unwrap();
        let ifaces = if_addrs::get_if_addrs().unwrap();
        assert!(!ifaces.is_empty());
        for i in ifaces {
            // Own addresses are judged before ranges, so each is refused as the exit's own.
            let denied = p.check_ip(i.ip()).unwrap_err();
            assert_eq!(denied.range, DeniedRange::OwnAddress, "{}", i.ip());
        }
    }

    #[tokio::test]
    async fn resolution_results_are_filtered_without_any_packet_sent() {
        // Literal addresses and localhost names (answered without a resolver) only: no
        // packet leaves the machine.
        let p = EgressPolicy::default();
        for t in [
            TargetAddr::Ip("127.0.0.1:80".parse().unwrap()),
            TargetAddr::Ip("[::1]:80".parse().unwrap()),
            TargetAddr::Domain("localhost".into(), 80),
        ] {
            assert_eq!(
                p.resolve_and_check(&t).await,
                Err(ConnectStatus::NotAllowed),
                "{t}"
            );
        }
        let p = EgressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
        let got = p
            .resolve_and_check(&TargetAddr::Domain("localhost".into(), 80))
            .await
            .unwrap();
        assert!(
            got.iter().all(|a| a.ip().is_loopback() && a.is_ipv4()),
            "{got:?}"
        );
    }
}
