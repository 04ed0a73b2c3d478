//! The exit's control plane, driven: the sans-io pieces of `halfpipe-control` (modes,
//! tripwires, the endpoint table), the persistent state of `halfpipe-state` (rate limits,
//! bans, tokens, runtime users) and the audit log of `halfpipe-audit`, wired to the clock
//! and to the server.
//!
//! The server asks it at every admission point (a connection's source, a session's user,
//! a stream's rate and destination) and tells it what happened (refused handshakes,
//! replays, egress denials); it answers, escalates the mode when a tripwire fires, and
//! records everything that matters in the audit log. Fail closed throughout: a missing
//! or corrupt mode file starts in LOCKDOWN, a failing audit log forces LOCKDOWN and keeps
//! it there.

pub mod init;
pub mod metrics;
pub mod settings;
pub mod syslog;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use halfpipe_audit::{AuditError, AuditHandle, AuditKey, AuditWriter};
use halfpipe_control::mode::{
    Authority, Mode, ModeFile, ModeRequest, ModeState, Transition, UnfreezeRequest,
};
use halfpipe_control::tripwire::{
    Action, ClockWatch, Fire, TripwireKind, TripwireStatus, Tripwires,
};
use halfpipe_state::ratelimit::RateSpec;
use halfpipe_state::token::{Pepper, TokenInfo, Tokens};
use halfpipe_state::{StateDb, StateError};
use tokio::sync::watch;

use crate::egress::EgressPolicy;
use crate::locks::lock;
use metrics::Metrics;
use settings::{ControlSettings, Rates, Restricted};

/// Audit records queued at most before the writer is considered failed.
const AUDIT_QUEUE: usize = 65_536;

/// The control plane could not start (the server refuses to run).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// `server init` was never run for this state directory.
    #[error("{dir} is not an initialized state directory ({missing} is missing): run 'halfpipe server init --config FILE' first")]
    NotInitialized {
        /// The state directory.
        dir: String,
        /// What was looked for.
        missing: String,
    },
    /// The persistent state failed.
    #[error("state database: {0}")]
    State(#[from] StateError),
    /// The audit log or its key failed.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// A file or directory could not be made.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A mode change was refused.
    #[error(transparent)]
    Mode(#[from] halfpipe_control::mode::ModeError),
    /// The mode file could not be written (the change did not happen).
    #[error("cannot persist the mode: {0}")]
    ModeFile(#[from] halfpipe_control::mode::ModeFileError),
    /// A tripwire setting is out of range.
    #[error("tripwire settings: {0}")]
    Tripwire(#[from] halfpipe_control::tripwire::TripwireConfigError),
    /// De-escalation while the audit trail is broken.
    #[error("the audit log is failing ({0}): the exit does not serve without an audit trail; fix it and restart the server")]
    AuditBroken(String),
    /// The key store failed while initializing.
    #[error("key store: {0}")]
    KeyStore(#[from] halfpipe_keystore::KeyStoreError),
    /// The audit key file is not the key the key store vouches for.
    #[error("the audit signing key {path} (public {found}) is not the one the key store recorded (public {expected}): the file was replaced; restore it from backup, or, if the change was yours, record the new key with 'halfpipe server init' on a fresh state directory")]
    AuditKeyMismatch {
        /// The key file.
        path: String,
        /// The public key the store recorded (hex).
        expected: String,
        /// The key file's public key (hex).
        found: String,
    },
}

/// The control plane's secrets as a key store holds or vouches for them (`[keystore]`);
/// the default reads everything from the state directory's files.
#[derive(Default)]
pub struct StoreSecrets {
    /// The token pepper from the store; `None` reads the state directory's pepper file.
    pub pepper: Option<Pepper>,
    /// The audit signing key's public half as the store recorded it: the key file must
    /// have it, or the server refuses to start.
    pub audit_public: Option<[u8; 32]>,
}

/// Appends one record to the audit log before the control plane runs (a key store that
/// does not unseal stops the start, and that must be on the record).
pub fn audit_before_start(
    settings: &ControlSettings,
    event: &str,
    fields: &[(&str, String)],
) -> Result<(), ControlError> {
    let p = &settings.paths;
    let key = AuditKey::load(&p.audit_key)?;
    let mut log = settings.open_audit_log(key)?;
    log.append(event, fields, wall_ms())?;
    log.close(wall_ms())?;
    Ok(())
}

/// Why the control plane refused something (logged; the wire gets silence or a status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source address is banned.
    Banned,
    /// A rate limit was hit.
    RateLimited(&'static str),
    /// The mode does not allow it.
    Mode(Mode),
    /// The user is disabled.
    Disabled,
}

impl Refusal {
    /// A short reason for logs and metrics.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Banned => "source banned",
            Refusal::RateLimited(what) => what,
            Refusal::Mode(Mode::Lockdown) => "lockdown mode",
            Refusal::Mode(_) => "restricted mode",
            Refusal::Disabled => "user disabled",
        }
    }
}

/// Direction of a byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → exit.
    Up,
    /// Exit → client.
    Down,
}

/// The parts that `reload` replaces.
#[derive(Clone, Debug)]
struct Policy {
    rates: Rates,
    restricted: Restricted,
}

/// The running control plane.
pub struct ControlPlane {
    settings: ControlSettings,
    policy: Mutex<Arc<Policy>>,
    mode: Mutex<ModeState>,
    mode_tx: watch::Sender<Mode>,
    tripwires: Mutex<Tripwires>,
    clock_watch: Mutex<ClockWatch>,
    db: StateDb,
    tokens: Tokens,
    audit: AuditHandle,
    audit_failed: Mutex<Option<String>>,
    forward: Option<syslog::SyslogQueue>,
    stopped: AtomicBool,
    started: Instant,
    /// Counters for status and metrics.
    pub metrics: Arc<Metrics>,
}

/// Wall clock, Unix milliseconds.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix milliseconds `d` after `now_ms`, or `None` when that does not fit in a `u64` (a
/// duration typed as "600000000years" must be refused, not wrap around to the past).
pub fn ms_after(now_ms: u64, d: std::time::Duration) -> Option<u64> {
    u64::try_from(d.as_millis())
        .ok()
        .and_then(|ms| now_ms.checked_add(ms))
}

/// A duration an admin typed (`humantime`: "30d", "12h") and the Unix milliseconds at which
/// it ends from `now_ms`; the error names the setting `what` and says what is wrong.
pub fn parse_deadline(
    what: &str,
    text: &str,
    now_ms: u64,
) -> Result<(std::time::Duration, u64), String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{what} {text:?}: {e}"))?;
    let at = ms_after(now_ms, d).ok_or_else(|| format!("{what} {text:?} is too long"))?;
    Ok((d, at))
}

