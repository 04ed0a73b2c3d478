//! The exit server: leg listeners, handshake admission, the session table, and the
//! outbound connector behind the egress policy.
//!
//! Admission order for every leg: handshake slot (bounded) → Noise authentication →
//! known user → replay check → session ownership → limits. Anything failing before the
//! peer is authenticated gets silence on the wire and a `security` log line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use halfpipe_core::handshake::{
    AcceptedHello, HelloStatus, LegRole, Responder, ServerHello, SessionId,
};
use halfpipe_core::replay::ReplayCache;
use halfpipe_core::session::{SessionConfig, Side};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

mod handle;
pub mod keys;

use crate::control::settings::ControlSettings;
use crate::control::{ControlError, ControlPlane, Direction};
use crate::egress::EgressPolicy;
use crate::leg::{server_read_hello, server_reply, unix_ms, LegError};
use crate::leg_url::{LegUrl, Scheme};
use crate::locks::lock;
use crate::transport::{BoxedLeg, Counted, LegListener, ListenSettings, TransportError, Upgrade};
use crate::tunnel::{Control, Pace, Throttle, Tunnel};
use halfpipe_control::mode::Mode;

/// A user allowed to connect.
#[derive(Clone, Debug)]
pub struct User {
    /// Name, for logs.
    pub name: String,
    /// Static X25519 public key: the user's identity.
    pub public_key: [u8; 32],
}

/// Admission limits.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Sessions at once.
    pub max_sessions: usize,
    /// Sessions at once per user.
    pub max_sessions_per_user: usize,
    /// Handshakes being processed at once, per listener.
    pub max_handshakes_in_flight: usize,
    /// Connections (legs and handshakes) open at once, per listener.
    pub max_connections_per_listener: usize,
    /// Time allowed for transport and Noise handshakes.
    pub handshake_timeout: Duration,
    /// Allowed difference between client and server clocks.
    pub max_clock_skew: Duration,
    /// Replay cache entries.
    pub replay_capacity: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_sessions: 1024,
            max_sessions_per_user: 16,
            max_handshakes_in_flight: 64,
            max_connections_per_listener: 1024,
            handshake_timeout: Duration::from_secs(10),
            max_clock_skew: Duration::from_secs(120),
            replay_capacity: 100_000,
        }
    }
}

/// Everything the exit needs to run.
pub struct ServerSettings {
    /// The control plane: state directory, audit log, limits, tripwires.
    pub control: ControlSettings,
    /// The configuration file, re-read by `reload` (`None`: nothing to reload from).
    pub config_file: Option<PathBuf>,
    /// What share links for new users carry (public URLs, TLS name and pin).
    pub links: crate::links::LinkTemplate,
    /// Leg listeners (any listener accepts either leg role).
    pub listen: Vec<LegUrl>,
    /// Certificates and QUIC tuning for the listeners.
    pub transport: ListenSettings,
    /// The server's static key(s) and cipher: a key file, or the sealed key store.
    pub keys: keys::KeySource,
    /// Users allowed.
    pub users: Vec<User>,
    /// Where streams may go.
    pub egress: EgressPolicy,
    /// Timeout for connecting to a target.
    pub connect_timeout: Duration,
    /// Admission limits.
    pub limits: ServerLimits,
    /// Per-session tunables (stream limit, windows, timers).
    pub session: SessionConfig,
    /// Keep the Noise AEAD on every leg, even one whose TLS runs end to end to the client
    /// (see [`crate::channel_binding`]).
    pub double_encrypt: bool,
}

/// The server failed to start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The control plane could not start (fail closed: no serving without it).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The admin socket or metrics listener could not be set up.
    #[error("{0}")]
    Admin(String),
    /// The key store could not be opened or holds no usable key.
    #[error("key store: {0}")]
    Keys(#[from] keys::StoreKeysError),
}

struct SessionEntry {
    user: String,
    user_key: [u8; 32],
    epochs: [u32; 2],
    tunnel: Arc<Tunnel>,
    peer: SocketAddr,
    opened: Instant,
    /// Transport of the latest leg of each role (up, down).
    transports: [Option<Scheme>; 2],
}

/// What `reload` replaces: the users from the config file, the egress policy, limits.
struct Reloadable {
    config_users: Vec<User>,
    egress: EgressPolicy,
    limits: ServerLimits,
}

