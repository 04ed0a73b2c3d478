//! The exit server: leg listeners, handshake admission, the session table, and the
//! outbound connector behind the egress policy.
//!
//! Admission order for every leg: handshake slot (bounded) → Noise authentication →
//! known user → replay check → session ownership → limits. Anything failing before the
//! peer is authenticated gets silence on the wire and a `security` log line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use halfpipe_core::handshake::{
    AcceptedHello, HandshakeKeys, HelloStatus, LegRole, Responder, ServerHello, SessionId,
};
use halfpipe_core::replay::ReplayCache;
use halfpipe_core::session::{SessionConfig, Side};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::egress::EgressPolicy;
use crate::leg::{server_read_hello, server_reply, unix_ms, LegError};
use crate::leg_url::LegUrl;
use crate::transport::{BoxedLeg, Counted, LegListener, ListenSettings, TransportError, Upgrade};
use crate::tunnel::{Control, Tunnel};

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
    /// Leg listeners (any listener accepts either leg role).
    pub listen: Vec<LegUrl>,
    /// Certificates and QUIC tuning for the listeners.
    pub transport: ListenSettings,
    /// The server's static key and cipher.
    pub keys: HandshakeKeys,
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
}

/// The server failed to start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

struct SessionEntry {
    user: String,
    user_key: [u8; 32],
    epochs: [u32; 2],
    tunnel: Arc<Tunnel>,
}

struct State {
    keys: HandshakeKeys,
    users: HashMap<[u8; 32], String>,
    egress: EgressPolicy,
    connect_timeout: Duration,
    limits: ServerLimits,
    session: SessionConfig,
    replay: Mutex<ReplayCache>,
    sessions: Mutex<HashMap<SessionId, SessionEntry>>,
}

/// A running (bound) exit server.
pub struct Server {
    state: Arc<State>,
    listeners: Vec<LegListener>,
}

/// A cheap handle for inspecting a running server (status, tests).
#[derive(Clone)]
pub struct ServerHandle {
    state: Arc<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Server {
    /// Binds every listener.
    pub async fn bind(settings: ServerSettings) -> Result<Self, ServerError> {
        let mut listeners = Vec::new();
        for url in &settings.listen {
            listeners.push(LegListener::bind(url, &settings.transport).await?);
        }
        let limits = settings.limits;
        let state = Arc::new(State {
            keys: settings.keys,
            users: settings
                .users
                .into_iter()
                .map(|u| (u.public_key, u.name))
                .collect(),
            egress: settings.egress,
            connect_timeout: settings.connect_timeout,
            replay: Mutex::new(ReplayCache::new(
                limits.max_clock_skew.as_millis() as u64,
                limits.replay_capacity,
            )),
            limits,
            session: settings.session,
            sessions: Mutex::new(HashMap::new()),
        });
        Ok(Self { state, listeners })
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

    /// Serves until the task is dropped.
    pub async fn run(self) {
        let mut tasks = Vec::new();
        for l in self.listeners {
            tasks.push(tokio::spawn(accept_loop(self.state.clone(), l)));
        }
        for t in tasks {
            let _ = t.await;
        }
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
    let handshakes = Arc::new(Semaphore::new(state.limits.max_handshakes_in_flight));
    let connections = Arc::new(Semaphore::new(state.limits.max_connections_per_listener));
    loop {
        let (peer, upgrade) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                target: "security",
                %peer,
                listener = %url,
                limit = state.limits.max_connections_per_listener,
                "connection limit hit: connection dropped"
            );
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(
                target: "security",
                %peer,
                listener = %url,
                limit = state.limits.max_handshakes_in_flight,
                "handshake limit hit: connection dropped"
            );
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            handle_leg(state, upgrade, slot, peer).await;
            drop(permit);
        });
    }
}

/// Why an unauthenticated leg was refused (logged, never sent).
fn security_refusal(peer: SocketAddr, reason: &str) {
    tracing::warn!(target: "security", %peer, reason, "leg refused");
}