fn require(path: &std::path::Path, dir: &std::path::Path) -> Result<(), ControlError> {
    if path.exists() {
        Ok(())
    } else {
        Err(ControlError::NotInitialized {
            dir: dir.display().to_string(),
            missing: path.display().to_string(),
        })
    }
}

impl ControlPlane {
    /// Opens the state, the audit log and the mode, and starts the audit writer.
    /// Refuses to start when the state was never initialized, the database is corrupt,
    /// the audit key is missing (the server never logs unsigned) or is not the one the
    /// key store recorded.
    pub fn start(
        settings: ControlSettings,
        secrets: StoreSecrets,
    ) -> Result<Arc<Self>, ControlError> {
        let p = &settings.paths;
        require(&p.db, &p.dir)?;
        require(&p.audit_key, &p.dir)?;
        let pepper = match secrets.pepper {
            Some(pepper) => pepper,
            None => {
                require(&p.pepper, &p.dir)?;
                Pepper::load(&p.pepper)?
            }
        };
        let db = StateDb::open(&p.db)?;
        let tokens = Tokens::new(&db, pepper);
        let key = AuditKey::load(&p.audit_key)?;
        if let Some(expected) = secrets.audit_public {
            if expected != key.public_bytes() {
                let e = ControlError::AuditKeyMismatch {
                    path: p.audit_key.display().to_string(),
                    expected: hex::encode(expected),
                    found: key.public_hex(),
                };
                tracing::error!(target: "security", error = %e, "refusing to start");
                return Err(e);
            }
        }
        let audit_public = key.public_hex();
        let mut log = settings.open_audit_log(key)?;
        let forward = settings.syslog.clone().map(syslog::spawn);
        if let Some(q) = forward.clone() {
            log.set_sink(Box::new(move |line| q.push(line)));
        }
        let loaded = ModeFile::load(&p.mode_file, wall_ms());
        if loaded.fell_back() {
            tracing::error!(target: "security", reason = %loaded.state().reason, "starting in LOCKDOWN");
        }
        let mode = loaded.into_state();
        let tripwires = Tripwires::new(settings.tripwires.clone())?;
        let (mode_tx, _) = watch::channel(mode.mode);
        let now = Instant::now();
        let cp = Arc::new_cyclic(|weak: &std::sync::Weak<ControlPlane>| {
            let weak = weak.clone();
            let audit = AuditWriter::spawn(
                log,
                AUDIT_QUEUE,
                Box::new(move |e: &AuditError| {
                    if let Some(cp) = weak.upgrade() {
                        cp.audit_broken(e.to_string());
                    }
                }),
            );
            ControlPlane {
                policy: Mutex::new(Arc::new(Policy {
                    rates: settings.rates.clone(),
                    restricted: settings.restricted.clone(),
                })),
                tripwires: Mutex::new(tripwires),
                clock_watch: Mutex::new(ClockWatch::new(settings.clock_jump.as_millis() as u64)),
                settings,
                mode: Mutex::new(mode.clone()),
                mode_tx,
                db,
                tokens,
                audit,
                audit_failed: Mutex::new(None),
                forward,
                stopped: AtomicBool::new(false),
                started: now,
                metrics: Arc::default(),
            }
        });
        lock(&cp.clock_watch).check(wall_ms(), 0);
        cp.audit(
            "key_event",
            vec![
                ("key".into(), "audit".into()),
                ("event".into(), "loaded".into()),
                ("public".into(), audit_public),
            ],
        );
        cp.audit(
            "server_started",
            vec![
                ("mode".into(), mode.mode.name().into()),
                ("mode_reason".into(), mode.reason.clone()),
            ],
        );
        Ok(cp)
    }

