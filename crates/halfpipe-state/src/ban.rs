//! Bans: keys (`"src:1.2.3.4"`, `"user:alice"`, …) refused until a time on the
//! [service clock](crate::clock).
//!
//! - [`Bans::ban`] commits before it returns; [`Bans::banned`] reads an in-memory mirror
//!   (no disk access per handshake).
//! - A ban on a key already banned only ever **extends** it; only [`Bans::unban`] shortens.
//! - Expiry is measured in served time, so neither downtime nor a wall-clock change can
//!   shorten a ban (the wall clock is not an input to anything here).
//! - Expired bans are ignored at once and deleted lazily, at the next
//!   [`StateDb::flush`](crate::StateDb::flush).
//! - Fail closed: if committing a ban fails, the ban still applies in memory (and the error
//!   is returned); if committing an unban fails, the ban stays.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};

use crate::db::{Rows, Store, BANS, BANS_NAME};
use crate::error::StateError;

/// Longest ban key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Longest ban reason, in bytes.
pub const MAX_REASON_LEN: usize = 1024;

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// Banned while the service clock is below this (ms of served time).
    pub until_ms: u64,
    /// Why, for the operator.
    pub reason: String,
}

/// The ban list; see the [module documentation](self).
pub struct Bans {
    store: Arc<Store>,
    mirror: RwLock<HashMap<String, Ban>>,
    /// Serialises changes (readers of the mirror never wait for a commit).
    writer: Mutex<()>,
}

impl std::fmt::Debug for Bans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bans")
            .field("count", &self.read().len())
            .finish()
    }
}

impl Bans {
    pub(crate) fn new(store: Arc<Store>, bans: HashMap<String, Ban>) -> Self {
        Self {
            store,
            mirror: RwLock::new(bans),
            writer: Mutex::new(()),
        }
    }

    pub(crate) fn load_rows(store: &Store, rows: Rows) -> Result<HashMap<String, Ban>, StateError> {
        rows.into_iter()
            .map(|(k, v)| {
                let ban: Ban = store.decode(BANS_NAME, &k, &v)?;
                Ok((store.key_str(BANS_NAME, &k)?, ban))
            })
            .collect()
    }

    /// Bans `key` for `duration_ms` of served time from `now_ms`, committed before this
    /// returns. If the key is already banned until later, that ban stands unchanged;
    /// otherwise the new one (with its reason) replaces it. Returns the ban in force.
    pub fn ban(
        &self,
        key: &str,
        duration_ms: u64,
        reason: &str,
        now_ms: u64,
    ) -> Result<Ban, StateError> {
        check_key(key)?;
        if duration_ms == 0 {
            return Err(StateError::Invalid {
                what: "ban duration",
                reason: "a ban of 0 ms bans nothing".into(),
            });
        }
        if reason.len() > MAX_REASON_LEN {
            return Err(StateError::Invalid {
                what: "ban reason",
                reason: format!("longer than {MAX_REASON_LEN} bytes"),
            });
        }
        let _w = self.writer();
        let until_ms = now_ms.saturating_add(duration_ms);
        if let Some(current) = self.read().get(key) {
            if current.until_ms >= until_ms {
                return Ok(current.clone());
            }
        }
        let ban = Ban {
            until_ms,
            reason: reason.to_owned(),
        };
        let value = self.store.encode(&ban)?;
        let committed = self.store.write("recording a ban", |txn| {
            let mut t = txn
                .open_table(BANS)
                .map_err(|e| self.store.err("recording a ban", e))?;
            t.insert(key.as_bytes(), value.as_slice())
                .map_err(|e| self.store.err("recording a ban", e))?;
            Ok(())
        });
        // In force even if the commit failed (fail closed).
        self.write().insert(key.to_owned(), ban.clone());
        committed.map(|()| ban)
    }

    /// The ban on `key` in force at `now_ms`, if any. Memory only.
    pub fn banned(&self, key: &str, now_ms: u64) -> Option<Ban> {
        self.read()
            .get(key)
            .filter(|b| b.until_ms > now_ms)
            .cloned()
    }

    /// Lifts the ban on `key`, committed before this returns. Returns the ban that was
    /// stored (possibly already expired), if any.
    pub fn unban(&self, key: &str) -> Result<Option<Ban>, StateError> {
        let _w = self.writer();
        let had = self.store.write("lifting a ban", |txn| {
            let mut t = txn
                .open_table(BANS)
                .map_err(|e| self.store.err("lifting a ban", e))?;
            let had = t
                .remove(key.as_bytes())
                .map_err(|e| self.store.err("lifting a ban", e))?
                .is_some();
            Ok(had)
        })?;
        let mirrored = self.write().remove(key);
        Ok(if had { mirrored } else { None })
    }

    /// The bans in force at `now_ms`, sorted by key.
    pub fn list(&self, now_ms: u64) -> Vec<(String, Ban)> {
        let mut v: Vec<(String, Ban)> = self
            .read()
            .iter()
            .filter(|(_, b)| b.until_ms > now_ms)
            .map(|(k, b)| (k.clone(), b.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Held while a flush deletes expired bans, so that no ban is extended meanwhile.
    pub(crate) fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keys whose bans have expired at `now_ms`.
    pub(crate) fn expired(&self, now_ms: u64) -> Vec<String> {
        self.read()
            .iter()
            .filter(|(_, b)| b.until_ms <= now_ms)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Drops expired bans from memory once their rows are deleted.
    pub(crate) fn forget(&self, keys: &[String]) {
        let mut m = self.write();
        for k in keys {
            m.remove(k);
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Ban>> {
        self.mirror.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Ban>> {
        self.mirror.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn check_key(key: &str) -> Result<(), StateError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(StateError::Invalid {
            what: "ban key",
            reason: format!("must be 1 to {MAX_KEY_LEN} bytes"),
        });
    }
    Ok(())
}
