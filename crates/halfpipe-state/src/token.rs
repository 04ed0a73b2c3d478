//! Capability tokens for the admin API.
//!
//! A token is shown once, at creation, as `hpt_<id>_<secret>`: `id` is 8 random bytes in
//! lowercase hex (public: it names the token in listings and revocations), `secret` is 32
//! random bytes (256 bits) in lowercase hex. The database stores the id, name,
//! capabilities (by name), creation and expiry times, the revoked flag, the last use, and
//! `HMAC-SHA256(pepper, "halfpipe-token-v1\0" ‖ id ‖ secret)` — never the secret. The
//! [`Pepper`] is a separate 0600 file, so a copy of the database alone does not allow
//! checking guesses offline.
//!
//! [`Tokens::verify`] compares MACs in constant time ([`subtle`]) and only then looks at
//! revocation and expiry, so those are revealed only to a holder of the secret. Its errors
//! never contain the presented text.
//!
//! Times here are **wall-clock** milliseconds (an expiry is a date an operator chose),
//! passed in by the caller: a token is expired once `now_wall_ms >= expires_ms`. A wall
//! clock set too late expires tokens early (fails closed); one set too early keeps them
//! alive longer, which is why the server's clock-jump tripwire exists. There is no cache:
//! every verification reads the database (admin calls are rare).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;

use halfpipe_control::capability::{Capability, CapabilitySet};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::db::{Rows, StateDb, Store, TOKENS, TOKENS_NAME};
use crate::error::StateError;

/// The prefix of every presented token.
pub const PREFIX: &str = "hpt_";
/// Length of a presented token: `hpt_` + 16 hex + `_` + 64 hex.
pub const TOKEN_LEN: usize = 4 + 16 + 1 + 64;
/// Longest token name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

const MAC_DOMAIN: &[u8] = b"halfpipe-token-v1\0";

/// The server secret that keys token hashes: 32 random bytes, zeroized on drop, kept in
/// its own file (mode 0600), never in the database.
pub struct Pepper(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pepper(<redacted>)")
    }
}

impl Pepper {
    /// Creates a new pepper file at `path` (mode 0600; refuses to replace an existing file)
    /// holding 32 random bytes.
    pub fn create(path: impl AsRef<Path>) -> Result<Pepper, StateError> {
        let path = path.as_ref();
        let io = |action, source| StateError::Io {
            path: path.to_owned(),
            action,
            source,
        };
        let mut bytes = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(bytes.as_mut());
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                io(
                    "cannot create the token pepper (it must not exist yet: replacing it would invalidate every token)",
                    e,
                )
            })?;
        if let Err(e) = f.write_all(bytes.as_ref()).and_then(|()| f.sync_all()) {
            drop(f);
            let _ = fs::remove_file(path);
            return Err(io("cannot write the token pepper", e));
        }
        Ok(Pepper(bytes))
    }

    /// Loads the pepper at `path`, refusing a file that group or others may read (run
    /// `chmod 600`) or that is not exactly 32 bytes.
    pub fn load(path: impl AsRef<Path>) -> Result<Pepper, StateError> {
        let path = path.as_ref();
        let io = |action, source| StateError::Io {
            path: path.to_owned(),
            action,
            source,
        };
        let mut f = fs::File::open(path).map_err(|e| io("cannot open the token pepper", e))?;
        let meta = f
            .metadata()
            .map_err(|e| io("cannot read the token pepper's metadata", e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StateError::PepperPermissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() != 32 || !meta.is_file() {
            return Err(StateError::PepperLength {
                path: path.to_owned(),
                len: meta.len(),
            });
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        f.read_exact(bytes.as_mut())
            .map_err(|e| io("cannot read the token pepper", e))?;
        // It must not have grown in the meantime.
        let mut extra = [0u8; 1];
        if f.read(&mut extra)
            .map_err(|e| io("cannot read the token pepper", e))?
            != 0
        {
            return Err(StateError::PepperLength {
                path: path.to_owned(),
                len: 33,
            });
        }
        Ok(Pepper(bytes))
    }

    /// A pepper from bytes held elsewhere (the key store).
    pub fn from_bytes(bytes: [u8; 32]) -> Pepper {
        Pepper(Zeroizing::new(bytes))
    }

    fn mac(&self, id: &[u8; 8], secret: &[u8; 32]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref())
            .expect("HMAC accepts keys of any length");
        mac.update(MAC_DOMAIN);
        mac.update(id);
        mac.update(secret);
        mac.finalize().into_bytes().into()
    }
}

/// A freshly created token as presented to its holder: shown once, zeroized on drop.
/// `Debug` shows only the id; the string itself is reached through [`SecretToken::expose`].
pub struct SecretToken {
    text: Zeroizing<String>,
}

impl SecretToken {
    /// The token text, `hpt_<id>_<secret>`, to hand to its holder once.
    pub fn expose(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.text.get(PREFIX.len()..PREFIX.len() + 16).unwrap_or("");
        write!(f, "SecretToken({PREFIX}{id}_<redacted>)")
    }
}

/// What is known about a token (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The public id (16 lowercase hex characters).
    pub id: String,
    /// A label for operators.
    pub name: String,
    /// What the token may do.
    pub caps: CapabilitySet,
    /// When it was created (wall ms).
    pub created_ms: u64,
    /// When it expires (wall ms), if ever.
    pub expires_ms: Option<u64>,
    /// Whether it has been revoked.
    pub revoked: bool,
    /// When it was last verified successfully (wall ms).
    pub last_used_ms: Option<u64>,
}

