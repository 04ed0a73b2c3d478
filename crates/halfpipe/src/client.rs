//! The client: keeps a small pool of sessions to the exit up (each dialling its two legs
//! on their own URLs, with backoff and jitter on loss), spreads streams over them, and
//! serves the local inbounds — SOCKS5, HTTP CONNECT and fixed forwards — answering each
//! application only once the exit reports its connect.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfpipe_core::handshake::{ClientHello, HandshakeKeys, HelloStatus, LegRole, SessionId};
use halfpipe_core::session::{SessionConfig, Side};
use halfpipe_core::{ConnectStatus, TargetAddr};
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex as AsyncMutex, Semaphore};

use crate::leg::{client_handshake, unix_ms, LegError};
use crate::leg_url::LegUrl;
use crate::locks::lock;
use crate::transport::{dial, tune_socket, DialSettings, TransportError};
use crate::tunnel::{Control, OpenError, Tunnel};

/// How the client reaches the exit.
#[derive(Clone)]
pub struct ExitSettings {
    /// Where the uplink goes: URLs in order of preference (at least one).
    pub uplink: Vec<LegUrl>,
    /// Where the downlink comes from: URLs in order of preference (at least one).
    pub downlink: Vec<LegUrl>,
    /// A URL that failed is skipped for this long before it is preferred again.
    pub hold_down: Duration,
    /// TLS trust and QUIC tuning for the legs.
    pub transport: DialSettings,
    /// Our static key (user identity) and cipher.
    pub keys: HandshakeKeys,
    /// The exit's static public key.
    pub server_public: [u8; 32],
    /// Where a key the exit announces during a rotation is saved (and read back at the
    /// next start), so a client that was connected during the overlap window follows the
    /// rotation without a new link.
    pub learned_key_file: Option<std::path::PathBuf>,
    /// Timeout for dial plus TLS plus Noise handshake of one leg.
    pub dial_timeout: Duration,
    /// Timeout for the exit's connect to a target.
    pub connect_timeout: Duration,
    /// Shortest wait before redialling a lost leg.
    pub backoff_min: Duration,
    /// Longest wait between redials.
    pub backoff_max: Duration,
    /// Session tunables.
    pub session: SessionConfig,
    /// Up to this many sessions run side by side, each with its own pair of legs; a new
    /// stream goes to the one carrying the fewest, and a new session is opened only when
    /// every live one already carries a stream. More than one lets the kernel and both
    /// ends work on several connections at once. The pool shares `session`'s window and
    /// retransmit cap, so it holds no more memory than one session.
    pub sessions: usize,
    /// Each leg gets a fresh handshake (new ephemeral keys) after this long...
    pub rekey_after: Duration,
    /// ...or after this many bytes through it, whichever comes first.
    pub rekey_after_bytes: u64,
    /// Keep the Noise AEAD on every leg. By default a leg whose TLS 1.3 runs end to end to
    /// the exit (proven by a matching channel binding) carries its records inside TLS
    /// only; legs through a TLS-terminating proxy or CDN always keep both layers.
    pub double_encrypt: bool,
}

/// Default number of sessions a client spreads its streams over.
pub const DEFAULT_SESSIONS: usize = 4;
/// Most sessions a client may be configured to run side by side.
pub const MAX_SESSIONS: usize = 16;

/// Default leg age before a fresh handshake.
pub const DEFAULT_REKEY_AFTER: Duration = Duration::from_secs(3600);
/// Default bytes through a leg before a fresh handshake.
pub const DEFAULT_REKEY_AFTER_BYTES: u64 = 64 << 30;

/// Why the client could not reach the exit.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Dial or TLS failed.
    #[error("{leg} {url}: {source}")]
    Transport {
        /// Which leg.
        leg: &'static str,
        /// Its URL.
        url: String,
        /// What failed.
        source: TransportError,
    },
    /// The Noise handshake failed (wrong server key, PSK or cipher, or the exit is silent
    /// because it does not know our key).
    #[error("{leg} {url}: handshake failed: {source} (check server_public_key, the user key registered on the exit, psk and cipher)")]
    Handshake {
        /// Which leg.
        leg: &'static str,
        /// Its URL.
        url: String,
        /// What failed.
        source: LegError,
    },
    /// The exit answered but refused the leg.
    #[error("{leg} {url}: the exit refused: {}", .status.describe())]
    Refused {
        /// Which leg.
        leg: &'static str,
        /// Its URL.
        url: String,
        /// The exit's verdict.
        status: HelloStatus,
    },
    /// A leg has no URL configured.
    #[error("no {0} URL configured")]
    NoUrl(&'static str),
    /// The exit's handshake answer does not fit the session (the session is closed).
    #[error("{leg} {url}: the exit's answer does not fit the session: {source}")]
    Attach {
        /// Which leg.
        leg: &'static str,
        /// Its URL.
        url: String,
        /// What did not fit.
        source: crate::tunnel::AttachError,
    },
}