struct State {
    keys: RwLock<Arc<keys::ServerKeys>>,
    /// The sealed key store and its settings, when the keys come from one.
    store: Option<(Mutex<halfpipe_keystore::KeyStore>, keys::KeystoreSettings)>,
    /// Users by public key: the config's and the admin API's, minus disabled ones.
    users: RwLock<Arc<HashMap<[u8; 32], String>>>,
    reloadable: RwLock<Arc<Reloadable>>,
    config_file: Option<PathBuf>,
    links: crate::links::LinkTemplate,
    connect_timeout: Duration,
    session: SessionConfig,
    double_encrypt: bool,
    replay: Mutex<ReplayCache>,
    sessions: Mutex<HashMap<SessionId, SessionEntry>>,
    control: Arc<ControlPlane>,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A running (bound) exit server.
pub struct Server {
    state: Arc<State>,
    listeners: Vec<LegListener>,
    admin: tokio::net::UnixListener,
    admin_tls: Option<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)>,
    metrics: Option<tokio::net::TcpListener>,
}

/// A cheap handle for inspecting a running server (status, tests).
#[derive(Clone)]
pub struct ServerHandle {
    state: Arc<State>,
}

impl Server {
    /// Binds every listener.
    pub async fn bind(settings: ServerSettings) -> Result<Self, ServerError> {
        let mut listeners = Vec::new();
        for url in &settings.listen {
            listeners.push(LegListener::bind(url, &settings.transport).await?);
        }
        let admin = crate::admin::bind_socket(&settings.control.paths.admin_socket)
            .map_err(|e| ServerError::Admin(e.to_string()))?;
        let metrics = match settings.control.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| ServerError::Admin(format!("metrics listener {addr}: {e}")))?,
            ),
            None => None,
        };
        let admin_tls = match &settings.control.admin_tls {
            Some(t) => Some((
                tokio::net::TcpListener::bind(t.listen).await.map_err(|e| {
                    ServerError::Admin(format!("admin TLS listener {}: {e}", t.listen))
                })?,
                t.config.clone(),
            )),
            None => None,
        };
        // The store first: it holds the token pepper and vouches for the audit key, and
        // a store that does not unseal is an audit event and stops the start.
        let (server_keys, store) = match settings.keys {
            keys::KeySource::File(k) => (
                keys::ServerKeys::single(k)
                    .map_err(|e| ServerError::Keys(keys::StoreKeysError::Handshake(e)))?,
                None,
            ),
            keys::KeySource::Store(ks) => match open_store(&ks) {
                Ok((k, store)) => (k, Some((store, ks))),
                Err(e) => {
                    let code = match &e {
                        keys::StoreKeysError::Store(s) => s.code(),
                        _ => "no_active_key",
                    };
                    tracing::error!(target: "security", error = %e, "key store unseal failed");
                    if let Err(a) = crate::control::audit_before_start(
                        &settings.control,
                        "key_event",
                        &[("event", "unseal_failure".into()), ("code", code.into())],
                    ) {
                        tracing::error!(target: "security", error = %a, "cannot record the unseal failure");
                    }
                    return Err(e.into());
                }
            },
        };
        let secrets = match &store {
            Some((s, _)) => crate::control::StoreSecrets {
                pepper: crate::control::init::store_pepper(s)
                    .map_err(|e| ServerError::Keys(e.into()))?,
                audit_public: s
                    .reference(crate::control::init::AUDIT_KEY_REFERENCE)
                    .and_then(|r| r.public),
            },
            None => Default::default(),
        };
        let control = ControlPlane::start(settings.control, secrets)?;
        let store = store.map(|(s, ks)| (Mutex::new(s), ks));
        let limits = settings.limits;
        let state = Arc::new(State {
            keys: RwLock::new(Arc::new(server_keys)),
            store,
            users: RwLock::new(Arc::default()),
            config_file: settings.config_file,
            links: settings.links,
            connect_timeout: settings.connect_timeout,
            replay: Mutex::new(ReplayCache::new(
                limits.max_clock_skew.as_millis() as u64,
                limits.replay_capacity,
            )),
            reloadable: RwLock::new(Arc::new(Reloadable {
                config_users: settings.users,
                egress: settings.egress,
                limits,
            })),
            session: settings.session,
            double_encrypt: settings.double_encrypt,
            sessions: Mutex::new(HashMap::new()),
            control,
        });
        handle::rebuild_users(&state);
        Ok(Self {
            state,
            listeners,
            admin,
            admin_tls,
            metrics,
        })
    }

    /// The URLs actually bound (ports resolved).
    pub fn urls(&self) -> Vec<LegUrl> {
        self.listeners.iter().map(LegListener::url).collect()
    }

    /// A handle for inspection.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            state: self.state.clone(),
        }
    }

    /// Serves until the task is dropped: the leg listeners, the control plane's
    /// once-a-second tick, the mode watcher (LOCKDOWN closes every session), the admin
    /// socket and the metrics listener.
    pub async fn run(self) {
        let handle = self.handle();
        let mut tasks = vec![
            tokio::spawn(crate::admin::serve_socket(self.admin, handle.clone())),
            tokio::spawn(tick_loop(self.state.clone())),
            tokio::spawn(mode_watch(self.state.clone())),
        ];
        if let Some((l, config)) = self.admin_tls {
            tasks.push(tokio::spawn(crate::admin::serve_tls(
                l,
                config,
                handle.clone(),
            )));
        }
        if let Some(l) = self.metrics {
            tasks.push(tokio::spawn(crate::admin::serve_metrics(l, handle)));
        }
        for l in self.listeners {
            tasks.push(tokio::spawn(accept_loop(self.state.clone(), l)));
        }
        // Abort every task when this future is dropped (shutdown), not just detach them.
        struct AbortAll(Vec<tokio::task::JoinHandle<()>>);
        impl Drop for AbortAll {
            fn drop(&mut self) {
                self.0.iter().for_each(tokio::task::JoinHandle::abort);
            }
        }
        let _tasks = AbortAll(tasks);
        futures_util::future::pending::<()>().await;
    }
}