async fn handle_leg(
    state: Arc<State>,
    upgrade: Upgrade,
    slot: OwnedSemaphorePermit,
    peer: SocketAddr,
) {
    let deadline = tokio::time::Instant::now() + state.limits.handshake_timeout;
    let mut io = match tokio::time::timeout_at(deadline, upgrade).await {
        // The leg holds its listener's connection slot for as long as it lives.
        Ok(Ok(io)) => Box::new(Counted::new(io, slot)) as BoxedLeg,
        Ok(Err(e)) => return security_refusal(peer, &format!("transport handshake failed: {e}")),
        Err(_) => return security_refusal(peer, "transport handshake timed out"),
    };
    let (resp, acc) =
        match tokio::time::timeout_at(deadline, server_read_hello(&mut io, &state.keys)).await {
            Ok(Ok(x)) => x,
            Ok(Err(LegError::Io(e))) => {
                return security_refusal(peer, &format!("I/O during handshake: {e}"))
            }
            Ok(Err(e)) => {
                // Hold the connection open in silence until the deadline: no error byte,
                // no early close that would tell a prober anything.
                security_refusal(peer, &format!("authentication failed: {e}"));
                return silence(&mut io, deadline).await;
            }
            Err(_) => return security_refusal(peer, "handshake timed out"),
        };
    match admit(&state, peer, &acc) {
        Admission::Silence(reason) => {
            security_refusal(peer, &reason);
            silence(&mut io, deadline).await;
        }
        Admission::Refuse(status) => {
            let hello = ServerHello {
                status,
                recv_next: 0,
                server_time_ms: unix_ms(),
            };
            tracing::info!(%peer, session = %acc.hello.session_id, status = status.describe(), "leg refused");
            let _ = tokio::time::timeout_at(deadline, server_reply(&mut io, resp, &hello)).await;
        }
        Admission::Attach(tunnel) => attach(peer, io, resp, &acc, tunnel, deadline).await,
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
    Silence(String),
    Refuse(HelloStatus),
    Attach(Arc<Tunnel>),
}

fn admit(state: &Arc<State>, peer: SocketAddr, acc: &AcceptedHello) -> Admission {
    let Some(user) = state.users.get(&acc.client_static) else {
        return Admission::Silence("unknown client key".into());
    };
    if let Err(e) =
        lock(&state.replay).check_and_insert(acc.replay_id, acc.hello.timestamp_ms, unix_ms())
    {
        return Admission::Silence(format!("user {user}: {e}"));
    }
    let hello = &acc.hello;
    let role_idx = match hello.role {
        LegRole::Up => 0,
        LegRole::Down => 1,
    };
    let mut sessions = lock(&state.sessions);
    if let Some(entry) = sessions.get_mut(&hello.session_id) {
        if entry.user_key != acc.client_static {
            return Admission::Silence(format!(
                "user {user} named session {} owned by another user",
                hello.session_id
            ));
        }
        if hello.epoch <= entry.epochs[role_idx] {
            return Admission::Refuse(HelloStatus::StaleEpoch);
        }
        entry.epochs[role_idx] = hello.epoch;
        return Admission::Attach(entry.tunnel.clone());
    }
    if sessions.len() >= state.limits.max_sessions {
        tracing::warn!(%peer, user, limit = state.limits.max_sessions, "session limit hit");
        return Admission::Refuse(HelloStatus::SessionLimit);
    }
    let per_user = sessions
        .values()
        .filter(|e| e.user_key == acc.client_static)
        .count();
    if per_user >= state.limits.max_sessions_per_user {
        tracing::warn!(%peer, user, limit = state.limits.max_sessions_per_user, "per-user session limit hit");
        return Admission::Refuse(HelloStatus::UserSessionLimit);
    }
    let (tunnel, control) = Tunnel::new(Side::Server, state.session.clone());
    let mut epochs = [0u32; 2];
    epochs[role_idx] = hello.epoch;
    sessions.insert(
        hello.session_id,
        SessionEntry {
            user: user.clone(),
            user_key: acc.client_static,
            epochs,
            tunnel: tunnel.clone(),
        },
    );
    tracing::info!(%peer, user, session = %hello.session_id, "session opened");
    tokio::spawn(run_session(
        state.clone(),
        hello.session_id,
        user.clone(),
        tunnel.clone(),
        control,
    ));
    Admission::Attach(tunnel)
}

async fn attach(
    peer: SocketAddr,
    mut io: BoxedLeg,
    resp: Responder,
    acc: &AcceptedHello,
    tunnel: Arc<Tunnel>,
    deadline: tokio::time::Instant,
) {
    let hello = ServerHello {
        status: HelloStatus::Accepted,
        recv_next: tunnel.recv_next(),
        server_time_ms: unix_ms(),
    };
    let keys = match tokio::time::timeout_at(deadline, server_reply(&mut io, resp, &hello)).await {
        Ok(Ok(k)) => k,
        Ok(Err(e)) => return tracing::info!(%peer, error = %e, "leg lost during handshake reply"),
        Err(_) => return tracing::info!(%peer, "leg handshake reply timed out"),
    };
    let role = acc.hello.role;
    let attached = tunnel.attach_leg(role, io, &keys, acc.hello.recv_next);
    match attached {
        Ok(()) => {
            tracing::debug!(%peer, session = %acc.hello.session_id, leg = role.name(), epoch = acc.hello.epoch, "leg attached")
        }
        Err(e) => {
            tracing::warn!(%peer, session = %acc.hello.session_id, error = %e, "leg refused by session; session closed");
        }
    }
}

async fn run_session(
    state: Arc<State>,
    id: SessionId,
    user: String,
    tunnel: Arc<Tunnel>,
    mut control: mpsc::Receiver<Control>,
) {
    while let Some(c) = control.recv().await {
        match c {
            Control::StreamOpened { stream, target } => {
                let tunnel = tunnel.clone();
                let state = state.clone();
                let user = user.clone();
                tokio::spawn(async move {
                    match crate::outbound::connect(&state.egress, &target, state.connect_timeout)
                        .await
                    {
                        Ok(socket) => {
                            if tunnel
                                .open_result(stream, halfpipe_core::ConnectStatus::Succeeded)
                                .is_ok()
                            {
                                tunnel.pump(stream, socket, bytes::Bytes::new()).await;
                            }
                        }
                        Err(status) => {
                            tracing::info!(user, %target, reason = status.describe(), "stream refused");
                            let _ = tunnel.open_result(stream, status);
                        }
                    }
                });
            }
            Control::StreamLimit(stream) => {
                tracing::warn!(user, session = %id, stream, "stream limit hit: stream refused");
            }
            Control::LegDown { role, error } => {
                tracing::debug!(user, session = %id, leg = role.name(), error, "leg down");
            }
            Control::Closed(reason) => {
                tracing::info!(
                    user,
                    session = %id,
                    ?reason,
                    bytes_up = tunnel.stats.bytes_received.load(std::sync::atomic::Ordering::Relaxed),
                    bytes_down = tunnel.stats.bytes_sent.load(std::sync::atomic::Ordering::Relaxed),
                    "session closed"
                );
                break;
            }
        }
    }
    lock(&state.sessions).remove(&id);
}
