//! Capabilities: what an admin token may do. Each admin endpoint names exactly one.

use std::fmt;
use std::str::FromStr;

/// One thing an admin token may do. `Admin` implies every other capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// Read the server's status and metrics summary.
    Status,
    /// List live sessions.
    SessionsRead,
    /// Close live sessions.
    SessionsKill,
    /// Change the mode (escalating needs no capability inside the server; de-escalating does).
    ModeSet,
    /// List, add, remove, disable users.
    UsersManage,
    /// Create, list and revoke tokens.
    TokensManage,
    /// Read the audit log.
    LogRead,
    /// Verify the audit log.
    LogVerify,
    /// Re-read the configuration.
    Reload,
    /// List and rotate the key store's keys (never read a secret: nothing can).
    KeysManage,
    /// Everything.
    Admin,
}

impl Capability {
    /// Every capability, in a fixed order.
    pub const ALL: [Capability; 11] = [
        Capability::Status,
        Capability::SessionsRead,
        Capability::SessionsKill,
        Capability::ModeSet,
        Capability::UsersManage,
        Capability::TokensManage,
        Capability::LogRead,
        Capability::LogVerify,
        Capability::Reload,
        Capability::KeysManage,
        Capability::Admin,
    ];

    /// The name used in the API, on the command line and in storage.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Status => "status",
            Capability::SessionsRead => "sessions.read",
            Capability::SessionsKill => "sessions.kill",
            Capability::ModeSet => "mode.set",
            Capability::UsersManage => "users.manage",
            Capability::TokensManage => "tokens.manage",
            Capability::LogRead => "log.read",
            Capability::LogVerify => "log.verify",
            Capability::Reload => "reload",
            Capability::KeysManage => "keys.manage",
            Capability::Admin => "admin",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A capability name that is not one of [`Capability::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown capability {0:?} (known: status, sessions.read, sessions.kill, mode.set, users.manage, tokens.manage, log.read, log.verify, reload, keys.manage, admin)")]
pub struct UnknownCapability(pub String);

impl FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| UnknownCapability(s.to_string()))
    }
}

/// A set of capabilities held by a token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapabilitySet(std::collections::BTreeSet<Capability>);

impl CapabilitySet {
    /// A set from a list.
    pub fn new(caps: impl IntoIterator<Item = Capability>) -> Self {
        Self(caps.into_iter().collect())
    }

    /// Whether the set allows `cap` (directly or through `admin`).
    pub fn allows(&self, cap: Capability) -> bool {
        self.0.contains(&Capability::Admin) || self.0.contains(&cap)
    }

    /// The capabilities, in order.
    pub fn iter(&self) -> impl Iterator<Item = Capability> + '_ {
        self.0.iter().copied()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses a comma-separated list (`"status,sessions.read"`).
    pub fn parse_list(s: &str) -> Result<Self, UnknownCapability> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(Capability::from_str)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// The names, comma-separated.
    pub fn to_list(&self) -> String {
        self.iter()
            .map(Capability::name)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for c in Capability::ALL {
            assert_eq!(c.name().parse::<Capability>().unwrap(), c);
        }
        assert!("root".parse::<Capability>().is_err());
        assert!(CapabilitySet::parse_list("status,bogus").is_err());
    }

    #[test]
    fn admin_implies_everything_and_others_only_themselves() {
        let admin = CapabilitySet::new([Capability::Admin]);
        let status = CapabilitySet::new([Capability::Status]);
        for c in Capability::ALL {
            assert!(admin.allows(c));
            assert_eq!(status.allows(c), c == Capability::Status);
        }
        assert!(!CapabilitySet::default().allows(Capability::Status));
    }
}
