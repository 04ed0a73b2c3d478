//! Runtime-managed users: added, removed and disabled through the admin API, beyond those
//! in the configuration file (the server checks for clashes with those; this table only
//! knows its own).
//!
//! Every change commits before it returns; reads ([`Users::get_by_key`] during a
//! handshake) come from an in-memory mirror. Fail closed: a change that *grants* (adding a
//! user, enabling one) takes effect only once committed; one that *restricts* (removing,
//! disabling) takes effect in memory even if the commit fails, and the error is returned.
//!
//! Users defined elsewhere (the configuration file) can be disabled by name too
//! ([`Users::set_name_disabled`]); [`Users::disabled_names`] gives both kinds.
//!
//! Every user, of either kind, may have a [`UserPolicy`] ([`Users::set_policy`],
//! [`Users::policy`]), stored by name; see [`policy`](crate::policy).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};

use crate::db::{Rows, Store, DISABLED, DISABLED_NAME, POLICIES, POLICIES_NAME, USERS, USERS_NAME};
use crate::error::StateError;
use crate::policy::UserPolicy;

/// Longest user name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// One runtime user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Unique name: 1 to 64 of `A-Z a-z 0-9 . _ - @`.
    pub name: String,
    /// The user's static X25519 public key (unique too).
    pub public_key: [u8; 32],
    /// A disabled user's handshakes are refused.
    pub disabled: bool,
    /// When the user was added (whatever clock the caller passed; the admin API uses wall
    /// time, for display).
    pub added_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    public_key: String,
    disabled: bool,
    added_ms: u64,
}

#[derive(Default)]
pub(crate) struct Index {
    by_name: BTreeMap<String, UserRecord>,
    by_key: HashMap<[u8; 32], String>,
    /// Names disabled that are not runtime users (users of the configuration file).
    disabled_names: BTreeSet<String>,
    /// Stored policies by name (of either kind of user); never the default policy.
    policies: HashMap<String, UserPolicy>,
}

impl Index {
    fn insert(&mut self, u: UserRecord) {
        self.by_key.insert(u.public_key, u.name.clone());
        self.by_name.insert(u.name.clone(), u);
    }

    fn remove(&mut self, name: &str) -> Option<UserRecord> {
        let u = self.by_name.remove(name)?;
        self.by_key.remove(&u.public_key);
        Some(u)
    }
}

/// The runtime users; see the [module documentation](self).
pub struct Users {
    store: Arc<Store>,
    mirror: RwLock<Index>,
    writer: Mutex<()>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("count", &self.read().by_name.len())
            .finish()
    }
}

impl Users {
    pub(crate) fn new(store: Arc<Store>, index: Index) -> Self {
        Self {
            store,
            mirror: RwLock::new(index),
            writer: Mutex::new(()),
        }
    }