/// Why a presented token was refused. Messages never contain the presented text.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not of the form `hpt_<16 hex>_<64 hex>`.
    #[error(
        "malformed token (expected hpt_ followed by 16 hex characters, _, and 64 hex characters)"
    )]
    Malformed,
    /// No token with this id, or the secret does not match.
    #[error("unknown token")]
    Unknown,
    /// The token was revoked.
    #[error("token revoked")]
    Revoked,
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// The database could not be read or updated (fail closed: the token is refused).
    #[error(transparent)]
    State(#[from] StateError),
}

#[derive(Serialize, Deserialize)]
struct Stored {
    name: String,
    caps: Vec<String>,
    created_ms: u64,
    expires_ms: Option<u64>,
    revoked: bool,
    last_used_ms: Option<u64>,
    /// HMAC, hex.
    mac: String,
}

struct Decoded {
    info: TokenInfo,
    mac: [u8; 32],
    stored: Stored,
}

fn decode(store: &Store, key: &[u8], value: &[u8]) -> Result<Decoded, StateError> {
    let id = store.key_str(TOKENS_NAME, key)?;
    let stored: Stored = store.decode(TOKENS_NAME, key, value)?;
    let corrupt = || store.corrupt(TOKENS_NAME, key);
    if parse_id(&id).is_none() {
        return Err(corrupt());
    }
    let mac = hex::decode(&stored.mac)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(corrupt)?;
    // An unknown capability name is refused, not dropped (fail closed).
    let caps = stored
        .caps
        .iter()
        .map(|c| Capability::from_str(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| corrupt())?;
    Ok(Decoded {
        info: TokenInfo {
            id,
            name: stored.name.clone(),
            caps: CapabilitySet::new(caps),
            created_ms: stored.created_ms,
            expires_ms: stored.expires_ms,
            revoked: stored.revoked,
            last_used_ms: stored.last_used_ms,
        },
        mac,
        stored,
    })
}

/// Checks that every stored token decodes (done at open).
pub(crate) fn validate_rows(store: &Store, rows: Rows) -> Result<(), StateError> {
    for (k, v) in rows {
        decode(store, &k, &v)?;
    }
    Ok(())
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_id(s: &str) -> Option<[u8; 8]> {
    if s.len() != 16 || !is_lower_hex(s) {
        return None;
    }
    let mut id = [0u8; 8];
    hex::decode_to_slice(s, &mut id).ok()?;
    Some(id)
}

/// Splits `hpt_<id>_<secret>`.
fn parse(presented: &str) -> Option<([u8; 8], Zeroizing<[u8; 32]>)> {
    if presented.len() != TOKEN_LEN {
        return None;
    }
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = (rest.get(..16)?, rest.get(16..)?);
    let secret = secret.strip_prefix('_')?;
    let id = parse_id(id)?;
    if !is_lower_hex(secret) {
        return None;
    }
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(secret, out.as_mut()).ok()?;
    Some((id, out))
}

/// The token table, keyed with a [`Pepper`]; see the [module documentation](self).
pub struct Tokens {
    db: StateDb,
    pepper: Pepper,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// The tokens of `db`, hashed with `pepper`. (A different pepper than the one the
    /// tokens were created with makes every token [`TokenError::Unknown`].)
    pub fn new(db: &StateDb, pepper: Pepper) -> Tokens {
        Tokens {
            db: db.clone(),
            pepper,
        }
    }

    /// Creates a token named `name` with `caps`, expiring at `expires_at_ms` (wall ms) or
    /// never, committed before this returns. The [`SecretToken`] is the only copy of the
    /// secret: show it once.
    pub fn create(
        &self,
        name: &str,
        caps: CapabilitySet,
        expires_at_ms: Option<u64>,
        now_wall_ms: u64,
    ) -> Result<(TokenInfo, SecretToken), StateError> {
        let name_ok = |c: char| c.is_ascii_graphic() || c == ' ';
        if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(name_ok) {
            return Err(StateError::Invalid {
                what: "token name",
                reason: format!("must be 1 to {MAX_NAME_LEN} printable ASCII characters"),
            });
        }
        if caps.is_empty() {
            return Err(StateError::Invalid {
                what: "token capabilities",
                reason: "a token without capabilities can do nothing; name at least one".into(),
            });
        }
        if let Some(exp) = expires_at_ms {
            if exp <= now_wall_ms {
                return Err(StateError::Invalid {
                    what: "token expiry",
                    reason: "already in the past".into(),
                });
            }
        }
        let store = self.db.store();
        let mut secret = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(secret.as_mut());
        let stored_caps: Vec<String> = caps.iter().map(|c| c.name().to_owned()).collect();
        let action = "creating a token";
        let id = store.write(action, |txn| {
            let mut t = txn.open_table(TOKENS).map_err(|e| store.err(action, e))?;
            // 64-bit ids: a collision is unlikely, but never overwrite one.
            let (id, id_hex) = loop {
                let mut id = [0u8; 8];
                OsRng.fill_bytes(&mut id);
                let id_hex = hex::encode(id);
                if t.get(id_hex.as_bytes())
                    .map_err(|e| store.err(action, e))?
                    .is_none()
                {
                    break (id, id_hex);
                }
            };
            let value = store.encode(&Stored {
                name: name.to_owned(),
                caps: stored_caps,
                created_ms: now_wall_ms,
                expires_ms: expires_at_ms,
                revoked: false,
                last_used_ms: None,
                mac: hex::encode(self.pepper.mac(&id, &secret)),
            })?;
            t.insert(id_hex.as_bytes(), value.as_slice())
                .map_err(|e| store.err(action, e))?;
            Ok(id)
        })?;
        let id_hex = hex::encode(id);
        let mut text = Zeroizing::new(String::with_capacity(TOKEN_LEN));
        text.push_str(PREFIX);
        text.push_str(&id_hex);
        text.push('_');
        // hex::encode would leave an unzeroized copy behind.
        for b in secret.iter() {
            for nibble in [b >> 4, b & 0xf] {
                text.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
            }
        }
        let info = TokenInfo {
            id: id_hex,
            name: name.to_owned(),
            caps,
            created_ms: now_wall_ms,
            expires_ms: expires_at_ms,
            revoked: false,
            last_used_ms: None,
        };
        Ok((info, SecretToken { text }))
    }

    /// Checks a presented token at `now_wall_ms` and records its use. In order: the form
    /// ([`TokenError::Malformed`]), the id and secret ([`TokenError::Unknown`], the MAC
    /// compared in constant time), then [`TokenError::Revoked`] and
    /// [`TokenError::Expired`].
    pub fn verify(&self, presented: &str, now_wall_ms: u64) -> Result<TokenInfo, TokenError> {
        let (id, secret) = parse(presented).ok_or(TokenError::Malformed)?;
        let id_hex = hex::encode(id);
        let computed = self.pepper.mac(&id, &secret);
        let store = self.db.store();
        let action = "verifying a token";
        let found = store.read(action, |txn| {
            let t = txn.open_table(TOKENS).map_err(|e| store.err(action, e))?;
            let row = t.get(id_hex.as_bytes()).map_err(|e| store.err(action, e))?;
            row.map(|v| decode(store, id_hex.as_bytes(), v.value()))
                .transpose()
        })?;
        // Compare against something even for an unknown id.
        let stored_mac = found.as_ref().map_or([0u8; 32], |d| d.mac);
        let matches: bool = computed.ct_eq(&stored_mac).into();
        let Some(d) = found.filter(|_| matches) else {
            return Err(TokenError::Unknown);
        };
        check_live(&d.info, now_wall_ms)?;
        // Record the use, re-checking under the write lock (a revocation may have landed).
        let action = "recording a token's use";
        let info = store.write(action, |txn| {
            let mut t = txn.open_table(TOKENS).map_err(|e| store.err(action, e))?;
            let current = match t.get(id_hex.as_bytes()).map_err(|e| store.err(action, e))? {
                Some(v) => decode(store, id_hex.as_bytes(), v.value())?,
                None => return Ok(Err(TokenError::Unknown)),
            };
            if let Err(e) = check_live(&current.info, now_wall_ms) {
                return Ok(Err(e));
            }
            let mut stored = current.stored;
            stored.last_used_ms = Some(now_wall_ms);
            let value = store.encode(&stored)?;
            t.insert(id_hex.as_bytes(), value.as_slice())
                .map_err(|e| store.err(action, e))?;
            let mut info = current.info;
            info.last_used_ms = Some(now_wall_ms);
            Ok(Ok(info))
        })??;
        Ok(info)
    }

    /// Every token (revoked and expired ones too), oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, StateError> {
        let store = self.db.store();
        let action = "listing tokens";
        let rows = store.read(action, |txn| store.rows(txn, TOKENS, action))?;
        let mut v = rows
            .iter()
            .map(|(k, v)| decode(store, k, v).map(|d| d.info))
            .collect::<Result<Vec<_>, _>>()?;
        v.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(v)
    }

    /// Revokes the token `id`, committed before this returns (revoking twice is harmless).
    /// The record stays, for listings.
    pub fn revoke(&self, id: &str) -> Result<TokenInfo, StateError> {
        let store = self.db.store();
        let action = "revoking a token";
        store.write(action, |txn| {
            let mut t = txn.open_table(TOKENS).map_err(|e| store.err(action, e))?;
            let current = match t.get(id.as_bytes()).map_err(|e| store.err(action, e))? {
                Some(v) => decode(store, id.as_bytes(), v.value())?,
                None => {
                    return Err(StateError::UnknownToken { id: id.to_owned() });
                }
            };
            let mut stored = current.stored;
            stored.revoked = true;
            let value = store.encode(&stored)?;
            t.insert(id.as_bytes(), value.as_slice())
                .map_err(|e| store.err(action, e))?;
            let mut info = current.info;
            info.revoked = true;
            Ok(info)
        })
    }
}

fn check_live(info: &TokenInfo, now_wall_ms: u64) -> Result<(), TokenError> {
    if info.revoked {
        return Err(TokenError::Revoked);
    }
    if info.expires_ms.is_some_and(|exp| now_wall_ms >= exp) {
        return Err(TokenError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_is_strict() {
        let good = format!("hpt_{}_{}", "0123456789abcdef", "ab".repeat(32));
        assert!(parse(&good).is_some());
        for bad in [
            String::new(),
            "hpt_".into(),
            good.to_uppercase(),
            good.replace("hpt_", "hpx_"),
            format!("{good}0"),
            good[..good.len() - 1].to_string(),
            good.replacen('_', "-", 2),
            format!("hpt_{}_{}", "0123456789abcdeg", "ab".repeat(32)),
            format!("hpt_{}_{}", "0123456789abcdef", "é".repeat(32)),
            format!("hpt_{}_{}", "0123456789abcdef", "+b".repeat(32)),
        ] {
            assert!(parse(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn the_mac_binds_id_and_secret_and_pepper() {
        let p = Pepper::from_bytes([7; 32]);
        let m = p.mac(&[1; 8], &[2; 32]);
        assert_ne!(m, p.mac(&[1; 8], &[3; 32]));
        assert_ne!(m, p.mac(&[4; 8], &[2; 32]));
        assert_ne!(m, Pepper::from_bytes([8; 32]).mac(&[1; 8], &[2; 32]));
        assert_eq!(format!("{p:?}"), "Pepper(<redacted>)");
    }
}
