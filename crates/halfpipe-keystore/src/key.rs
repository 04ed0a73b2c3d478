//! Key metadata: kinds, versioned ids, states, the public view ([`KeyInfo`]) and key
//! events for the audit log.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::KeyStoreError;

/// What a key is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyKind {
    /// The server's (or a client's own) X25519 static key for the Noise handshake. At most
    /// one is active; during a rotation the previous one is still accepted.
    ServerStatic,
    /// A user's X25519 static key, labelled with the user name. At most one active key
    /// per label.
    UserStatic,
    /// The Ed25519 seed that signs the audit log. At most one active.
    AuditSigning,
    /// The HMAC-SHA256 pepper of capability tokens. At most one active.
    TokenPepper,
    /// A client's copy of the exit's optional Noise pre-shared key (from a share link).
    /// At most one active.
    PreSharedKey,
}

impl KeyKind {
    /// Every kind.
    pub const ALL: [KeyKind; 5] = [
        KeyKind::ServerStatic,
        KeyKind::UserStatic,
        KeyKind::AuditSigning,
        KeyKind::TokenPepper,
        KeyKind::PreSharedKey,
    ];

    /// The name used in key ids and files: `server-static`, `user-static`,
    /// `audit-signing`, `token-pepper`, `pre-shared-key`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::ServerStatic => "server-static",
            KeyKind::UserStatic => "user-static",
            KeyKind::AuditSigning => "audit-signing",
            KeyKind::TokenPepper => "token-pepper",
            KeyKind::PreSharedKey => "pre-shared-key",
        }
    }

    /// Whether at most one key of this kind is active at a time (all but
    /// [`KeyKind::UserStatic`], which has one per label).
    pub fn is_singleton(self) -> bool {
        !matches!(self, KeyKind::UserStatic)
    }

    /// Whether keys of this kind are X25519 private keys (with a public key).
    pub fn is_x25519(self) -> bool {
        matches!(self, KeyKind::ServerStatic | KeyKind::UserStatic)
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyKind {
    type Err = KeyStoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                KeyStoreError::BadKeyId(format!(
                    "unknown key kind {s:?} (server-static, user-static, audit-signing, \
                     token-pepper, pre-shared-key)"
                ))
            })
    }
}

/// A versioned key id, `KIND-vN`, e.g. `server-static-v3`. Versions count up from 1 per
/// kind and are never reused, even after a key is revoked.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    /// The id of version `version` of `kind`.
    pub fn new(kind: KeyKind, version: u32) -> KeyId {
        KeyId(format!("{}-v{version}", kind.as_str()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The kind and version the id names.
    pub fn parts(&self) -> (KeyKind, u32) {
        // Every KeyId is built by `new` or checked by `from_str`.
        parse_id(&self.0).unwrap_or((KeyKind::ServerStatic, 0))
    }
}

fn parse_id(s: &str) -> Option<(KeyKind, u32)> {
    let (kind, version) = s.rsplit_once("-v")?;
    let kind = KeyKind::from_str(kind).ok()?;
    if version.is_empty()
        || version.starts_with('0')
        || !version.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let version: u32 = version.parse().ok()?;
    Some((kind, version))
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for KeyId {
    type Err = KeyStoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match parse_id(s) {
            Some((kind, version)) => Ok(KeyId::new(kind, version)),
            None => Err(KeyStoreError::BadKeyId(format!(
                "{s:?} is not a key id (KIND-vN, e.g. server-static-v3)"
            ))),
        }
    }
}

impl TryFrom<String> for KeyId {
    type Error = KeyStoreError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.0
    }
}

/// Where a key is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyState {
    /// In use: new handshakes, signatures and tokens use it.
    Active,
    /// Replaced by a rotation: still accepted (peers that know only this key still
    /// connect, tokens hashed with it still verify) until `until_ms`, then
    /// [`KeyStore::expire_retired`](crate::KeyStore::expire_retired) revokes it.
    Retiring {
        /// End of the overlap window (the caller's clock, milliseconds).
        until_ms: u64,
    },
    /// Revoked at `at_ms`: its secret is wiped; only the metadata remains, so its id is
    /// never handed out again.
    Revoked {
        /// When (the caller's clock, milliseconds).
        at_ms: u64,
    },
}