impl ServerHandle {
    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.state.sessions).len()
    }

    /// Ids and user names of live sessions.
    pub fn sessions(&self) -> Vec<(SessionId, String)> {
        lock(&self.state.sessions)
            .iter()
            .map(|(id, e)| (*id, e.user.clone()))
            .collect()
    }

    /// The receive window of each live session (a user's sessions share one; see
    /// `share_user_window`).
    pub fn session_windows(&self) -> Vec<u64> {
        lock(&self.state.sessions)
            .values()
            .map(|e| e.tunnel.session_window())
            .collect()
    }

    /// Bytes the exit holds for all sessions (receive buffers plus retransmit buffers).
    pub fn buffered_bytes(&self) -> u64 {
        lock(&self.state.sessions)
            .values()
            .map(|e| e.tunnel.memory())
            .sum()
    }
}

async fn accept_loop(state: Arc<State>, listener: LegListener) {
    let url = listener.url().to_string();
    let scheme = listener.url().scheme;
    let limits = read(&state.reloadable).limits.clone();
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes_in_flight));
    let connections = Arc::new(Semaphore::new(limits.max_connections_per_listener));
    loop {
        let (peer, upgrade) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let cp = &state.control;
        if cp.mode() == Mode::Lockdown {
            // Only the admin API answers in LOCKDOWN.
            tracing::debug!(%peer, "lockdown: connection dropped");
            cp.metrics.handshake_failed("lockdown");
            continue;
        }
        if let Err(r) = cp.admit_source(peer.ip()) {
            tracing::warn!(target: "security", %peer, listener = %url, reason = r.describe(), "connection dropped");
            continue;
        }
        let Some(slot) = take_slot(&connections, cp, "connections_per_listener", peer, &url) else {
            continue;
        };
        let Some(permit) = take_slot(&handshakes, cp, "handshakes_in_flight", peer, &url) else {
            continue;
        };
        let state = state.clone();
        let timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            handle_leg(state, upgrade, slot, peer, scheme, timeout).await;
            drop(permit);
        });
    }
}

/// A slot of a per-listener cap, or `None` with the hit counted and logged (the
/// connection is then dropped).
fn take_slot(
    cap: &Arc<Semaphore>,
    cp: &ControlPlane,
    limit: &'static str,
    peer: SocketAddr,
    listener: &str,
) -> Option<OwnedSemaphorePermit> {
    let slot = cap.clone().try_acquire_owned().ok();
    if slot.is_none() {
        cp.metrics.limit_hit(limit);
        tracing::warn!(target: "security", %peer, listener, limit, "per-listener limit hit: connection dropped");
    }
    slot
}

/// Why an unauthenticated leg was refused (logged and counted, never sent).
fn security_refusal(state: &State, peer: SocketAddr, class: &'static str, reason: &str) {
    tracing::warn!(target: "security", %peer, reason, "leg refused");
    state.control.handshake_failed(peer.ip(), class, reason);
}

