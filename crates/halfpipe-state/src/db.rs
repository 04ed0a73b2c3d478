//! The database: one redb file holding every table, opened (and fully checked) once.
//!
//! Tables (keys and values are bytes; values are JSON unless noted):
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | `schema`, `served_ms` | 8 bytes little-endian |
//! | `limits` | limiter key | TAT, 8 bytes little-endian ns of served time |
//! | `bans` | ban key | `{until_ms, reason}` |
//! | `tokens` | token id (hex) | name, capabilities, times, revoked, HMAC |
//! | `users` | user name | public key (hex), disabled, added |
//! | `disabled_names` | user name (of the configuration file) | empty |
//! | `user_policies` | user name | a [`UserPolicy`](crate::UserPolicy) |
//! | `quotas` | user name | `{day, day_used, month, month_used}` ([`Quotas`]) |
//!
//! Schema 2 added `user_policies` and `quotas`; a schema 1 file is upgraded when opened
//! (the tables are created and the schema recorded as 2). A build that knows only schema 1
//! then refuses the file instead of running without the policies and quotas in it (fail
//! closed).
//!
//! Opening checks redb's page checksums and decodes every stored value; anything that
//! does not decode refuses the open (fail closed), so a server never runs on state it
//! half understands. Every write transaction uses two-phase commit, so a damaged newest
//! commit is reported as corruption rather than silently rolled back to an older state
//! (which could resurrect a revoked token).
//!
//! redb asserts on some malformed files instead of returning an error; opening catches
//! such a panic and reports [`StateError::CorruptFile`] (the panic message still reaches
//! stderr through the panic hook, and in a build with `panic = "abort"` the process stops
//! instead: closed either way).

use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ban::Bans;
use crate::clock::{Monotonic, ServiceClock, SystemMonotonic};
use crate::error::{redb_error, StateError};
use crate::quota::{Quotas, DEFAULT_MAX_QUOTA_KEYS};
use crate::ratelimit::{Limiter, DEFAULT_MAX_KEYS};
use crate::token;
use crate::users::Users;

/// The schema this build reads and writes.
pub const SCHEMA: u64 = 2;

/// Older schemas this build upgrades when it opens them: 1 (before `user_policies` and
/// `quotas`).
pub const UPGRADES_FROM: &[u64] = &[1];

pub(crate) type Table = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// Rows as read: (key, value) bytes.
pub(crate) type Rows = Vec<(Vec<u8>, Vec<u8>)>;

pub(crate) const META_NAME: &str = "meta";
pub(crate) const LIMITS_NAME: &str = "limits";
pub(crate) const BANS_NAME: &str = "bans";
pub(crate) const TOKENS_NAME: &str = "tokens";
pub(crate) const USERS_NAME: &str = "users";
pub(crate) const DISABLED_NAME: &str = "disabled_names";
pub(crate) const POLICIES_NAME: &str = "user_policies";
pub(crate) const QUOTAS_NAME: &str = "quotas";

pub(crate) const META: Table = TableDefinition::new(META_NAME);
pub(crate) const LIMITS: Table = TableDefinition::new(LIMITS_NAME);
pub(crate) const BANS: Table = TableDefinition::new(BANS_NAME);
pub(crate) const TOKENS: Table = TableDefinition::new(TOKENS_NAME);
pub(crate) const USERS: Table = TableDefinition::new(USERS_NAME);
pub(crate) const DISABLED: Table = TableDefinition::new(DISABLED_NAME);
pub(crate) const POLICIES: Table = TableDefinition::new(POLICIES_NAME);
pub(crate) const QUOTAS: Table = TableDefinition::new(QUOTAS_NAME);

const SCHEMA_KEY: &[u8] = b"schema";
const SERVED_KEY: &[u8] = b"served_ms";

/// redb's page cache: the state is small.
const CACHE_BYTES: usize = 16 << 20;