    /// The settings it was started (or last reloaded) with.
    pub fn settings(&self) -> &ControlSettings {
        &self.settings
    }

    /// Seconds since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        lock(&self.mode).mode
    }

    /// The current mode with who set it, when and why.
    pub fn mode_state(&self) -> ModeState {
        lock(&self.mode).clone()
    }

    /// A receiver that sees every mode change (the server closes sessions on LOCKDOWN).
    pub fn subscribe(&self) -> watch::Receiver<Mode> {
        self.mode_tx.subscribe()
    }

    /// The persistent state (tokens, users, bans).
    pub fn db(&self) -> &StateDb {
        &self.db
    }

    /// The token store.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Tripwire states, for status.
    pub fn tripwire_status(&self) -> Vec<TripwireStatus> {
        lock(&self.tripwires).status(self.db.clock().now_ms())
    }

    /// Audit lines the syslog forwarder dropped (collector away too long), if forwarding.
    pub fn forward_dropped(&self) -> Option<u64> {
        self.forward.as_ref().map(syslog::SyslogQueue::dropped)
    }

    /// Why the audit log stopped, if it did.
    pub fn audit_failure(&self) -> Option<String> {
        lock(&self.audit_failed).clone()
    }

    // ---- modes ------------------------------------------------------------------------

    /// Applies a mode request (persisted before it takes effect, then audited).
    pub fn request_mode(&self, req: ModeRequest) -> Result<ModeState, ControlError> {
        let cur = lock(&self.mode);
        if req.target < cur.mode {
            if let Some(why) = self.audit_failure() {
                return Err(ControlError::AuditBroken(why));
            }
        }
        let t = cur.apply(&req)?;
        self.commit(cur, t)
    }

    /// Clears the clock-jump freeze (a token with `mode.set`).
    pub fn unfreeze(&self, by: Authority) -> Result<ModeState, ControlError> {
        let cur = lock(&self.mode);
        let t = cur.unfreeze(&UnfreezeRequest {
            by,
            reason: "unfrozen by an administrator".into(),
            now_ms: wall_ms(),
        })?;
        self.commit(cur, t)
    }

    /// Persists a transition, then makes it current, tells the watchers and audits it.
    fn commit(
        &self,
        mut cur: MutexGuard<'_, ModeState>,
        t: Transition,
    ) -> Result<ModeState, ControlError> {
        if !t.changed() {
            return Ok(t.state);
        }
        if let Err(e) = ModeFile::store(&self.settings.paths.mode_file, &t.state) {
            // The state directory is failing: the change is refused, but a failing store is
            // itself a key-store failure, which escalates (in memory) to LOCKDOWN.
            drop(cur);
            self.observe(TripwireKind::KeyStoreFailure, None);
            return Err(e.into());
        }
        *cur = t.state.clone();
        drop(cur);
        let next = t.state;
        let _ = self.mode_tx.send(next.mode);
        tracing::warn!(
            target: "security",
            from = t.from.name(),
            to = next.mode.name(),
            change = ?t.change,
            by = %next.changed_by,
            reason = %next.reason,
            "mode changed"
        );
        self.audit(
            "mode_change",
            vec![
                ("from".into(), t.from.name().into()),
                ("to".into(), next.mode.name().into()),
                ("change".into(), format!("{:?}", t.change)),
                ("by".into(), next.changed_by.clone()),
                ("reason".into(), next.reason.clone()),
                ("frozen".into(), next.frozen.to_string()),
            ],
        );
        Ok(next)
    }

    /// Escalates (never de-escalates) on the system's authority.
    fn escalate(&self, target: Mode, source: String, reason: String) {
        if self.mode() >= target {
            return;
        }
        let req = ModeRequest {
            target,
            by: Authority::System { source },
            confirm: false,
            reason,
            now_ms: wall_ms(),
        };
        if let Err(e) = self.request_mode(req) {
            // Persisting failed: still take the stricter mode in memory (fail closed).
            tracing::error!(target: "security", error = %e, "mode change not persisted; applying in memory");
            let mut cur = lock(&self.mode);
            if cur.mode < target {
                cur.mode = target;
                let _ = self.mode_tx.send(target);
            }
        }
    }

    fn audit_broken(&self, why: String) {
        {
            let mut failed = lock(&self.audit_failed);
            if failed.is_some() {
                return;
            }
            *failed = Some(why.clone());
        }
        tracing::error!(target: "security", error = %why, "audit log failed");
        self.observe(TripwireKind::AuditFailure, None);
        // Whatever the tripwire table says, no audit trail means no serving.
        self.escalate(Mode::Lockdown, "tripwire:audit_failure".into(), why);
    }

    // ---- tripwires --------------------------------------------------------------------

    /// Feeds one event to the tripwires and carries out what fires.
    pub fn observe(&self, kind: TripwireKind, key: Option<&str>) {
        let now = self.db.clock().now_ms();
        let fire = lock(&self.tripwires).observe(kind, key, now);
        if let Some(f) = fire {
            self.fired(f);
        }
    }

    fn fired(&self, f: Fire) {
        self.metrics.tripwire_fired(f.kind.name());
        tracing::warn!(
            target: "security",
            tripwire = f.kind.name(),
            key = f.key.as_deref().unwrap_or("-"),
            count = f.count,
            action = f.action.name(),
            "tripwire fired"
        );
        self.audit(
            "tripwire",
            vec![
                ("kind".into(), f.kind.name().into()),
                ("key".into(), f.key.clone().unwrap_or_default()),
                ("count".into(), f.count.to_string()),
                ("action".into(), f.action.name().into()),
            ],
        );
        let reason = format!(
            "{} reached {} in {} ms",
            f.kind.name(),
            f.count,
            f.window_ms
        );
        let source = format!("tripwire:{}", f.kind.name());
        match f.action {
            Action::Alert => {}
            Action::Restricted => self.escalate(Mode::Restricted, source, reason),
            Action::Lockdown => self.escalate(Mode::Lockdown, source, reason),
            Action::BanSource => {
                if let Some(k) = &f.key {
                    let ms = self
                        .settings
                        .tripwires
                        .get(&f.kind)
                        .map(|c| c.ban_ms)
                        .unwrap_or(600_000);
                    self.ban(&format!("src:{k}"), ms, &reason);
                }
            }
        }
    }

    /// Bans a key (`src:IP`) for `ms` of service time; persisted.
    pub fn ban(&self, key: &str, ms: u64, reason: &str) {
        let now = self.db.clock().now_ms();
        match self.db.bans().ban(key, ms, reason, now) {
            Ok(_) => {
                tracing::warn!(target: "security", key, duration_ms = ms, reason, "banned");
                self.audit(
                    "ban",
                    vec![
                        ("key".into(), key.into()),
                        ("duration_ms".into(), ms.to_string()),
                        ("reason".into(), reason.into()),
                    ],
                );
            }
            Err(e) => {
                tracing::error!(target: "security", error = %e, "cannot persist a ban");
                self.observe(TripwireKind::KeyStoreFailure, None);
            }
        }
    }

    // ---- admission --------------------------------------------------------------------

    /// A new connection from `ip`, before any handshake: bans and handshake rates.
    pub fn admit_source(&self, ip: IpAddr) -> Result<(), Refusal> {
        let now = self.db.clock().now_ms();
        let key = format!("src:{ip}");
        if self.db.bans().banned(&key, now).is_some() {
            self.metrics.handshake_failed("banned");
            return Err(Refusal::Banned);
        }
        let policy = self.policy();
        let limiter = self.db.limiter();
        if let Some(spec) = policy.rates.handshakes_global {
            if limiter.check("global:handshakes", spec, 1, now).is_err() {
                self.metrics.limit_hit("handshakes_global");
                return Err(Refusal::RateLimited("global handshake rate"));
            }
        }
        if let Some(spec) = policy.rates.handshakes_per_source {
            if limiter.check(&key, spec, 1, now).is_err() {
                self.metrics.limit_hit("handshakes_per_source");
                return Err(Refusal::RateLimited("handshake rate of this source"));
            }
        }
        Ok(())
    }

    /// A handshake from `ip` failed before authentication (`class` for metrics).
    pub fn handshake_failed(&self, ip: IpAddr, class: &'static str, reason: &str) {
        self.metrics.handshake_failed(class);
        self.audit(
            "auth_failure",
            vec![
                ("peer".into(), ip.to_string()),
                ("reason".into(), reason.into()),
            ],
        );
        let key = ip.to_string();
        self.observe(TripwireKind::HandshakeFailuresPerSource, Some(&key));
        self.observe(TripwireKind::HandshakeFailuresTotal, None);
    }

    /// A replayed handshake (also reported through [`ControlPlane::handshake_failed`]).
    pub fn replay_seen(&self) {
        self.observe(TripwireKind::ReplayedHandshakes, None);
    }

    /// May `user` open a new session now?
    pub fn admit_session(&self, user: &str) -> Result<(), Refusal> {
        match self.mode() {
            Mode::Open => Ok(()),
            Mode::Restricted if self.policy().restricted.users.contains(user) => Ok(()),
            m => Err(Refusal::Mode(m)),
        }
    }

    /// May `user` open one more stream now (stream rate)?
    pub fn admit_stream(&self, user: &str) -> Result<(), Refusal> {
        if self.mode() == Mode::Lockdown {
            return Err(Refusal::Mode(Mode::Lockdown));
        }
        if let Some(spec) = self.policy().rates.streams_per_user {
            let now = self.db.clock().now_ms();
            if self
                .db
                .limiter()
                .check(&format!("user:{user}:streams"), spec, 1, now)
                .is_err()
            {
                self.metrics.limit_hit("streams_per_user");
                return Err(Refusal::RateLimited("stream rate of this user"));
            }
        }
        self.metrics.streams_opened.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The egress policy in force for streams now: `base`, narrowed in RESTRICTED mode.
    pub fn egress(&self, base: &EgressPolicy) -> Option<EgressPolicy> {
        (self.mode() == Mode::Restricted)
            .then(|| base.restricted_to(&self.policy().restricted.destinations))
    }

    /// A stream of `user` was denied by the egress policy.
    pub fn egress_denied(&self, user: &str) {
        self.metrics.limit_hit("egress_denied");
        self.observe(TripwireKind::EgressDenialsPerUser, Some(user));
    }

    /// The byte rate of `user` in `dir`, if limited.
    pub fn byte_rate(&self, dir: Direction) -> Option<RateSpec> {
        let p = self.policy();
        match dir {
            Direction::Up => p.rates.bytes_up_per_user,
            Direction::Down => p.rates.bytes_down_per_user,
        }
    }

    /// Charges `n` bytes of `user` in `dir`; how long to wait before moving them.
    pub fn charge_bytes(&self, user: &str, dir: Direction, spec: RateSpec, n: u64) -> Duration {
        let key = match dir {
            Direction::Up => format!("user:{user}:up"),
            Direction::Down => format!("user:{user}:down"),
        };
        let now = self.db.clock().now_ms();
        match self.db.limiter().check(&key, spec, n, now) {
            Ok(()) => Duration::ZERO,
            Err(r) => {
                self.metrics.limit_hit(match dir {
                    Direction::Up => "bytes_up_per_user",
                    Direction::Down => "bytes_down_per_user",
                });
                Duration::from_millis(r.ms)
            }
        }
    }

    fn policy(&self) -> Arc<Policy> {
        lock(&self.policy).clone()
    }

    /// Replaces the reloadable settings (rates, RESTRICTED lists).
    pub fn reload(&self, rates: Rates, restricted: Restricted) {
        *lock(&self.policy) = Arc::new(Policy { rates, restricted });
    }

    // ---- tokens -----------------------------------------------------------------------

    /// Checks a presented bearer token; the token itself is never logged.
    pub fn authenticate(
        &self,
        presented: &str,
    ) -> Result<TokenInfo, halfpipe_state::token::TokenError> {
        self.tokens.verify(presented, wall_ms())
    }

    // ---- audit ------------------------------------------------------------------------

    /// Appends an audit record; a failure to queue it is an audit failure (LOCKDOWN).
    pub fn audit(&self, kind: &str, fields: Vec<(String, String)>) {
        if let Err(e) = self.audit.record(kind, fields) {
            if !self.stopped.load(Ordering::Relaxed) {
                self.audit_broken(e.to_string());
            }
        }
    }

    /// Reacts as to a failing audit writer (tests: the writer's own failure detection is
    /// tested in `halfpipe-audit`; this drives what the exit does about it).
    #[doc(hidden)]
    pub fn simulate_audit_failure(&self, why: &str) {
        self.audit_broken(why.to_string());
    }

    // ---- timers -----------------------------------------------------------------------

    /// Once a second: the clock tripwire, and persisting limiter state and service time.
    pub fn tick(&self) {
        self.tick_at(wall_ms(), self.started.elapsed().as_millis() as u64);
    }

    /// [`ControlPlane::tick`] with the clocks given: wall time (Unix ms) and monotonic
    /// time since start (ms). Tests drive clock jumps through it.
    pub fn tick_at(&self, wall: u64, mono: u64) {
        let jump = lock(&self.clock_watch).check(wall, mono);
        if let Some(j) = jump {
            tracing::warn!(target: "security", delta_ms = j.delta_ms, "wall clock jumped against the monotonic clock; de-escalation frozen");
            self.freeze(format!("wall clock jumped by {} ms", j.delta_ms));
            self.observe(TripwireKind::ClockJump, None);
        }
        if let Err(e) = self.db.flush() {
            tracing::error!(target: "security", error = %e, "cannot persist rate-limit state");
            self.observe(TripwireKind::KeyStoreFailure, None);
        }
    }

    fn freeze(&self, reason: String) {
        let cur = lock(&self.mode);
        let t = cur.freeze("tripwire:clock_jump", &reason, wall_ms());
        if let Err(e) = self.commit(cur, t) {
            // Not persisted: keep it frozen in memory anyway (fail closed).
            tracing::error!(target: "security", error = %e, "cannot persist the frozen flag");
            lock(&self.mode).frozen = true;
        }
    }

    /// Clean shutdown: persist limiter state, write the final audit checkpoint.
    pub fn shutdown(&self) {
        self.audit("server_stopped", vec![]);
        self.stopped.store(true, Ordering::Relaxed);
        if let Err(e) = self.db.flush() {
            tracing::error!(error = %e, "cannot persist rate-limit state at shutdown");
        }
        if let Err(e) = self.audit.close() {
            tracing::error!(error = %e, "cannot close the audit log cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{ms_after, parse_deadline};

    #[test]
    fn a_deadline_past_what_milliseconds_can_hold_is_refused_not_wrapped() {
        assert_eq!(ms_after(1_000, Duration::from_secs(2)), Some(3_000));
        assert_eq!(
            ms_after(u64::MAX - 5, Duration::from_millis(5)),
            Some(u64::MAX)
        );
        assert_eq!(ms_after(u64::MAX - 5, Duration::from_millis(6)), None);
        let far = humantime::parse_duration("600000000years").unwrap();
        assert_eq!(ms_after(1_000, far), None);
        assert_eq!(ms_after(0, Duration::MAX), None);
        assert_eq!(
            parse_deadline("expires_in", "2s", 1_000),
            Ok((Duration::from_secs(2), 3_000))
        );
        assert_eq!(
            parse_deadline("overlap", "600000000years", 1_000),
            Err("overlap \"600000000years\" is too long".to_string())
        );
        assert!(parse_deadline("overlap", "soon", 1_000)
            .unwrap_err()
            .starts_with("overlap \"soon\": "));
    }
}