async fn handle_leg(
    state: Arc<State>,
    upgrade: Upgrade,
    slot: OwnedSemaphorePermit,
    peer: SocketAddr,
    scheme: Scheme,
    handshake_timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + handshake_timeout;
    let counters = state.control.metrics.clone();
    let mut io = match tokio::time::timeout_at(deadline, upgrade).await {
        // The leg holds its listener's connection slot for as long as it lives.
        Ok(Ok(io)) => Box::new(Counted::new(io, slot, counters, scheme)) as BoxedLeg,
        Ok(Err(e)) => {
            return security_refusal(
                &state,
                peer,
                "transport",
                &format!("transport handshake failed: {e}"),
            )
        }
        Err(_) => {
            return security_refusal(&state, peer, "timeout", "transport handshake timed out")
        }
    };
    let server_keys = read(&state.keys);
    let candidates = server_keys.candidates();
    let (resp, acc, key_index) =
        match tokio::time::timeout_at(deadline, server_read_hello(&mut io, &candidates)).await {
            Ok(Ok(x)) => x,
            Ok(Err(LegError::Io(e))) => {
                return security_refusal(&state, peer, "io", &format!("I/O during handshake: {e}"))
            }
            Ok(Err(e)) => {
                // Hold the connection open in silence until the deadline: no error byte,
                // no early close that would tell a prober anything.
                security_refusal(&state, peer, "auth", &format!("authentication failed: {e}"));
                return silence(&mut io, deadline).await;
            }
            Err(_) => return security_refusal(&state, peer, "timeout", "handshake timed out"),
        };
    let key_use = server_keys.classify(key_index, unix_ms());
    let admission = match key_use {
        // Only a known user learns that its key is retired; anyone else gets silence.
        keys::KeyUse::Retired if read(&state.users).contains_key(&acc.client_static) => {
            Admission::Refuse(HelloStatus::ServerKeyRetired)
        }
        keys::KeyUse::Retired => Admission::Silence(
            "unknown_key",
            "unknown client key on a retired server key".into(),
        ),
        _ => admit(&state, peer, &acc, scheme),
    };
    let next_key = match key_use {
        keys::KeyUse::Overlap(k) => Some(k),
        _ => None,
    };
    match admission {
        Admission::Silence(class, reason) => {
            security_refusal(&state, peer, class, &reason);
            silence(&mut io, deadline).await;
        }
        Admission::Refuse(status) => {
            let hello = ServerHello {
                status,
                recv_next: 0,
                server_time_ms: unix_ms(),
                next_key: None,
                bound_records: false,
            };
            tracing::info!(%peer, session = %acc.hello.session_id, status = status.describe(), "leg refused");
            let _ = tokio::time::timeout_at(deadline, server_reply(&mut io, resp, &hello)).await;
        }
        Admission::Attach(tunnel) => {
            state.control.metrics.legs_attached[scheme.index()]
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut resp = resp;
            // The leg's records may skip the Noise AEAD when the client's channel binding
            // matches this end's (TLS end to end) and the operator allows it.
            let bound_records =
                !state.double_encrypt && resp.check_binding(io.channel_binding().as_ref());
            let hello = ServerHello {
                status: HelloStatus::Accepted,
                recv_next: tunnel.recv_next(),
                server_time_ms: unix_ms(),
                next_key,
                bound_records,
            };
            if attach(peer, io, resp, &acc, tunnel, deadline, &hello).await && bound_records {
                state.control.metrics.legs_channel_bound[scheme.index()]
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Reads and discards until the deadline or EOF, so a refused peer learns nothing.
async fn silence(io: &mut BoxedLeg, deadline: tokio::time::Instant) {
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout_at(deadline, async {
        while let Ok(n) = io.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

enum Admission {
    /// Refused before the peer may learn anything: reason class and text.
    Silence(&'static str, String),
    Refuse(HelloStatus),
    Attach(Arc<Tunnel>),
}

fn admit(state: &Arc<State>, peer: SocketAddr, acc: &AcceptedHello, scheme: Scheme) -> Admission {
    let users = read(&state.users);
    let Some(user) = users.get(&acc.client_static) else {
        return Admission::Silence("unknown_key", "unknown or disabled client key".into());
    };
    if let Err(e) =
        lock(&state.replay).check_and_insert(acc.replay_id, acc.hello.timestamp_ms, unix_ms())
    {
        if matches!(e, halfpipe_core::replay::ReplayError::Replayed) {
            state.control.replay_seen();
        }
        return Admission::Silence("replay", format!("user {user}: {e}"));
    }
    let hello = &acc.hello;
    let role_idx = match hello.role {
        LegRole::Up => 0,
        LegRole::Down => 1,
    };
    let mut sessions = lock(&state.sessions);
    if let Some(entry) = sessions.get_mut(&hello.session_id) {
        if entry.user_key != acc.client_static {
            return Admission::Silence(
                "hijack",
                format!(
                    "user {user} named session {} owned by another user",
                    hello.session_id
                ),
            );
        }
        if hello.epoch <= entry.epochs[role_idx] {
            return Admission::Refuse(HelloStatus::StaleEpoch);
        }
        entry.epochs[role_idx] = hello.epoch;
        entry.transports[role_idx] = Some(scheme);
        return Admission::Attach(entry.tunnel.clone());
    }
    if hello.epoch > 1 || hello.recv_next > 0 {
        // A leg resuming a session this exit does not hold (it restarted, or the session
        // expired): tell the client to start afresh instead of building a session around
        // sequence numbers it cannot honour.
        return Admission::Refuse(HelloStatus::UnknownSession);
    }
    if let Err(r) = state.control.admit_session(user) {
        tracing::warn!(%peer, user, reason = r.describe(), "new session refused by the control plane");
        return Admission::Refuse(HelloStatus::Refused);
    }
    let policy = state.control.db().users().policy(user);
    let now = unix_ms();
    if policy.expired(now) {
        tracing::warn!(%peer, user, "new session refused: the user's access expired");
        return Admission::Refuse(HelloStatus::Refused);
    }
    if let Some(q) = policy.quota {
        if state
            .control
            .db()
            .quotas()
            .usage(user, now, Some(q))
            .exhausted()
        {
            tracing::warn!(%peer, user, "new session refused: transfer quota exhausted");
            return Admission::Refuse(HelloStatus::Refused);
        }
    }
    let limits = read(&state.reloadable).limits.clone();
    if sessions.len() >= limits.max_sessions {
        state.control.metrics.limit_hit("sessions");
        tracing::warn!(%peer, user, limit = limits.max_sessions, "session limit hit");
        return Admission::Refuse(HelloStatus::SessionLimit);
    }
    let per_user = sessions_of(&sessions, &acc.client_static).count();
    let per_user_limit = policy
        .max_sessions
        .map_or(limits.max_sessions_per_user, |m| m as usize);
    if per_user >= per_user_limit {
        state.control.metrics.limit_hit("sessions_per_user");
        tracing::warn!(%peer, user, limit = per_user_limit, "per-user session (device) limit hit");
        return Admission::Refuse(HelloStatus::UserSessionLimit);
    }
    let (tunnel, control) = Tunnel::new(Side::Server, state.session.clone());
    let mut epochs = [0u32; 2];
    epochs[role_idx] = hello.epoch;
    let mut transports = [None; 2];
    transports[role_idx] = Some(scheme);
    sessions.insert(
        hello.session_id,
        SessionEntry {
            user: user.clone(),
            user_key: acc.client_static,
            epochs,
            tunnel: tunnel.clone(),
            peer,
            opened: Instant::now(),
            transports,
        },
    );
    share_user_window(&sessions, &acc.client_static, &state.session);
    drop(sessions);
    state
        .control
        .metrics
        .sessions_opened
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%peer, user, session = %hello.session_id, "session opened");
    state.control.audit(
        "session_opened",
        vec![
            ("user".into(), user.clone()),
            ("session".into(), hello.session_id.to_string()),
            ("peer".into(), peer.to_string()),
        ],
    );
    tokio::spawn(run_session(
        state.clone(),
        hello.session_id,
        user.clone(),
        tunnel.clone(),
        control,
    ));
    Admission::Attach(tunnel)
}

/// Answers an admitted leg with `hello` and attaches it; true when it attached.
async fn attach(
    peer: SocketAddr,
    mut io: BoxedLeg,
    resp: Responder,
    acc: &AcceptedHello,
    tunnel: Arc<Tunnel>,
    deadline: tokio::time::Instant,
    hello: &ServerHello,
) -> bool {
    let keys = match tokio::time::timeout_at(deadline, server_reply(&mut io, resp, hello)).await {
        Ok(Ok(k)) => k,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "leg lost during handshake reply");
            return false;
        }
        Err(_) => {
            tracing::info!(%peer, "leg handshake reply timed out");
            return false;
        }
    };
    let role = acc.hello.role;
    let attached = tunnel.attach_leg(role, io, &keys, acc.hello.recv_next);
    match attached {
        Ok(()) => {
            tracing::debug!(%peer, session = %acc.hello.session_id, leg = role.name(), epoch = acc.hello.epoch, channel_bound = hello.bound_records, "leg attached");
            true
        }
        Err(e) => {
            tracing::warn!(%peer, session = %acc.hello.session_id, error = %e, "leg refused by session; session closed");
            false
        }
    }
}

/// Paces one user's streams: the user's speed limits (their policy's, else the server's
/// per-user byte rates) and their transfer quota. Set when the stream opens.
struct UserThrottle {
    control: Arc<ControlPlane>,
    user: String,
    up: Option<halfpipe_state::RateSpec>,
    down: Option<halfpipe_state::RateSpec>,
    quota: Option<halfpipe_state::policy::Quota>,
}

impl UserThrottle {
    /// The throttle a stream of `user` needs under `policy`, if any.
    fn for_user(
        control: &Arc<ControlPlane>,
        user: &str,
        policy: &halfpipe_state::policy::UserPolicy,
    ) -> Option<Arc<dyn Throttle>> {
        // A user's own speed limit: bursts of a tenth of a second (at least one read).
        let spec = |rate: Option<u64>, dir| {
            rate.map(|r| halfpipe_state::RateSpec {
                per_second: r,
                burst: (r / 10).max(64 * 1024),
            })
            .or_else(|| control.byte_rate(dir))
        };
        let t = UserThrottle {
            control: control.clone(),
            user: user.to_string(),
            up: spec(policy.up_bytes_per_sec, Direction::Up),
            down: spec(policy.down_bytes_per_sec, Direction::Down),
            quota: policy.quota,
        };
        (t.up.is_some() || t.down.is_some() || t.quota.is_some())
            .then(|| Arc::new(t) as Arc<dyn Throttle>)
    }

    fn charge(&self, dir: Direction, n: usize) -> Pace {
        let spec = match dir {
            Direction::Up => self.up,
            Direction::Down => self.down,
        };
        if let Some(spec) = spec {
            let wait = self.control.charge_bytes(&self.user, dir, spec, n as u64);
            if !wait.is_zero() {
                return Pace::Wait(wait);
            }
        }
        if let Some(q) = self.quota {
            let quotas = self.control.db().quotas();
            if let Err(e) = quotas.charge(&self.user, n as u64, unix_ms(), Some(q)) {
                self.control.metrics.limit_hit("transfer_quota");
                tracing::warn!(user = %self.user, reason = %e, "transfer quota reached: stream reset");
                return Pace::Stop;
            }
        }
        Pace::Go
    }
}

impl Throttle for UserThrottle {
    // At the exit the socket is the target: what it sends goes down to the client.
    fn read_from_socket(&self, n: usize) -> Pace {
        self.charge(Direction::Down, n)
    }

    fn write_to_socket(&self, n: usize) -> Pace {
        self.charge(Direction::Up, n)
    }
}

/// The networks a user's policy allows; fail closed: one that does not parse allows none.
fn allowed_networks(policy: &halfpipe_state::policy::UserPolicy) -> Vec<ipnet::IpNet> {
    let parsed: Option<Vec<ipnet::IpNet>> = policy
        .allowed_destinations
        .iter()
        .map(|d| {
            d.parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| d.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
        })
        .collect();
    parsed.unwrap_or_default()
}

async fn connect_stream(
    state: Arc<State>,
    tunnel: Arc<Tunnel>,
    user: String,
    stream: halfpipe_core::frame::StreamId,
    target: halfpipe_core::TargetAddr,
) {
    let cp = &state.control;
    if let Err(r) = cp.admit_stream(&user) {
        tracing::info!(user, %target, reason = r.describe(), "stream refused by the control plane");
        let _ = tunnel.open_result(stream, halfpipe_core::ConnectStatus::NotAllowed);
        return;
    }
    let policy = cp.db().users().policy(&user);
    if let Some(q) = policy.quota {
        let usage = cp.db().quotas().usage(&user, unix_ms(), Some(q));
        if usage.exhausted() {
            cp.metrics.limit_hit("transfer_quota");
            tracing::info!(user, %target, used = usage.used, limit = q.bytes, "stream refused: transfer quota exhausted until the period resets");
            let _ = tunnel.open_result(stream, halfpipe_core::ConnectStatus::NotAllowed);
            return;
        }
    }
    // Borrow the configured policy; only a narrowing (RESTRICTED, the user's list) copies.
    let reloadable = read(&state.reloadable);
    let mut egress = std::borrow::Cow::Borrowed(&reloadable.egress);
    if let Some(narrowed) = cp.egress(&egress) {
        egress = std::borrow::Cow::Owned(narrowed);
    }
    if !policy.allowed_destinations.is_empty() {
        egress = std::borrow::Cow::Owned(egress.restricted_to(&allowed_networks(&policy)));
    }
    match crate::outbound::connect(&egress, &target, state.connect_timeout).await {
        Ok(socket) => {
            if tunnel
                .open_result(stream, halfpipe_core::ConnectStatus::Succeeded)
                .is_ok()
            {
                let throttle = UserThrottle::for_user(cp, &user, &policy);
                tunnel
                    .pump(stream, socket, bytes::Bytes::new(), throttle)
                    .await;
            }
        }
        Err(status) => {
            if status == halfpipe_core::ConnectStatus::NotAllowed {
                cp.egress_denied(&user);
            }
            tracing::info!(user, %target, reason = status.describe(), "stream refused");
            let _ = tunnel.open_result(stream, status);
        }
    }
}

/// Shortest time between two log lines about one session's refused streams.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets one log line through per interval and counts the events it stands for.
struct LogBudget {
    every: Duration,
    last: Option<Instant>,
    /// Events since the last line, this one included.
    pending: u64,
}

impl LogBudget {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            pending: 0,
        }
    }

    /// Counts an event at `now`; `Some(n)` when a line is due, standing for `n` events.
    fn take(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        if self.last.is_some_and(|t| now < t + self.every) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.pending))
    }
}

async fn run_session(
    state: Arc<State>,
    id: SessionId,
    user: String,
    tunnel: Arc<Tunnel>,
    mut control: mpsc::Receiver<Control>,
) {
    // A client that keeps opening streams at the limit must not flood the log: one line
    // per LIMIT_LOG_EVERY, saying how many refusals it stands for (metrics count each).
    let mut limit_log = LogBudget::new(LIMIT_LOG_EVERY);
    while let Some(c) = control.recv().await {
        match c {
            Control::StreamOpened { stream, target } => {
                tokio::spawn(connect_stream(
                    state.clone(),
                    tunnel.clone(),
                    user.clone(),
                    stream,
                    target,
                ));
            }
            Control::StreamLimit(stream) => {
                state.control.metrics.limit_hit("streams_per_session");
                if let Some(refused) = limit_log.take(Instant::now()) {
                    tracing::warn!(user, session = %id, stream, refused, "stream limit hit: stream refused");
                }
            }
            Control::LegDown { role, error } => {
                tracing::debug!(user, session = %id, leg = role.name(), error, "leg down");
            }
            Control::Closed(reason) => {
                let up = tunnel
                    .stats
                    .bytes_received
                    .load(std::sync::atomic::Ordering::Relaxed);
                let down = tunnel
                    .stats
                    .bytes_sent
                    .load(std::sync::atomic::Ordering::Relaxed);
                tracing::info!(user, session = %id, ?reason, bytes_up = up, bytes_down = down, "session closed");
                state.control.audit(
                    "session_closed",
                    vec![
                        ("user".into(), user.clone()),
                        ("session".into(), id.to_string()),
                        ("reason".into(), format!("{reason:?}")),
                        ("bytes_up".into(), up.to_string()),
                        ("bytes_down".into(), down.to_string()),
                    ],
                );
                break;
            }
        }
    }
    let mut sessions = lock(&state.sessions);
    if let Some(gone) = sessions.remove(&id) {
        share_user_window(&sessions, &gone.user_key, &state.session);
    }
}

/// Gives each of a user's sessions an equal share of the configured session window, as a
/// client's pool shares its own: a client spreading its streams over several sessions
/// can then have no more bytes waiting at the exit than one session could.
fn share_user_window(
    sessions: &HashMap<SessionId, SessionEntry>,
    user_key: &[u8; 32],
    config: &SessionConfig,
) {
    let window = config.share(
        config.session_window,
        sessions_of(sessions, user_key).count(),
    );
    for e in sessions_of(sessions, user_key) {
        e.tunnel.set_session_window(window);
    }
}

/// The live sessions of the user with `user_key`.
fn sessions_of<'a>(
    sessions: &'a HashMap<SessionId, SessionEntry>,
    user_key: &'a [u8; 32],
) -> impl Iterator<Item = &'a SessionEntry> {
    sessions.values().filter(move |e| &e.user_key == user_key)
}