/// The open redb database and its path, shared by every part of the state.
pub(crate) struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// A redb error on this file.
    pub(crate) fn err(&self, action: &'static str, e: impl Into<redb::Error>) -> StateError {
        redb_error(&self.path, action, e)
    }

    /// A value that does not decode.
    pub(crate) fn corrupt(&self, table: &'static str, key: &[u8]) -> StateError {
        StateError::Corrupt {
            path: self.path.clone(),
            table,
            key: String::from_utf8_lossy(key).into_owned(),
        }
    }

    /// Decodes a JSON value, or reports it corrupt.
    pub(crate) fn decode<T: DeserializeOwned>(
        &self,
        table: &'static str,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<T, StateError> {
        serde_json::from_slice(bytes).map_err(|_| self.corrupt(table, key))
    }

    /// Encodes a value as JSON.
    pub(crate) fn encode<T: Serialize>(&self, v: &T) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(v).map_err(|e| StateError::Storage {
            path: self.path.clone(),
            action: "encoding a value",
            detail: e.to_string(),
        })
    }

    /// Decodes a key that must be UTF-8.
    pub(crate) fn key_str(&self, table: &'static str, key: &[u8]) -> Result<String, StateError> {
        String::from_utf8(key.to_vec()).map_err(|_| self.corrupt(table, key))
    }

    /// Runs `f` in a write transaction (two-phase commit) and commits it; an error from
    /// `f` aborts it.
    pub(crate) fn write<R>(
        &self,
        action: &'static str,
        f: impl FnOnce(&WriteTransaction) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(action, e))?;
        txn.set_two_phase_commit(true);
        let r = f(&txn)?;
        txn.commit().map_err(|e| self.err(action, e))?;
        Ok(r)
    }

    /// Runs `f` in a read transaction.
    pub(crate) fn read<R>(
        &self,
        action: &'static str,
        f: impl FnOnce(&ReadTransaction) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(action, e))?;
        f(&txn)
    }

    /// Every row of `table`, as owned bytes.
    pub(crate) fn rows(
        &self,
        txn: &ReadTransaction,
        table: Table,
        action: &'static str,
    ) -> Result<Rows, StateError> {
        let t = txn.open_table(table).map_err(|e| self.err(action, e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(action, e))? {
            let (k, v) = row.map_err(|e| self.err(action, e))?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }
}

fn u64_value(store: &Store, table: &'static str, key: &[u8], v: &[u8]) -> Result<u64, StateError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_le_bytes)
        .map_err(|_| store.corrupt(table, key))
}

/// How to open a [`StateDb`].
pub struct StateOptions {
    /// The most keys the [`Limiter`] holds (default [`DEFAULT_MAX_KEYS`]).
    pub max_limiter_keys: usize,
    /// The most users whose transfer counters [`Quotas`] holds (default
    /// [`DEFAULT_MAX_QUOTA_KEYS`]).
    pub max_quota_keys: usize,
    /// The monotonic source of the [`ServiceClock`] (default [`SystemMonotonic`]; tests use
    /// a [`ManualClock`](crate::clock::ManualClock)).
    pub monotonic: Arc<dyn Monotonic>,
}

impl Default for StateOptions {
    fn default() -> Self {
        Self {
            max_limiter_keys: DEFAULT_MAX_KEYS,
            max_quota_keys: DEFAULT_MAX_QUOTA_KEYS,
            monotonic: Arc::new(SystemMonotonic::new()),
        }
    }
}

impl std::fmt::Debug for StateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateOptions")
            .field("max_limiter_keys", &self.max_limiter_keys)
            .field("max_quota_keys", &self.max_quota_keys)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<Store>,
    clock: ServiceClock,
    limiter: Limiter,
    bans: Bans,
    users: Users,
    quotas: Quotas,
    flush_lock: Mutex<()>,
}