/// What the store tells about a key: metadata only, never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// The versioned id.
    pub id: KeyId,
    /// The kind.
    pub kind: KeyKind,
    /// The version (the `N` of the id).
    pub version: u32,
    /// The state.
    pub state: KeyState,
    /// A label, e.g. the user name of a [`KeyKind::UserStatic`] key.
    pub label: Option<String>,
    /// The public key: X25519 for static keys, Ed25519 for the audit signing key,
    /// `None` for the token pepper and the pre-shared key (and kept after revocation).
    #[serde(with = "crate::key::hex32")]
    pub public: Option<[u8; 32]>,
    /// When it was generated (the caller's clock, milliseconds).
    pub created_ms: u64,
}

impl KeyInfo {
    /// Whether the key is accepted at `now_ms`: active, or retiring with its window not
    /// yet over.
    pub fn is_accepting(&self, now_ms: u64) -> bool {
        match self.state {
            KeyState::Active => true,
            KeyState::Retiring { until_ms } => now_ms < until_ms,
            KeyState::Revoked { .. } => false,
        }
    }
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyAction {
    /// A key was generated.
    Created,
    /// A key made elsewhere was sealed into the store (a client's key from a share link).
    Imported,
    /// A new key replaced an active one, which is now retiring.
    Rotated,
    /// A key was revoked by the operator.
    Revoked,
    /// A retiring key's window ended and it was revoked.
    Expired,
}

/// A key event for the audit log, produced by every mutating operation once it is
/// saved, and collected with [`KeyStore::take_events`](crate::KeyStore::take_events).
///
/// (A failed unseal is not an event but the error of
/// [`KeyStore::open`](crate::KeyStore::open): audit it with
/// [`KeyStoreError::code`].)
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyEvent {
    /// What happened.
    pub action: KeyAction,
    /// The key it happened to (for [`KeyAction::Rotated`], the new key).
    pub id: KeyId,
    /// Its kind.
    pub kind: KeyKind,
    /// When (the caller's clock, milliseconds).
    pub at_ms: u64,
    /// Its label, if any.
    pub label: Option<String>,
    /// For [`KeyAction::Rotated`]: the key it replaces.
    pub replaces: Option<KeyId>,
    /// For [`KeyAction::Rotated`]: until when the replaced key is still accepted.
    pub until_ms: Option<u64>,
}

impl fmt::Display for KeyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            KeyAction::Created => "created",
            KeyAction::Imported => "imported",
            KeyAction::Rotated => "rotated",
            KeyAction::Revoked => "revoked",
            KeyAction::Expired => "expired",
        };
        write!(f, "key {action}: {}", self.id)?;
        if let Some(label) = &self.label {
            write!(f, " ({label})")?;
        }
        if let (Some(old), Some(until)) = (&self.replaces, self.until_ms) {
            write!(f, ", replaces {old} (accepted until {until} ms)")?;
        }
        Ok(())
    }
}

/// `Option<[u8; 32]>` as a hex string or `null`.
pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let id = KeyId::new(KeyKind::ServerStatic, 3);
        assert_eq!(id.as_str(), "server-static-v3");
        assert_eq!(id.parts(), (KeyKind::ServerStatic, 3));
        assert_eq!(
            "user-static-v12".parse::<KeyId>().unwrap().parts(),
            (KeyKind::UserStatic, 12)
        );
        for bad in [
            "",
            "server-static",
            "server-static-v",
            "server-static-v0",
            "server-static-v01",
            "x-v1",
            "token-pepper-v1x",
            "token-pepper-v99999999999",
        ] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
    }
}