#[derive(Clone)]
struct Current {
    id: SessionId,
    tunnel: Arc<Tunnel>,
}

/// One place in the session pool: at most one live session, established on demand.
#[derive(Default)]
struct Slot {
    /// The session, once established (it may have closed since).
    live: std::sync::Mutex<Option<Current>>,
    /// Held while the slot establishes a session, so it dials once for all waiters.
    establishing: AsyncMutex<()>,
    /// Streams assigned to this slot and not yet counted by its tunnel.
    opening: AtomicUsize,
}

impl Slot {
    /// The session, if established and not closed.
    fn live(&self) -> Option<Current> {
        lock(&self.live)
            .as_ref()
            .filter(|c| !c.tunnel.is_closed())
            .cloned()
    }

    /// Streams on the slot, counting those being opened, and whether it has no live
    /// session (so that on equal counts a live session sorts first).
    fn load(&self) -> (usize, bool) {
        let opening = self.opening.load(Ordering::Relaxed);
        match self.live() {
            Some(c) => (opening + c.tunnel.stream_count(), false),
            None => (opening, true),
        }
    }
}

/// A stream assigned to a slot: counted in the slot's load until dropped.
struct Assigned<'a>(&'a Slot);

impl Drop for Assigned<'_> {
    fn drop(&mut self) {
        self.0.opening.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection to the exit: a pool of up to [`ExitSettings::sessions`] sessions, each
/// established on demand and re-established when it ends.
pub struct Exit {
    settings: ExitSettings,
    /// The exit key to dial with: the configured one, or the one it announced since.
    server_key: std::sync::Mutex<[u8; 32]>,
    slots: Vec<Slot>,
    /// Per leg role (up, down): which URL carries it and when each URL last failed.
    choices: [std::sync::Mutex<UrlChoice>; 2],
}

/// Index of a leg role in per-role arrays (up, down).
fn role_index(role: LegRole) -> usize {
    match role {
        LegRole::Up => 0,
        LegRole::Down => 1,
    }
}

/// The URL a leg uses and the recent failures of its candidates.
#[derive(Default)]
struct UrlChoice {
    in_use: Option<usize>,
    failed_at: Vec<Option<Instant>>,
}

impl UrlChoice {
    /// Candidate indexes to try now, in preference order: URLs not failed within
    /// `hold_down` first, then the held-down ones (oldest failure first) as a last resort.
    fn order(&mut self, n: usize, hold_down: Duration, now: Instant) -> Vec<usize> {
        self.failed_at.resize(n, None);
        let held =
            |i: &usize| self.failed_at[*i].is_some_and(|t| now.duration_since(t) < hold_down);
        let (mut later, mut first): (Vec<usize>, Vec<usize>) = (0..n).partition(held);
        later.sort_by_key(|i| self.failed_at[*i]);
        first.extend(later);
        first
    }
}

impl Exit {
    /// A connection that dials lazily, on the first stream.
    pub fn new(settings: ExitSettings) -> Arc<Self> {
        let key = settings
            .learned_key_file
            .as_deref()
            .and_then(read_learned_key)
            .unwrap_or(settings.server_public);
        Arc::new(Self {
            server_key: std::sync::Mutex::new(key),
            slots: (0..settings.sessions.clamp(1, MAX_SESSIONS))
                .map(|_| Slot::default())
                .collect(),
            settings,
            choices: Default::default(),
        })
    }

    /// The exit key the client dials with now.
    pub fn server_key(&self) -> [u8; 32] {
        *lock(&self.server_key)
    }

    /// Adopts the exit's announced new key (it arrived in a handshake only the key we
    /// dialled could produce) and saves it for the next start.
    fn learn_key(&self, next: [u8; 32]) {
        *lock(&self.server_key) = next;
        let shown = crate::keyfile::encode_key(&next);
        match &self.settings.learned_key_file {
            Some(path) => match crate::keyfile::write_public_key(path, &next) {
                Ok(()) => {
                    tracing::warn!(key = %shown, file = %path.display(), "the exit rotated its key; learned and saved the new one")
                }
                Err(e) => {
                    tracing::error!(key = %shown, error = %e, "the exit rotated its key; learned it, but cannot save it (set it as server_public_key)")
                }
            },
            None => {
                tracing::warn!(key = %shown, "the exit rotated its key; using the new one for this run (nowhere to save it)")
            }
        }
    }

    /// The first session of the pool, establishing it when there is none (a start-up
    /// check that the exit is reachable).
    pub async fn tunnel(self: &Arc<Self>) -> Result<Arc<Tunnel>, ClientError> {
        self.tunnel_in(&self.slots[0]).await
    }

    /// Tunables of one pooled session: the configured session window and retransmit cap
    /// are shared by the pool (so it holds no more memory than one session would), but no
    /// session gets less than one stream's window.
    fn pooled_session_config(&self) -> SessionConfig {
        let c = &self.settings.session;
        let n = self.slots.len();
        SessionConfig {
            session_window: c.share(c.session_window, n),
            max_unacked: c.share(c.max_unacked, n),
            ..c.clone()
        }
    }

    /// The slot a new stream should go to: the one carrying the fewest streams, a live
    /// session before an empty slot, the first on ties.
    fn assign(&self) -> Assigned<'_> {
        let slot = self
            .slots
            .iter()
            .min_by_key(|s| s.load())
            .unwrap_or(&self.slots[0]);
        slot.opening.fetch_add(1, Ordering::Relaxed);
        Assigned(slot)
    }

    /// A live tunnel for a new stream: the assigned slot's session, established if it has
    /// none. When that fails (the exit may cap sessions per user) while another session
    /// is live, the stream goes there instead.
    async fn tunnel_for_stream(self: &Arc<Self>, slot: &Slot) -> Result<Arc<Tunnel>, ClientError> {
        match self.tunnel_in(slot).await {
            Ok(t) => Ok(t),
            Err(e) => match self.slots.iter().find_map(Slot::live) {
                Some(c) => {
                    tracing::info!(error = %e, session = %c.id, "could not open another session; the stream shares a live one");
                    Ok(c.tunnel)
                }
                None => Err(e),
            },
        }
    }

    /// The slot's live tunnel, establishing a session when it has none.
    async fn tunnel_in(self: &Arc<Self>, slot: &Slot) -> Result<Arc<Tunnel>, ClientError> {
        if let Some(c) = slot.live() {
            return Ok(c.tunnel);
        }
        let _dialling = slot.establishing.lock().await;
        if let Some(c) = slot.live() {
            return Ok(c.tunnel);
        }
        let id = SessionId::random();
        let (tunnel, control) = Tunnel::new(Side::Client, self.pooled_session_config());
        let epochs = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let (up, down) = tokio::join!(
            self.dial_leg(id, &tunnel, &epochs, LegRole::Up),
            self.dial_leg(id, &tunnel, &epochs, LegRole::Down)
        );
        if let Err(e) = up.and(down) {
            tunnel.close(halfpipe_core::frame::CloseCode::Normal);
            return Err(e);
        }
        tracing::info!(session = %id, "session established");
        tokio::spawn(
            self.clone()
                .keep_legs_up(id, tunnel.clone(), epochs, control),
        );
        *lock(&slot.live) = Some(Current {
            id,
            tunnel: tunnel.clone(),
        });
        Ok(tunnel)
    }

    /// The id of the first session of the pool, if it is live (a lone stream runs on it).
    pub async fn session_id(&self) -> Option<SessionId> {
        self.slots[0].live().map(|c| c.id)
    }

    /// The ids of the live sessions, in pool order.
    pub fn session_ids(&self) -> Vec<SessionId> {
        self.slots
            .iter()
            .filter_map(Slot::live)
            .map(|c| c.id)
            .collect()
    }

    /// Kills one leg of every live session, as a network failure would (for tests and
    /// drills).
    pub async fn kill_leg(&self, role: LegRole) {
        for c in self.slots.iter().filter_map(Slot::live) {
            c.tunnel.kill_leg(role);
        }
    }

    /// The URL each leg (up, down) is on now, for status.
    pub fn leg_urls(&self) -> [Option<LegUrl>; 2] {
        let urls = [&self.settings.uplink, &self.settings.downlink];
        [0, 1].map(|i| {
            let c = lock(&self.choices[i]);
            c.in_use.and_then(|u| urls[i].get(u).cloned())
        })
    }

    /// Dials a leg on its URLs in preference order (skipping recently failed ones while
    /// others remain), returning on the first success or with the last error.
    async fn dial_leg(
        &self,
        id: SessionId,
        tunnel: &Arc<Tunnel>,
        epochs: &[AtomicU32; 2],
        role: LegRole,
    ) -> Result<(), ClientError> {
        let idx = role_index(role);
        let urls = if idx == 0 {
            &self.settings.uplink
        } else {
            &self.settings.downlink
        };
        let order =
            lock(&self.choices[idx]).order(urls.len(), self.settings.hold_down, Instant::now());
        let mut last = None;
        for i in order {
            let result = self.dial_leg_on(id, tunnel, epochs, role, &urls[i]).await;
            let mut choice = lock(&self.choices[idx]);
            match result {
                Ok(()) => {
                    choice.in_use = Some(i);
                    choice.failed_at[i] = None;
                    tracing::info!(session = %id, leg = role.name(), url = %urls[i], "leg up");
                    return Ok(());
                }
                // The exit forgot the session: no other URL will know it either.
                Err(
                    e @ ClientError::Refused {
                        status: HelloStatus::UnknownSession,
                        ..
                    },
                ) => return Err(e),
                Err(e) => {
                    choice.failed_at[i] = Some(Instant::now());
                    if urls.len() > 1 {
                        tracing::warn!(session = %id, leg = role.name(), url = %urls[i], error = %e, "leg URL failed; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(ClientError::NoUrl(role.name())))
    }

    async fn dial_leg_on(
        &self,
        id: SessionId,
        tunnel: &Arc<Tunnel>,
        epochs: &[AtomicU32; 2],
        role: LegRole,
        url: &LegUrl,
    ) -> Result<(), ClientError> {
        let s = &self.settings;
        let idx = role_index(role);
        let leg = role.name();
        let mut io = dial(url, &s.transport, s.dial_timeout)
            .await
            .map_err(|source| ClientError::Transport {
                leg,
                url: url.to_string(),
                source,
            })?;
        let hello = ClientHello {
            role,
            session_id: id,
            epoch: epochs[idx].fetch_add(1, Ordering::SeqCst) + 1,
            timestamp_ms: unix_ms(),
            recv_next: tunnel.recv_next(),
            channel_binding: if s.double_encrypt {
                None
            } else {
                io.channel_binding()
            },
        };
        let server_key = self.server_key();
        let (reply, keys) = client_handshake(&mut io, &s.keys, &server_key, &hello, s.dial_timeout)
            .await
            .map_err(|source| ClientError::Handshake {
                leg,
                url: url.to_string(),
                source,
            })?;
        if let Some(next) = reply.next_key.filter(|k| *k != server_key) {
            self.learn_key(next);
        }
        if reply.status != HelloStatus::Accepted {
            return Err(ClientError::Refused {
                leg,
                url: url.to_string(),
                status: reply.status,
            });
        }
        tunnel
            .attach_leg(role, io, &keys, reply.recv_next)
            .map_err(|source| ClientError::Attach {
                leg,
                url: url.to_string(),
                source,
            })?;
        Ok(())
    }

    async fn keep_legs_up(
        self: Arc<Self>,
        id: SessionId,
        tunnel: Arc<Tunnel>,
        epochs: Arc<[AtomicU32; 2]>,
        mut control: mpsc::Receiver<Control>,
    ) {
        let mut rekey = RekeyBudget::new(&tunnel);
        let every = REKEY_CHECK.min(self.settings.rekey_after);
        let mut check_at = std::time::Instant::now() + every;
        loop {
            let c = tokio::select! {
                c = control.recv() => c,
                _ = crate::timer::sleep_until(check_at) => {
                    check_at = std::time::Instant::now() + every;
                    for role in rekey.due(&self.settings, &tunnel) {
                        // Make before break: the new leg is dialled while the old one
                        // still carries traffic, and replaces it when it attaches; the
                        // session layer resends what the old leg had not delivered.
                        let (this, tunnel, epochs) = (self.clone(), tunnel.clone(), epochs.clone());
                        tokio::spawn(async move {
                            match this.dial_leg(id, &tunnel, &epochs, role).await {
                                Ok(()) => tracing::debug!(session = %id, leg = role.name(), "leg re-keyed (fresh handshake)"),
                                Err(e) => tracing::warn!(session = %id, leg = role.name(), error = %e, "re-key dial failed; the current leg stays"),
                            }
                        });
                    }
                    continue;
                }
            };
            let Some(c) = c else { break };
            match c {
                Control::LegDown { role, error } => {
                    tracing::info!(session = %id, leg = role.name(), error, "leg down; redialling");
                    rekey.restart(role, &tunnel);
                    let this = self.clone();
                    let tunnel = tunnel.clone();
                    let epochs = epochs.clone();
                    tokio::spawn(async move { this.redial(id, tunnel, epochs, role).await });
                }
                Control::Closed(reason) => {
                    tracing::info!(session = %id, ?reason, "session closed");
                    break;
                }
                Control::StreamOpened { .. } | Control::StreamLimit(_) => {}
            }
        }
    }

    async fn redial(
        &self,
        id: SessionId,
        tunnel: Arc<Tunnel>,
        epochs: Arc<[AtomicU32; 2]>,
        role: LegRole,
    ) {
        let mut delay = self.settings.backoff_min;
        while !tunnel.is_closed() {
            match self.dial_leg(id, &tunnel, &epochs, role).await {
                Ok(()) => {
                    tracing::info!(session = %id, leg = role.name(), "leg re-established");
                    return;
                }
                Err(ClientError::Refused {
                    status: HelloStatus::UnknownSession,
                    ..
                }) => {
                    tunnel.close(halfpipe_core::frame::CloseCode::Normal);
                    return;
                }
                Err(e) => tracing::warn!(session = %id, error = %e, "redial failed"),
            }
            let jitter = rand::thread_rng().gen_range(0..=delay.as_millis() as u64 / 2);
            tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
            delay = (delay * 2).min(self.settings.backoff_max);
        }
    }

    /// Opens a stream through the exit; the status is the exit's connect outcome.
    pub async fn open(
        self: &Arc<Self>,
        target: TargetAddr,
    ) -> Result<(Arc<Tunnel>, u32, ConnectStatus), ClientError> {
        // A session that ends under the request (the exit restarted and forgot it) is
        // replaced once: the stream never carried a byte, so opening it again is safe.
        let mut retried = false;
        let assigned = self.assign();
        loop {
            let tunnel = self.tunnel_for_stream(assigned.0).await?;
            match tunnel
                .open_stream(target.clone(), self.settings.connect_timeout)
                .await
            {
                Ok((id, st)) => return Ok((tunnel, id, st)),
                Err(OpenError::Timeout(_)) => return Ok((tunnel, 0, ConnectStatus::TimedOut)),
                Err(OpenError::Session(_)) if !retried && tunnel.is_closed() => {
                    tracing::info!(
                        "session ended while opening a stream; retrying on a new session"
                    );
                    retried = true;
                }
                Err(OpenError::Session(_)) => {
                    return Ok((tunnel, 0, ConnectStatus::GeneralFailure))
                }
            }
        }
    }
}

/// How often the re-key budgets are looked at.
const REKEY_CHECK: Duration = Duration::from_secs(5);

/// When each leg of a session is due for a fresh handshake (forward secrecy inside long
/// sessions): after `rekey_after` of leg age or `rekey_after_bytes` through it.
struct RekeyBudget {
    /// Per role (up, down): when the leg was (re)keyed and the byte counter then.
    since: [(Instant, u64); 2],
}

impl RekeyBudget {
    fn new(tunnel: &Tunnel) -> Self {
        let now = Instant::now();
        Self {
            since: [
                (now, Self::bytes(tunnel, LegRole::Up)),
                (now, Self::bytes(tunnel, LegRole::Down)),
            ],
        }
    }

    /// Bytes through the client's leg of `role` so far.
    fn bytes(tunnel: &Tunnel, role: LegRole) -> u64 {
        let st = &tunnel.stats;
        match role {
            LegRole::Up => st.bytes_sent.load(Ordering::Relaxed),
            LegRole::Down => st.bytes_received.load(Ordering::Relaxed),
        }
    }

    /// A leg was replaced for another reason: its budget starts again.
    fn restart(&mut self, role: LegRole, tunnel: &Tunnel) {
        self.since[role_index(role)] = (Instant::now(), Self::bytes(tunnel, role));
    }

    /// The roles whose budget ran out (their budgets restart).
    fn due(&mut self, s: &ExitSettings, tunnel: &Tunnel) -> Vec<LegRole> {
        let mut out = Vec::new();
        for role in [LegRole::Up, LegRole::Down] {
            let (at, bytes) = self.since[role_index(role)];
            let used = Self::bytes(tunnel, role).saturating_sub(bytes);
            if at.elapsed() >= s.rekey_after || used >= s.rekey_after_bytes {
                out.push(role);
                self.restart(role, tunnel);
            }
        }
        out
    }
}

/// A saved learned key, if the file holds one (a missing or unreadable file: none).
fn read_learned_key(path: &std::path::Path) -> Option<[u8; 32]> {
    let text = std::fs::read_to_string(path).ok()?;
    crate::keyfile::decode_public(text.trim(), "learned server key").ok()
}

/// Which local inbound a listener serves.
#[derive(Clone)]
pub enum Inbound {
    /// SOCKS5 with the given authentication.
    Socks5(crate::socks5::Socks5Auth),
    /// HTTP CONNECT, optionally with Basic credentials.
    HttpConnect(Option<(String, String)>),
    /// A fixed forward to a target (`-L` style).
    Forward(TargetAddr),
}

/// Most application connections handled at once per inbound.
const MAX_INBOUND_CONNECTIONS: usize = 4096;
/// Time an application has to finish its SOCKS/HTTP request.
const INBOUND_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves one inbound listener forever.
pub async fn serve_inbound(listener: TcpListener, inbound: Inbound, exit: Arc<Exit>) {
    let slots = Arc::new(Semaphore::new(MAX_INBOUND_CONNECTIONS));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = MAX_INBOUND_CONNECTIONS, "inbound connection limit hit");
            continue;
        };
        let inbound = inbound.clone();
        let exit = exit.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_inbound(socket, peer, inbound, exit).await {
                tracing::info!(%peer, error = %e, "inbound connection ended");
            }
            drop(permit);
        });
    }
}