impl Inner {
    fn flush(&self) -> Result<(), StateError> {
        let _one_at_a_time = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now_ms();
        let changes = self.limiter.take_changes(now);
        let quota_changes = self.quotas.take_changes();
        let bans_writer = self.bans.writer();
        let expired = self.bans.expired(now);
        let result = self.store.write(
            "flushing the service clock, rate limits and quotas",
            |txn| {
                let action = "flushing the service clock, rate limits and quotas";
                let mut meta = txn
                    .open_table(META)
                    .map_err(|e| self.store.err(action, e))?;
                meta.insert(SERVED_KEY, now.to_le_bytes().as_slice())
                    .map_err(|e| self.store.err(action, e))?;
                let mut limits = txn
                    .open_table(LIMITS)
                    .map_err(|e| self.store.err(action, e))?;
                for (key, tat) in &changes.upserts {
                    limits
                        .insert(key.as_bytes(), tat.to_le_bytes().as_slice())
                        .map_err(|e| self.store.err(action, e))?;
                }
                for key in &changes.removes {
                    limits
                        .remove(key.as_bytes())
                        .map_err(|e| self.store.err(action, e))?;
                }
                let mut bans = txn
                    .open_table(BANS)
                    .map_err(|e| self.store.err(action, e))?;
                for key in &expired {
                    bans.remove(key.as_bytes())
                        .map_err(|e| self.store.err(action, e))?;
                }
                let mut quotas = txn
                    .open_table(QUOTAS)
                    .map_err(|e| self.store.err(action, e))?;
                for (name, counter) in &quota_changes.upserts {
                    let value = self.store.encode(counter)?;
                    quotas
                        .insert(name.as_bytes(), value.as_slice())
                        .map_err(|e| self.store.err(action, e))?;
                }
                for name in &quota_changes.removes {
                    quotas
                        .remove(name.as_bytes())
                        .map_err(|e| self.store.err(action, e))?;
                }
                Ok(())
            },
        );
        match result {
            Ok(()) => {
                self.bans.forget(&expired);
                drop(bans_writer);
                Ok(())
            }
            Err(e) => {
                drop(bans_writer);
                self.limiter.restore_changes(changes);
                self.quotas.restore_changes(quota_changes);
                Err(e)
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort: the server flushes explicitly at shutdown and sees the error there.
        let _ = self.flush();
    }
}

/// The exit server's persistent state: one redb database holding the service clock, rate
/// limits, bans, capability tokens, runtime users, user policies and transfer quotas.
///
/// Cheap to clone (a handle); `Send + Sync`. Every part keeps what the data path needs in
/// memory behind its own lock, so [`Limiter::check`] and [`Bans::banned`] never touch the
/// disk. Call [`StateDb::flush`] every second and at shutdown; the last handle dropped
/// also flushes, best effort.
#[derive(Clone)]
pub struct StateDb {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb")
            .field("path", &self.inner.store.path)
            .finish_non_exhaustive()
    }
}

impl StateDb {
    /// Opens the database at `path`, creating it (mode 0600) if absent, with default
    /// [`StateOptions`].
    ///
    /// A file that is not a state database, fails redb's checksums, or holds a value that
    /// does not decode is refused with [`StateError::CorruptFile`] or
    /// [`StateError::Corrupt`]: the server must then refuse to start.
    pub fn open(path: impl AsRef<Path>) -> Result<StateDb, StateError> {
        Self::open_with(path, StateOptions::default())
    }

    /// Opens the database at `path` with `options`; see [`StateDb::open`].
    pub fn open_with(path: impl AsRef<Path>, options: StateOptions) -> Result<StateDb, StateError> {
        let path = path.as_ref().to_owned();
        let file = open_file(&path)?;
        // redb asserts on some malformed headers; a panic there is a corrupt file too.
        match catch_unwind(AssertUnwindSafe(|| open_inner(&path, file, options))) {
            Ok(r) => r.map(|inner| StateDb {
                inner: Arc::new(inner),
            }),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".into());
                Err(StateError::CorruptFile {
                    path,
                    detail: format!("redb failed reading it: {what}"),
                })
            }
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.store.path
    }

    /// The service clock (bans and budgets are measured on it).
    pub fn clock(&self) -> &ServiceClock {
        &self.inner.clock
    }

    /// Served milliseconds now: `self.clock().now_ms()`.
    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// The rate limiter (persisted by [`StateDb::flush`]).
    pub fn limiter(&self) -> &Limiter {
        &self.inner.limiter
    }

    /// The bans (each change committed at once).
    pub fn bans(&self) -> &Bans {
        &self.inner.bans
    }

    /// The runtime-managed users and every user's policy (each change committed at once).
    pub fn users(&self) -> &Users {
        &self.inner.users
    }

    /// The transfer counters per user (persisted by [`StateDb::flush`]).
    pub fn quotas(&self) -> &Quotas {
        &self.inner.quotas
    }