    pub(crate) fn load_rows(
        store: &Store,
        rows: Rows,
        disabled: Rows,
        policies: Rows,
    ) -> Result<Index, StateError> {
        let mut index = Index::default();
        for (k, v) in policies {
            let name = store.key_str(POLICIES_NAME, &k)?;
            let policy: UserPolicy = store.decode(POLICIES_NAME, &k, &v)?;
            // A name or a policy this build would refuse: fail closed.
            if check_name(&name).is_err() || policy.validate().is_err() {
                return Err(store.corrupt(POLICIES_NAME, &k));
            }
            if !policy.is_unlimited() {
                index.policies.insert(name, policy);
            }
        }
        for (k, _) in disabled {
            let name = store.key_str(DISABLED_NAME, &k)?;
            if check_name(&name).is_err() {
                return Err(store.corrupt(DISABLED_NAME, &k));
            }
            index.disabled_names.insert(name);
        }
        for (k, v) in rows {
            let name = store.key_str(USERS_NAME, &k)?;
            let s: Stored = store.decode(USERS_NAME, &k, &v)?;
            let public_key = hex::decode(&s.public_key)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| store.corrupt(USERS_NAME, &k))?;
            // Two users with one key, or a name this build would refuse: fail closed.
            if check_name(&name).is_err() || index.by_key.contains_key(&public_key) {
                return Err(store.corrupt(USERS_NAME, &k));
            }
            index.insert(UserRecord {
                name,
                public_key,
                disabled: s.disabled,
                added_ms: s.added_ms,
            });
        }
        Ok(index)
    }

    /// Adds an enabled user, committed before this returns. Refuses a name or a key that
    /// is already taken ([`StateError::UserNameTaken`], [`StateError::UserKeyTaken`]).
    pub fn add(
        &self,
        name: &str,
        public_key: [u8; 32],
        added_ms: u64,
    ) -> Result<UserRecord, StateError> {
        check_name(name)?;
        let _w = self.writer();
        {
            let m = self.read();
            if m.by_name.contains_key(name) {
                return Err(StateError::UserNameTaken {
                    name: name.to_owned(),
                });
            }
            if let Some(existing) = m.by_key.get(&public_key) {
                return Err(StateError::UserKeyTaken {
                    existing: existing.clone(),
                });
            }
        }
        let user = UserRecord {
            name: name.to_owned(),
            public_key,
            disabled: false,
            added_ms,
        };
        self.put(&user, "adding a user")?;
        self.write().insert(user.clone());
        Ok(user)
    }

    /// Removes a user, committed before this returns; returns what was removed.
    pub fn remove(&self, name: &str) -> Result<UserRecord, StateError> {
        let _w = self.writer();
        if !self.read().by_name.contains_key(name) {
            return Err(StateError::UnknownUser {
                name: name.to_owned(),
            });
        }
        let committed = self.store.write("removing a user", |txn| {
            let mut t = txn
                .open_table(USERS)
                .map_err(|e| self.store.err("removing a user", e))?;
            t.remove(name.as_bytes())
                .map_err(|e| self.store.err("removing a user", e))?;
            Ok(())
        });
        // Gone from memory even if the commit failed (fail closed).
        let removed = self.write().remove(name);
        committed?;
        removed.ok_or_else(|| StateError::UnknownUser {
            name: name.to_owned(),
        })
    }

    /// Disables or enables a user, committed before this returns; returns the new record.
    pub fn set_disabled(&self, name: &str, disabled: bool) -> Result<UserRecord, StateError> {
        let _w = self.writer();
        let mut user =
            self.read()
                .by_name
                .get(name)
                .cloned()
                .ok_or_else(|| StateError::UnknownUser {
                    name: name.to_owned(),
                })?;
        user.disabled = disabled;
        let committed = self.put(&user, "disabling or enabling a user");
        if committed.is_ok() || disabled {
            // Disabling applies even if the commit failed (fail closed); enabling does not.
            self.write().insert(user.clone());
        }
        committed.map(|()| user)
    }

    /// Disables or enables a user that is not a runtime user (one of the configuration
    /// file), by name; committed before this returns. Disabling applies in memory even if
    /// the commit fails (fail closed); enabling does not.
    pub fn set_name_disabled(&self, name: &str, disabled: bool) -> Result<(), StateError> {
        check_name(name)?;
        let _w = self.writer();
        let action = "disabling or enabling a user by name";
        let committed = self.store.write(action, |txn| {
            let mut t = txn
                .open_table(DISABLED)
                .map_err(|e| self.store.err(action, e))?;
            if disabled {
                t.insert(name.as_bytes(), &b""[..])
                    .map_err(|e| self.store.err(action, e))?;
            } else {
                t.remove(name.as_bytes())
                    .map_err(|e| self.store.err(action, e))?;
            }
            Ok(())
        });
        if committed.is_ok() || disabled {
            let mut m = self.write();
            if disabled {
                m.disabled_names.insert(name.to_owned());
            } else {
                m.disabled_names.remove(name);
            }
        }
        committed
    }

    /// Every disabled name: runtime users marked disabled and names disabled with
    /// [`Users::set_name_disabled`].
    pub fn disabled_names(&self) -> BTreeSet<String> {
        let m = self.read();
        m.by_name
            .values()
            .filter(|u| u.disabled)
            .map(|u| u.name.clone())
            .chain(m.disabled_names.iter().cloned())
            .collect()
    }

    /// Sets the policy of the user named `name` (a runtime user or one of the
    /// configuration file; the name need not exist anywhere yet), committed before this
    /// returns. [`UserPolicy::default`] removes the stored policy. Refuses a policy that
    /// does not pass [`UserPolicy::validate`] and a name [`check_name`] refuses.
    ///
    /// If the commit fails, the error is returned, and the new policy applies in memory
    /// anyway if it grants nothing ([`UserPolicy::at_least_as_strict_as`] the old one: a
    /// restriction applies, fail closed); otherwise the old policy stays.
    pub fn set_policy(&self, name: &str, policy: UserPolicy) -> Result<(), StateError> {
        check_name(name)?;
        policy.validate()?;
        let action = "setting a user's policy";
        let value = if policy.is_unlimited() {
            None
        } else {
            Some(self.store.encode(&policy)?)
        };
        let _w = self.writer();
        let committed = self.store.write(action, |txn| {
            let mut t = txn
                .open_table(POLICIES)
                .map_err(|e| self.store.err(action, e))?;
            match &value {
                Some(v) => t.insert(name.as_bytes(), v.as_slice()),
                None => t.remove(name.as_bytes()),
            }
            .map_err(|e| self.store.err(action, e))?;
            Ok(())
        });
        let apply = committed.is_ok() || {
            let m = self.read();
            let old = m.policies.get(name).cloned().unwrap_or_default();
            policy.at_least_as_strict_as(&old)
        };
        if apply {
            let mut m = self.write();
            if policy.is_unlimited() {
                m.policies.remove(name);
            } else {
                m.policies.insert(name.to_owned(), policy);
            }
        }
        committed
    }

    /// The policy of the user named `name`: the one stored, or [`UserPolicy::default`]
    /// (unlimited). Memory only.
    pub fn policy(&self, name: &str) -> UserPolicy {
        self.read().policies.get(name).cloned().unwrap_or_default()
    }

    /// Every stored policy (those that are not the default), sorted by name.
    pub fn policies(&self) -> BTreeMap<String, UserPolicy> {
        self.read()
            .policies
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every user, sorted by name.
    pub fn list(&self) -> Vec<UserRecord> {
        self.read().by_name.values().cloned().collect()
    }

    /// The user named `name`.
    pub fn get(&self, name: &str) -> Option<UserRecord> {
        self.read().by_name.get(name).cloned()
    }

    /// The user whose public key is `public_key` (disabled or not: check
    /// [`UserRecord::disabled`]). Memory only.
    pub fn get_by_key(&self, public_key: &[u8; 32]) -> Option<UserRecord> {
        let m = self.read();
        m.by_key
            .get(public_key)
            .and_then(|name| m.by_name.get(name))
            .cloned()
    }

    fn put(&self, user: &UserRecord, action: &'static str) -> Result<(), StateError> {
        let value = self.store.encode(&Stored {
            public_key: hex::encode(user.public_key),
            disabled: user.disabled,
            added_ms: user.added_ms,
        })?;
        self.store.write(action, |txn| {
            let mut t = txn
                .open_table(USERS)
                .map_err(|e| self.store.err(action, e))?;
            t.insert(user.name.as_bytes(), value.as_slice())
                .map_err(|e| self.store.err(action, e))?;
            Ok(())
        })
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.mirror.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.mirror.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Refuses names outside 1 to 64 of `A-Z a-z 0-9 . _ - @` (they end up in limiter and ban
/// keys such as `user:NAME:up`, and in logs).
pub fn check_name(name: &str) -> Result<(), StateError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok_char) {
        return Err(StateError::Invalid {
            what: "user name",
            reason: format!(
                "{name:?}: must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ - @"
            ),
        });
    }
    Ok(())
}