/// What ended an application connection early.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// Socket error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Bad SOCKS5 request.
    #[error("SOCKS5: {0}")]
    Socks(#[from] crate::socks5::Socks5Error),
    /// Bad HTTP CONNECT request.
    #[error("HTTP CONNECT: {0}")]
    Http(#[from] crate::http_connect::HttpConnectError),
    /// The application took too long with its request.
    #[error("request not completed within {0:?}")]
    Timeout(Duration),
    /// The exit could not be reached.
    #[error(transparent)]
    Exit(#[from] ClientError),
    /// The exit reported a failed connect.
    #[error("exit could not connect to {target}: {}", .status.describe())]
    Connect {
        /// Where.
        target: TargetAddr,
        /// Why.
        status: ConnectStatus,
    },
}

async fn handle_inbound(
    mut socket: TcpStream,
    _peer: SocketAddr,
    inbound: Inbound,
    exit: Arc<Exit>,
) -> Result<(), InboundError> {
    tune_socket(&socket)?;
    let (target, initial) = match &inbound {
        Inbound::Socks5(auth) => {
            let t = tokio::time::timeout(
                INBOUND_HANDSHAKE_TIMEOUT,
                crate::socks5::accept(&mut socket, auth),
            )
            .await
            .map_err(|_| InboundError::Timeout(INBOUND_HANDSHAKE_TIMEOUT))??;
            (t, bytes::Bytes::new())
        }
        Inbound::HttpConnect(auth) => {
            let (t, rest) = tokio::time::timeout(
                INBOUND_HANDSHAKE_TIMEOUT,
                crate::http_connect::accept(&mut socket, auth.as_ref()),
            )
            .await
            .map_err(|_| InboundError::Timeout(INBOUND_HANDSHAKE_TIMEOUT))??;
            (t, bytes::Bytes::from(rest))
        }
        Inbound::Forward(t) => (t.clone(), bytes::Bytes::new()),
    };
    let opened = exit.open(target.clone()).await;
    let status = match &opened {
        Ok((_, _, st)) => *st,
        Err(ClientError::Transport { .. }) => ConnectStatus::NetworkUnreachable,
        Err(_) => ConnectStatus::GeneralFailure,
    };
    match &inbound {
        Inbound::Socks5(_) => crate::socks5::reply(&mut socket, status, None).await?,
        Inbound::HttpConnect(_) => crate::http_connect::reply(&mut socket, status).await?,
        Inbound::Forward(_) => {}
    }
    let (tunnel, id, status) = opened?;
    if status != ConnectStatus::Succeeded {
        return Err(InboundError::Connect { target, status });
    }
    tunnel.pump(id, socket, initial, None).await;
    Ok(())
}