    /// Stores the service clock and the rate limits and transfer counters changed since
    /// the last flush, and deletes expired bans, in one commit. Call every second and at shutdown. On failure
    /// nothing is lost from memory: the next flush writes it.
    pub fn flush(&self) -> Result<(), StateError> {
        self.inner.flush()
    }

    /// Flushes, and drops this handle (the file is released when the last handle goes).
    pub fn close(self) -> Result<(), StateError> {
        self.flush()
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }
}

fn open_file(path: &Path) -> Result<fs::File, StateError> {
    let io = |action, source| StateError::Io {
        path: path.to_owned(),
        action,
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            io(
                "cannot open or create the state database (does the directory exist, and may this user write to it?)",
                e,
            )
        })?;
    let meta = file
        .metadata()
        .map_err(|e| io("cannot read the state database's metadata", e))?;
    if !meta.is_file() {
        return Err(io(
            "the state database must be a regular file",
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        // Nothing in it is a secret, but nobody else needs to read it either.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| io("cannot restrict the state database to mode 0600", e))?;
    }
    Ok(file)
}

fn open_inner(path: &Path, file: fs::File, options: StateOptions) -> Result<Inner, StateError> {
    let mut db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create_file(file)
        .map_err(|e| redb_error(path, "opening the state database", e))?;
    db.check_integrity()
        .map_err(|e| redb_error(path, "checking the state database", e))?;
    let store = Arc::new(Store {
        db,
        path: path.to_owned(),
    });

    // Create the tables and check or record the schema.
    store.write("creating the tables", |txn| {
        let action = "creating the tables";
        for t in [LIMITS, BANS, TOKENS, USERS, DISABLED, POLICIES, QUOTAS] {
            txn.open_table(t).map_err(|e| store.err(action, e))?;
        }
        let mut meta = txn.open_table(META).map_err(|e| store.err(action, e))?;
        let found = meta
            .get(SCHEMA_KEY)
            .map_err(|e| store.err(action, e))?
            .map(|v| u64_value(&store, META_NAME, SCHEMA_KEY, v.value()))
            .transpose()?;
        match found {
            Some(SCHEMA) => Ok(()),
            Some(old) if UPGRADES_FROM.contains(&old) => {
                // The new tables were just created, empty: record the upgrade.
                meta.insert(SCHEMA_KEY, SCHEMA.to_le_bytes().as_slice())
                    .map_err(|e| store.err(action, e))?;
                Ok(())
            }
            Some(found) => Err(StateError::Schema {
                path: store.path.clone(),
                found,
                supported: SCHEMA,
            }),
            None => {
                meta.insert(SCHEMA_KEY, SCHEMA.to_le_bytes().as_slice())
                    .map_err(|e| store.err(action, e))?;
                Ok(())
            }
        }
    })?;

    // Load (and so validate) everything.
    let (served, limits, bans, users, quotas) = store.read("loading the state", |txn| {
        let action = "loading the state";
        let mut served = 0;
        for (k, v) in store.rows(txn, META, action)? {
            if k == SERVED_KEY {
                served = u64_value(&store, META_NAME, &k, &v)?;
            }
        }
        let mut limits = Vec::new();
        for (k, v) in store.rows(txn, LIMITS, action)? {
            let tat = u64_value(&store, LIMITS_NAME, &k, &v)?;
            limits.push((store.key_str(LIMITS_NAME, &k)?, tat));
        }
        let bans = Bans::load_rows(&store, store.rows(txn, BANS, action)?)?;
        let users = Users::load_rows(
            &store,
            store.rows(txn, USERS, action)?,
            store.rows(txn, DISABLED, action)?,
            store.rows(txn, POLICIES, action)?,
        )?;
        token::validate_rows(&store, store.rows(txn, TOKENS, action)?)?;
        let quotas = Quotas::decode_rows(&store, store.rows(txn, QUOTAS, action)?)?;
        Ok((served, limits, bans, users, quotas))
    })?;

    Ok(Inner {
        clock: ServiceClock::new(served, options.monotonic),
        limiter: Limiter::load(options.max_limiter_keys, limits),
        bans: Bans::new(store.clone(), bans),
        users: Users::new(store.clone(), users),
        quotas: Quotas::load(options.max_quota_keys, quotas),
        store,
        flush_lock: Mutex::new(()),
    })
}