/// Unseals the key store and builds the handshake keys from it.
fn open_store(
    ks: &keys::KeystoreSettings,
) -> Result<(keys::ServerKeys, halfpipe_keystore::KeyStore), keys::StoreKeysError> {
    let store = ks.open()?;
    let k = keys::ServerKeys::from_store(&store, ks.suite, ks.psk.clone(), unix_ms())?;
    Ok((k, store))
}

/// Once a second: the control plane's clock check and state flush.
async fn tick_loop(state: Arc<State>) {
    loop {
        crate::timer::sleep(Duration::from_secs(1)).await;
        let handle = ServerHandle {
            state: state.clone(),
        };
        // The flush and the key store touch the disk: keep them off the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            handle.state.control.tick();
            handle.maintain_keys();
            handle.enforce_policies();
        })
        .await;
    }
}

/// Closes every session when the mode becomes LOCKDOWN.
async fn mode_watch(state: Arc<State>) {
    let mut rx = state.control.subscribe();
    loop {
        if *rx.borrow_and_update() == Mode::Lockdown {
            close_sessions(&state, |_| true, "lockdown");
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Closes the sessions whose user matches; returns how many.
fn close_sessions(state: &State, which: impl Fn(&str) -> bool, why: &str) -> usize {
    let tunnels: Vec<Arc<Tunnel>> = lock(&state.sessions)
        .values()
        .filter(|e| which(&e.user))
        .map(|e| e.tunnel.clone())
        .collect();
    for t in &tunnels {
        t.close(halfpipe_core::frame::CloseCode::Administrative);
    }
    if !tunnels.is_empty() {
        tracing::warn!(count = tunnels.len(), why, "sessions closed");
    }
    tunnels.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_budget_lets_one_line_through_per_interval_and_counts_the_rest() {
        let mut b = LogBudget::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(b.take(t0), Some(1));
        for i in 1..=999u64 {
            assert_eq!(b.take(t0 + Duration::from_millis(i)), None);
        }
        // The next line stands for the 999 held back and itself.
        assert_eq!(b.take(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(b.take(t0 + Duration::from_secs(11)), None);
        assert_eq!(b.take(t0 + Duration::from_secs(20)), Some(2));
    }

    fn entry(user_key: [u8; 32]) -> (SessionId, SessionEntry) {
        let (tunnel, _control) = Tunnel::new(Side::Server, SessionConfig::default());
        let e = SessionEntry {
            user: "u".into(),
            user_key,
            epochs: [0; 2],
            tunnel,
            peer: ([127, 0, 0, 1], 1).into(),
            opened: Instant::now(),
            transports: [None; 2],
        };
        (SessionId::random(), e)
    }

    #[tokio::test]
    async fn a_users_sessions_share_the_window_and_get_it_back_as_others_close() {
        let config = SessionConfig::default();
        let windows = |s: &HashMap<SessionId, SessionEntry>, key: [u8; 32]| -> Vec<u64> {
            sessions_of(s, &key)
                .map(|e| e.tunnel.session_window())
                .collect()
        };
        let (alice, bob) = ([1; 32], [2; 32]);
        let mut sessions = HashMap::new();
        for _ in 0..3 {
            let (id, e) = entry(alice);
            sessions.insert(id, e);
            share_user_window(&sessions, &alice, &config);
        }
        let (bob_id, e) = entry(bob);
        sessions.insert(bob_id, e);
        share_user_window(&sessions, &bob, &config);
        let third = config.share(config.session_window, 3);
        assert_eq!(windows(&sessions, alice), vec![third; 3]);
        assert_eq!(
            windows(&sessions, bob),
            vec![config.session_window],
            "others untouched"
        );
        // One of alice's sessions closes: the other two grow back to half each.
        let gone = *sessions
            .iter()
            .find(|(_, e)| e.user_key == alice)
            .unwrap()
            .0;
        let e = sessions.remove(&gone).unwrap();
        share_user_window(&sessions, &e.user_key, &config);
        let half = config.share(config.session_window, 2);
        assert!(half > third);
        assert_eq!(windows(&sessions, alice), vec![half; 2]);
        assert_eq!(windows(&sessions, bob), vec![config.session_window]);
    }
}
