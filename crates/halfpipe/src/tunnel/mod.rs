//! The async driver of one session: it owns the sans-io [`Session`] behind a mutex and runs
//! the tasks around it — the send-leg writer, the receive-leg reader, the timer, and a pair
//! of pumps per stream between a TCP socket and the session.
//!
//! The send leg is written by whoever has bytes for it and finds it free: a stream pump
//! that just handed data to the session writes the records itself (as a one-task relay
//! would, saving a task hand-off per batch), up to [`INLINE_BATCHES`]; the writer task
//! does the rest (acknowledgements, credit, keepalives, anything queued while the leg was
//! busy). The leg's pipe and record layer sit behind one async mutex, taken for a whole
//! collect-seal-write, so records leave in order whoever writes them.
//!
//! The receive side mirrors it: a stream pump waiting for data lends its socket writer, and
//! the receive leg's reader writes the data it opened for that stream itself, waking the
//! pump only for what the socket cannot take at once or the stream's end. An interactive
//! exchange then costs no task hand-off on either side. The streams' half of the driver
//! (pumps, read-ahead budget, throttle, that direct delivery) is the [`stream`] module.
//!
//! Both the client and the exit use this driver; they differ only in who dials legs and who
//! opens streams. What a side must decide (a new stream to connect, a leg gone, the session
//! over) arrives on its bounded control channel.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use halfpipe_core::frame::{CloseCode, ResetCode, StreamId, StreamMap};
use halfpipe_core::handshake::{LegKeys, LegRole};
use halfpipe_core::record::{RecordError, RecordOpener, RecordSealer};
use halfpipe_core::session::{CloseReason, Event, Session, SessionConfig, SessionError, Side};
use halfpipe_core::{ConnectStatus, TargetAddr};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::locks::lock;
use crate::transport::BoxedLeg;

mod stream;

pub use stream::{Pace, Throttle};
use stream::{ReadAhead, StreamSignals};

/// Bytes gathered for one write to the send leg.
const WRITE_BATCH: usize = 64 * 1024;
/// Batches a stream pump writes to a free send leg before leaving the rest to the writer
/// task (so that a pump does not starve its own socket while writing others' data).
const INLINE_BATCHES: usize = 2;
/// The shortest wait of a tunnel's timer between two firings (the granularity the session
/// timers had on `tokio::time`).
const TIMER_MIN_INTERVAL: Duration = Duration::from_millis(1);

/// What the side owning the tunnel must act on.
#[derive(Debug)]
pub enum Control {
    /// (Exit) connect this stream, then call [`Tunnel::open_result`].
    StreamOpened {
        /// The stream.
        stream: StreamId,
        /// Where to.
        target: TargetAddr,
    },
    /// (Exit) a stream was refused at the stream limit.
    StreamLimit(StreamId),
    /// A leg ended (error, EOF, or silence); `error` says why.
    LegDown {
        /// Which leg.
        role: LegRole,
        /// What happened.
        error: String,
    },
    /// The session ended.
    Closed(CloseReason),
}

struct Inner {
    session: Session,
    signals: StreamMap<Arc<StreamSignals>>,
    /// The deadline the timer task sleeps towards (`None`: no deadline).
    timer_at: Option<Instant>,
    /// Generation of the send leg whose writer may transmit. Checked under this lock by
    /// every writer, so a replaced writer that has not yet seen its abort cannot take
    /// frames (such as the new leg's RESUME) meant for its successor.
    send_generation: u64,
    /// Generation of the receive leg whose reader may deliver records (same reason: a
    /// replaced reader must not feed the old leg's frames to the new leg's RESUME check).
    recv_generation: u64,
}

impl Inner {
    /// Whether the session's next deadline comes before the one the timer task sleeps
    /// towards (a delayed ACK, a new leg's silence timer), so that the timer task must be
    /// woken. Sending never moves a deadline earlier, so the writer need not ask.
    fn timer_is_late(&self) -> bool {
        match (self.session.poll_timeout(), self.timer_at) {
            (Some(t), Some(at)) => t < at,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

struct LegSlot {
    generation: u64,
    task: Option<JoinHandle<()>>,
    wake: Arc<Notify>,
    /// The send leg's pipe (send slot only).
    send: Option<SharedSendLeg>,
}

/// A send leg's pipe and record layer, with the buffers of one batch.
struct SendLeg {
    io: BoxedLeg,
    sealer: RecordSealer,
    generation: u64,
    out: Vec<u8>,
    starts: Vec<usize>,
}

/// A send leg as the writer task and the stream pumps share it.
type SharedSendLeg = Arc<tokio::sync::Mutex<SendLeg>>;

/// How a turn at writing the send leg ended.
#[derive(Debug, PartialEq, Eq)]
enum Transmitted {
    /// Nothing more to send for now.
    Idle,
    /// The batch budget ran out with more to send.
    Budget,
    /// The session is closed and everything was sent.
    Closed,
    /// The leg failed or was replaced; its writer stops.
    Gone,
}

/// One session and its tasks.
pub struct Tunnel {
    inner: Mutex<Inner>,
    control: mpsc::Sender<Control>,
    send_leg: Mutex<LegSlot>,
    recv_leg: Mutex<LegSlot>,
    timer_wake: Notify,
    /// Bytes the pumps read that the session has not taken yet.
    read_ahead: ReadAhead,
    /// Counters for status and tests.
    pub stats: Stats,
}

/// Byte counters of a tunnel.
#[derive(Default, Debug)]
pub struct Stats {
    /// Record bytes written to send legs.
    pub bytes_sent: std::sync::atomic::AtomicU64,
    /// Record bytes read from receive legs.
    pub bytes_received: std::sync::atomic::AtomicU64,
    /// Deliveries of stream data that the receive leg's reader wrote to a waiting stream's
    /// socket itself, all of it (see `stream::Lent`).
    pub delivered_by_reader: std::sync::atomic::AtomicU64,
    /// Deliveries the reader left partly unwritten, for the stream's pump, because the
    /// application's socket was full.
    pub left_unwritten: std::sync::atomic::AtomicU64,
}

/// Why a freshly handshaken leg could not join the session. The session is closed with a
/// protocol error, since the peer sent keys or an ACK that cannot be right.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The handshake's keys were rejected by the record layer.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The transport could not hand its TLS keys to the record layer.
    #[error("handing the leg's TLS keys to its record layer: {0}")]
    TlsKeys(#[from] std::io::Error),
    /// The peer's ACK from the handshake does not fit the session.
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The session refused (closed, stream limit).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The exit did not answer within the connect timeout.
    #[error("the exit did not report the connect outcome within {0:?}")]
    Timeout(Duration),
}

impl Tunnel {
    /// A tunnel with no legs yet, its timer task running, and its control channel.
    pub fn new(side: Side, config: SessionConfig) -> (Arc<Self>, mpsc::Receiver<Control>) {
        let (tx, rx) = mpsc::channel(config.max_streams + 64);
        let slot = || {
            Mutex::new(LegSlot {
                generation: 0,
                task: None,
                wake: Arc::new(Notify::new()),
                send: None,
            })
        };
        let t = Arc::new(Self {
            inner: Mutex::new(Inner {
                session: Session::new(side, config, Instant::now()),
                signals: StreamMap::default(),
                timer_at: None,
                send_generation: 0,
                recv_generation: 0,
            }),
            control: tx,
            send_leg: slot(),
            recv_leg: slot(),
            timer_wake: Notify::new(),
            read_ahead: ReadAhead::default(),
            stats: Stats::default(),
        });
        tokio::spawn(Arc::clone(&t).run_timer());
        (t, rx)
    }

    /// The next sequence number expected from the peer (for the handshake hello).
    pub fn recv_next(&self) -> u64 {
        lock(&self.inner).session.recv_next()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        lock(&self.inner).session.is_closed()
    }

    /// Whether the send and the receive leg are attached now.
    pub fn legs_attached(&self) -> (bool, bool) {
        let g = lock(&self.inner);
        (g.session.send_leg_attached(), g.session.recv_leg_attached())
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        lock(&self.inner).session.stream_count()
    }

    /// Changes the session's receive window (see `Session::set_session_window`); new
    /// credit leaves on the next write.
    pub fn set_session_window(&self, window: u64) {
        self.with_session(|s| s.set_session_window(window));
    }

    /// The session's receive window.
    pub fn session_window(&self) -> u64 {
        lock(&self.inner).session.session_window()
    }

    /// Bytes buffered for applications plus bytes held for retransmission.
    pub fn memory(&self) -> u64 {
        let g = lock(&self.inner);
        g.session.buffered() + g.session.unacked().1
    }

    /// Runs `f` on the session, then dispatches its events and wakes the writer if needed.
    fn with_session<R>(&self, f: impl FnOnce(&mut Session) -> R) -> R {
        self.with_inner(|i| f(&mut i.session))
    }

    /// Runs `f` on the session and the stream signals under one lock, then dispatches the
    /// session's events outside the lock and wakes the writer if it has work.
    fn with_inner<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let (r, wants_tx) = self.locked(f);
        if wants_tx {
            self.wake_writer();
        }
        r
    }

    /// [`Tunnel::with_inner`] without waking the writer: also says whether the send leg
    /// has work, for a caller that writes it itself ([`Tunnel::transmit_inline`]).
    fn locked<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> (R, bool) {
        let (r, events, wants_tx, timer_early) = {
            let mut g = lock(&self.inner);
            let r = f(&mut g);
            let timer_early = g.timer_is_late();
            // Usually none or one (a stream's data): kept on the stack.
            let mut events: SmallVec<[_; 4]> = SmallVec::new();
            while let Some(e) = g.session.poll_event() {
                let sig = match &e {
                    Event::Readable(id)
                    | Event::Writable(id)
                    | Event::Connected { stream: id, .. }
                    | Event::Reset { stream: id, .. } => g.signals.get(id).cloned(),
                    _ => None,
                };
                events.push((e, sig));
            }
            (r, events, g.session.wants_transmit(), timer_early)
        };
        if timer_early {
            self.timer_wake.notify_one();
        }
        for (e, sig) in events {
            self.dispatch(e, sig);
        }
        (r, wants_tx)
    }

    fn dispatch(&self, e: Event, sig: Option<Arc<StreamSignals>>) {
        match e {
            Event::Readable(stream) => {
                if let Some(s) = sig {
                    if !self.deliver(stream, &s) {
                        s.readable.notify_one();
                    }
                }
            }
            Event::Writable(_) => sig.iter().for_each(|s| s.writable.notify_one()),
            Event::Connected { status, .. } => {
                if let Some(s) = sig {
                    *lock(&s.status) = Some(status);
                    s.connected.notify_one();
                }
            }
            Event::Reset { stream, code } => {
                tracing::debug!(stream, ?code, "stream reset by the peer");
                if let Some(s) = sig {
                    s.mark_reset();
                    s.connected.notify_one();
                }
            }
            Event::StreamOpened { stream, target } => {
                self.send_control(Control::StreamOpened { stream, target })
            }
            Event::StreamLimit { stream } => self.send_control(Control::StreamLimit(stream)),
            Event::RecvLegSilent => {
                self.drop_leg(LegEnd::Recv);
                self.send_control(Control::LegDown {
                    role: self.role_of(LegEnd::Recv),
                    error: "no record received within the leg-silence timeout".into(),
                });
            }
            Event::Closed(reason) => {
                self.timer_wake.notify_one();
                self.send_control(Control::Closed(reason));
            }
        }
    }

    fn send_control(&self, c: Control) {
        if let Err(mpsc::error::TrySendError::Full(Control::StreamOpened { stream, .. })) =
            self.control.try_send(c)
        {
            // The channel holds max_streams + 64 entries; being full means the owner has
            // stalled. Refusing the stream keeps memory bounded.
            tracing::warn!(stream, "control queue full: refusing stream");
            self.with_session(|s| s.reset(stream, ResetCode::LimitReached).ok());
        }
    }

    /// Which leg role an end of this side is: the client sends up, the exit sends down.
    fn role_of(&self, end: LegEnd) -> LegRole {
        match (lock(&self.inner).session.side(), end) {
            (Side::Client, LegEnd::Send) | (Side::Server, LegEnd::Recv) => LegRole::Up,
            _ => LegRole::Down,
        }
    }

    fn wake_writer(&self) {
        lock(&self.send_leg).wake.notify_one();
    }

    // ---- legs ----------------------------------------------------------------------

    /// Attaches a leg of `role` after its handshake, as the send or the receive end of this
    /// side (the client sends on the uplink, the exit on the downlink). `peer_recv_next` is
    /// the peer's ACK from the handshake. On failure the session is closed.
    pub fn attach_leg(
        self: &Arc<Self>,
        role: LegRole,
        mut io: BoxedLeg,
        keys: &LegKeys,
        peer_recv_next: u64,
    ) -> Result<(), AttachError> {
        let client = lock(&self.inner).session.side() == Side::Client;
        let result = (|| {
            // A channel-bound leg whose transport can hand its TLS keys over reads and
            // writes the TLS records itself, in its own buffers.
            let handed = match keys.is_bound() {
                true => io.hand_over_tls_keys().transpose()?,
                false => None,
            };
            if role == self.role_of(LegEnd::Send) {
                let sealer = match handed {
                    Some(h) => h.sealer,
                    None if client => keys.client_sealer()?,
                    None => keys.server_sealer()?,
                };
                self.attach_send_leg(io, sealer, peer_recv_next)?;
            } else {
                let (opener, unread) = match handed {
                    Some(h) => (h.opener, h.unread),
                    None if client => (keys.client_opener()?, BytesMut::new()),
                    None => (keys.server_opener()?, BytesMut::new()),
                };
                self.attach_recv_leg(io, opener, unread);
            }
            Ok(())
        })();
        if result.is_err() {
            self.close(CloseCode::ProtocolError);
        }
        result
    }

    /// Attaches a new send leg (replacing any previous one) and starts its writer task.
    /// `peer_recv_next` is the peer's ACK learnt in the handshake.
    fn attach_send_leg(
        self: &Arc<Self>,
        io: BoxedLeg,
        sealer: RecordSealer,
        peer_recv_next: u64,
    ) -> Result<(), SessionError> {
        let (gen, wake) = self.claim_slot(LegEnd::Send);
        self.start_send_leg(gen, wake, io, sealer, peer_recv_next)
    }

    /// The second half of [`Tunnel::attach_send_leg`], once the slot is claimed as `gen`.
    fn start_send_leg(
        self: &Arc<Self>,
        gen: u64,
        wake: Arc<Notify>,
        io: BoxedLeg,
        sealer: RecordSealer,
        peer_recv_next: u64,
    ) -> Result<(), SessionError> {
        // Generation and attach under one lock, and only forward: of two legs attached at
        // once (a re-key and a redial of the same role), the one that claimed the slot
        // last wins, whichever reaches this lock first.
        let current = self.with_inner(|g| {
            if gen < g.send_generation {
                return Ok(false);
            }
            g.send_generation = gen;
            g.session.detach_send_leg(Instant::now());
            g.session
                .attach_send_leg(Instant::now(), Some(peer_recv_next))
                .map(|()| true)
        })?;
        if !current {
            return Ok(()); // superseded: this leg is dropped unused
        }
        let leg = Arc::new(tokio::sync::Mutex::new(SendLeg {
            io,
            sealer,
            generation: gen,
            out: Vec::with_capacity(WRITE_BATCH + 70 * 1024),
            starts: Vec::new(),
        }));
        {
            let mut slot = lock(&self.send_leg);
            if slot.generation == gen {
                slot.send = Some(leg.clone());
            }
        }
        let task = tokio::spawn(Arc::clone(self).run_writer(leg, wake));
        self.install_task(LegEnd::Send, gen, task);
        Ok(())
    }

    /// Attaches a new receive leg (replacing any previous one) and starts its reader task;
    /// `unread` is what its transport already read past the handshake.
    fn attach_recv_leg(self: &Arc<Self>, io: BoxedLeg, opener: RecordOpener, unread: BytesMut) {
        let (gen, _) = self.claim_slot(LegEnd::Recv);
        self.start_recv_leg(gen, io, opener, unread);
    }

    /// The second half of [`Tunnel::attach_recv_leg`], once the slot is claimed as `gen`:
    /// as for send legs, the generation check and the attach share one lock, so a leg
    /// superseded meanwhile never touches the session (attaching it would make the live
    /// leg's next record look like a new leg's first, which must carry RESUME).
    fn start_recv_leg(
        self: &Arc<Self>,
        gen: u64,
        io: BoxedLeg,
        opener: RecordOpener,
        unread: BytesMut,
    ) {
        let current = self.with_inner(|g| {
            if gen < g.recv_generation {
                return false;
            }
            g.recv_generation = gen;
            g.session.detach_recv_leg(Instant::now());
            g.session.attach_recv_leg(Instant::now());
            true
        });
        if !current {
            return; // superseded: this leg is dropped unused
        }
        let task = tokio::spawn(Arc::clone(self).run_reader(io, opener, gen, unread));
        self.install_task(LegEnd::Recv, gen, task);
        self.timer_wake.notify_one();
    }

    fn slot(&self, end: LegEnd) -> &Mutex<LegSlot> {
        match end {
            LegEnd::Send => &self.send_leg,
            LegEnd::Recv => &self.recv_leg,
        }
    }

    /// Starts a new generation of a leg slot and stops the old task. A failing old task
    /// then sees a newer generation and leaves the session alone. The slot lock is never
    /// held while the session runs, because a session call may wake the writer.
    fn claim_slot(&self, end: LegEnd) -> (u64, Arc<Notify>) {
        let (old, gen, wake) = {
            let mut slot = lock(self.slot(end));
            slot.generation += 1;
            slot.wake = Arc::new(Notify::new());
            slot.send = None;
            (slot.task.take(), slot.generation, slot.wake.clone())
        };
        if let Some(old) = old {
            old.abort();
        }
        (gen, wake)
    }

    /// Records the task of generation `gen`, unless a newer leg claimed the slot meanwhile.
    fn install_task(&self, end: LegEnd, gen: u64, task: JoinHandle<()>) {
        let mut slot = lock(self.slot(end));
        if slot.generation == gen {
            slot.task = Some(task);
        } else {
            task.abort();
        }
    }

    /// Marks one end of this side detached in the session.
    fn detach(&self, end: LegEnd) {
        self.with_session(|s| match end {
            LegEnd::Send => s.detach_send_leg(Instant::now()),
            LegEnd::Recv => s.detach_recv_leg(Instant::now()),
        });
    }

    /// Stops the leg at `end` of this side.
    fn drop_leg(&self, end: LegEnd) {
        let task = {
            let mut slot = lock(self.slot(end));
            slot.send = None;
            slot.task.take()
        };
        if let Some(t) = task {
            t.abort();
        }
        self.detach(end);
    }

    /// Stops the leg of `role` and reports it down, as a failure would (used by the
    /// admin path and by tests that kill legs).
    pub fn kill_leg(&self, role: LegRole) {
        let end = if self.role_of(LegEnd::Send) == role {
            LegEnd::Send
        } else {
            LegEnd::Recv
        };
        self.drop_leg(end);
        self.send_control(Control::LegDown {
            role,
            error: "leg killed".into(),
        });
    }

    fn leg_failed(&self, end: LegEnd, generation: u64, error: String) {
        {
            let mut g = lock(self.slot(end));
            if g.generation != generation {
                return; // a newer leg already replaced this one
            }
            g.task = None;
            g.send = None;
        }
        self.detach(end);
        self.timer_wake.notify_one();
        self.send_control(Control::LegDown {
            role: self.role_of(end),
            error,
        });
    }

    /// The send leg's writer task: writes whatever the pumps left, whenever woken.
    async fn run_writer(self: Arc<Self>, leg: SharedSendLeg, wake: Arc<Notify>) {
        loop {
            let mut g = leg.lock().await;
            match self.transmit(&mut g, usize::MAX).await {
                Transmitted::Idle | Transmitted::Budget => {}
                Transmitted::Closed => {
                    let _ = g.io.shutdown().await;
                    return;
                }
                Transmitted::Gone => return,
            }
            drop(g);
            wake.notified().await;
        }
    }

    /// Collects, seals and writes batches to `leg` until nothing is left or `batches`
    /// batches were written.
    async fn transmit(&self, leg: &mut SendLeg, batches: usize) -> Transmitted {
        let max_payload = leg.sealer.max_payload();
        for _ in 0..batches {
            let SendLeg {
                io,
                sealer,
                generation,
                out,
                starts,
            } = leg;
            out.clear();
            starts.clear();
            let (closed, drained) = {
                let mut g = lock(&self.inner);
                if g.send_generation != *generation {
                    return Transmitted::Gone; // replaced by a newer leg
                }
                let now = Instant::now();
                let mut drained = false;
                while out.len() < WRITE_BATCH {
                    let start = sealer.begin(out);
                    if g.session.poll_transmit_up_to(now, out, max_payload) == 0 {
                        out.truncate(start);
                        drained = true;
                        break;
                    }
                    sealer.reserve_tag(out);
                    starts.push(start);
                }
                (g.session.is_closed(), drained)
            };
            if out.is_empty() {
                return match closed {
                    true => Transmitted::Closed,
                    false => Transmitted::Idle,
                };
            }
            if let Err(e) = seal_all(sealer, out, starts) {
                self.leg_failed(LegEnd::Send, *generation, e.to_string());
                return Transmitted::Gone;
            }
            // Flush too: a TLS pipe may hold the tail of a batch until it is flushed.
            let written = match io.write_all(out).await {
                Ok(()) => io.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                self.leg_failed(LegEnd::Send, *generation, e.to_string());
                return Transmitted::Gone;
            }
            self.stats
                .bytes_sent
                .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
            // The batch took everything there was: what was queued since woke the writer
            // (whoever queues while this leg is held does), so no second look is needed.
            if drained && !closed {
                return Transmitted::Idle;
            }
        }
        Transmitted::Budget
    }

    /// A pump's turn at the send leg after it queued data: write it now if the leg is
    /// free, else (or for what is left after [`INLINE_BATCHES`]) leave it to the writer.
    async fn transmit_inline(&self) {
        let leg = lock(&self.send_leg).send.clone();
        let Some(leg) = leg else {
            return; // no send leg: the next one's writer sends everything
        };
        let left = match leg.try_lock() {
            Ok(mut g) => self.transmit(&mut g, INLINE_BATCHES).await,
            Err(_) => Transmitted::Budget, // busy: its holder or the writer sends it
        };
        if matches!(left, Transmitted::Budget | Transmitted::Closed) {
            self.wake_writer();
        }
    }

    async fn run_reader(
        self: Arc<Self>,
        io: BoxedLeg,
        mut opener: RecordOpener,
        generation: u64,
        unread: BytesMut,
    ) {
        let mut rd = io;
        // What the transport read past the handshake is opened before anything new.
        let mut buf = unread;
        let mut records = Vec::new();
        // A receive leg carries data one way only, so its ACKs ride on nothing: keep the
        // kernel sending them late and few (see `DelayedAcks`).
        let mut delayed_acks = crate::transport::tcp::DelayedAcks::default();
        // When the bytes being opened arrived: one clock read per read serves both.
        let mut read_at = Instant::now();
        // Which allocation each record was opened in, for the session's count of the read
        // buffers its queued bulk holds: a new id whenever the end of `buf`'s allocation
        // moves (the opener's or our `reserve` moved it to a new one; splitting records off
        // the front keeps the end where it is).
        let (mut buffer_id, mut allocation_end) = (0u64, 0usize);
        loop {
            loop {
                match opener.open_next(&mut buf) {
                    Ok(Some(r)) => {
                        let end = buf.as_ptr() as usize + buf.capacity();
                        if end != allocation_end {
                            (buffer_id, allocation_end) = (buffer_id + 1, end);
                        }
                        records.push((r, buffer_id));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // A record that fails authentication on an authenticated leg means
                        // tampering in transit: drop the leg, the session resumes on a new one.
                        self.leg_failed(LegEnd::Recv, generation, e.to_string());
                        return;
                    }
                }
            }
            if !records.is_empty() {
                let result = self.with_inner(|g| {
                    if g.recv_generation != generation {
                        return Ok(false); // replaced by a newer leg
                    }
                    for (r, buffer) in records.drain(..) {
                        g.session.handle_record_in(read_at, r, buffer)?;
                    }
                    Ok::<bool, SessionError>(true)
                });
                match result {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "peer broke the protocol; session closed");
                        return;
                    }
                }
            }
            if buf.capacity() - buf.len() < 64 * 1024 {
                buf.reserve(128 * 1024);
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    self.leg_failed(LegEnd::Recv, generation, "leg closed by peer".into());
                    return;
                }
                Ok(n) => {
                    read_at = Instant::now();
                    delayed_acks.after_read(read_at, || rd.tcp());
                    self.stats
                        .bytes_received
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    self.leg_failed(LegEnd::Recv, generation, e.to_string());
                    return;
                }
            }
        }
    }

    async fn run_timer(self: Arc<Self>) {
        // A deadline that handling the timeout does not move must not make this loop spin:
        // it waits at least TIMER_MIN_INTERVAL between firings. (The session moves every
        // deadline it reports, an overdue keepalive included; this is the guard against a
        // session that would not.)
        let mut not_before = Instant::now();
        loop {
            let deadline = {
                let mut g = lock(&self.inner);
                if g.session.is_closed() {
                    break;
                }
                g.timer_at = g.session.poll_timeout();
                g.timer_at
            };
            match deadline {
                Some(d) => {
                    tokio::select! {
                        _ = crate::timer::sleep_until(d.max(not_before)) => {}
                        _ = self.timer_wake.notified() => continue,
                    }
                }
                None => self.timer_wake.notified().await,
            }
            let now = Instant::now();
            not_before = now + TIMER_MIN_INTERVAL;
            let keepalive = self.with_session(|s| {
                s.handle_timeout(now);
                s.keepalive_due(now)
            });
            // A due ACK wakes the writer through `with_session` (wants_transmit).
            if keepalive {
                self.wake_writer();
            }
        }
        // Let the writer flush CLOSE, then stop the reader.
        self.wake_writer();
        if let Some(t) = lock(&self.recv_leg).task.take() {
            t.abort();
        }
    }

    // ---- streams -------------------------------------------------------------------

    /// (Client) opens a stream and waits for the exit's connect outcome.
    pub async fn open_stream(
        &self,
        target: TargetAddr,
        timeout: Duration,
    ) -> Result<(StreamId, ConnectStatus), OpenError> {
        let sig = Arc::new(StreamSignals::default());
        let id = {
            let sig = sig.clone();
            self.with_inner(move |i| {
                let id = i.session.open_stream(target)?;
                i.signals.insert(id, sig);
                Ok::<_, SessionError>(id)
            })?
        };
        let wait = async {
            loop {
                if let Some(st) = *lock(&sig.status) {
                    return Ok(st);
                }
                if !lock(&self.inner).signals.contains_key(&id) || self.is_closed() {
                    return Err(OpenError::Session(SessionError::StreamClosed(id)));
                }
                sig.connected.notified().await;
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(st)) => {
                if st != ConnectStatus::Succeeded {
                    lock(&self.inner).signals.remove(&id);
                }
                Ok((id, st))
            }
            Ok(Err(e)) => {
                lock(&self.inner).signals.remove(&id);
                Err(e)
            }
            Err(_) => {
                self.with_session(|s| s.reset(id, ResetCode::Cancelled).ok());
                lock(&self.inner).signals.remove(&id);
                Err(OpenError::Timeout(timeout))
            }
        }
    }

    /// (Exit) reports the connect outcome of a stream; for success, registers the stream's
    /// signals so [`Tunnel::pump`] can run.
    pub fn open_result(&self, stream: StreamId, status: ConnectStatus) -> Result<(), SessionError> {
        self.with_inner(|i| {
            i.session.open_result(stream, status)?;
            if status == ConnectStatus::Succeeded {
                i.signals.insert(stream, Arc::new(StreamSignals::default()));
            }
            Ok(())
        })
    }

    /// Closes the session.
    pub fn close(&self, code: CloseCode) {
        self.with_session(|s| s.close(code));
    }
}

#[derive(Clone, Copy, Debug)]
enum LegEnd {
    Send,
    Recv,
}

/// Seals every record in `out`, in order (nonces are counters); `starts` are their
/// offsets, each laid out as header, plaintext and tag room.
fn seal_all(
    sealer: &mut RecordSealer,
    out: &mut [u8],
    starts: &[usize],
) -> Result<(), halfpipe_core::record::RecordError> {
    let total = out.len();
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(total);
        sealer.seal_reserved(&mut out[start..end])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use halfpipe_core::handshake::{
        generate_keypair, ClientHello, HandshakeKeys, HelloStatus, Initiator, Responder,
        ServerHello, SessionId,
    };
    use halfpipe_core::record::CipherSuite;

    /// Keys of one real leg handshake, both sides' view.
    pub(super) fn leg_keys() -> (LegKeys, LegKeys) {
        let keys = || {
            let (private_key, public) = generate_keypair().unwrap();
            let k = HandshakeKeys {
                suite: CipherSuite::Aes256Gcm,
                private_key,
                psk: None,
            };
            (k, public)
        };
        let ((ck, _), (sk, spub)) = (keys(), keys());
        let hello = ClientHello {
            role: LegRole::Up,
            session_id: SessionId::random(),
            epoch: 1,
            timestamp_ms: 0,
            recv_next: 0,
            channel_binding: None,
        };
        let (init, m1) = Initiator::start(&ck, &spub, &hello).unwrap();
        let (resp, _) = Responder::accept(&sk, CipherSuite::Aes256Gcm, &m1[3..]).unwrap();
        let reply = ServerHello {
            status: HelloStatus::Accepted,
            recv_next: 0,
            server_time_ms: 0,
            next_key: None,
            bound_records: false,
        };
        let (m2, server_keys) = resp.reply(&reply).unwrap();
        let (_, client_keys) = init.finish(&m2[2..]).unwrap();
        (client_keys, server_keys)
    }

    #[test]
    fn a_keepalive_that_cannot_leave_does_not_stall_the_runtime() {
        // A peer that never reads blocks the writer, so an overdue keepalive stays overdue.
        // The timer task must still yield: on a one-thread runtime, the other task below
        // runs only if it does.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let config = SessionConfig {
                    keepalive: Duration::from_millis(2),
                    ..SessionConfig::default()
                };
                let (tunnel, _control) = Tunnel::new(Side::Client, config);
                let (client_keys, _) = leg_keys();
                let (io, _never_read) = tokio::io::duplex(16);
                tunnel
                    .attach_leg(LegRole::Up, Box::new(io), &client_keys, 0)
                    .unwrap();
                for _ in 0..25 {
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
                assert!(!tunnel.is_closed());
            });
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(20)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("the runtime stalled: the timer task never yielded")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the runtime's thread panicked (see its message above)")
            }
        }
    }

    #[tokio::test]
    async fn keepalives_resume_on_time_once_a_blocked_writer_can_send_again() {
        let config = SessionConfig {
            keepalive: Duration::from_millis(20),
            ..SessionConfig::default()
        };
        let (tunnel, _control) = Tunnel::new(Side::Client, config);
        let (client_keys, _) = leg_keys();
        // A peer that reads nothing for a while: the writer blocks on its first record,
        // and the keepalive falls due behind it.
        let (io, mut peer) = tokio::io::duplex(16);
        tunnel
            .attach_leg(LegRole::Up, Box::new(io), &client_keys, 0)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Now the peer reads. The writer's backlog leaves, and then keepalives must go on
        // leaving every 20 ms: the keepalive asked for while the writer was blocked must
        // not have put the next one off for good.
        let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = received.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = peer.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let count = || received.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after_backlog = count();
        // Bounded wait: at least one more record within 5 s (a keepalive is due every
        // 20 ms; a timer that lost the keepalive would sleep until the idle timeout).
        let more = tokio::time::timeout(Duration::from_secs(5), async {
            while count() == after_backlog {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(more.is_ok(), "no keepalive left after the writer was freed");
        assert!(!tunnel.is_closed());
    }

    #[tokio::test]
    async fn a_handshake_ack_beyond_what_was_sent_closes_the_session() {
        let (tunnel, _control) = Tunnel::new(Side::Client, SessionConfig::default());
        let (client_keys, _) = leg_keys();
        let (io, _peer) = tokio::io::duplex(1024);
        let err = tunnel
            .attach_leg(LegRole::Up, Box::new(io), &client_keys, 5)
            .unwrap_err();
        assert!(
            matches!(
                err,
                AttachError::Session(SessionError::AckBeyondSent { acked: 5, sent: 0 })
            ),
            "{err}"
        );
        assert!(tunnel.is_closed());
    }

    #[tokio::test]
    async fn each_side_attaches_its_own_end_of_a_leg() {
        let (client_keys, server_keys) = leg_keys();
        let (client, _c) = Tunnel::new(Side::Client, SessionConfig::default());
        let (server, _s) = Tunnel::new(Side::Server, SessionConfig::default());
        let (a, b) = tokio::io::duplex(64 * 1024);
        client
            .attach_leg(LegRole::Up, Box::new(a), &client_keys, 0)
            .unwrap();
        server
            .attach_leg(LegRole::Up, Box::new(b), &server_keys, 0)
            .unwrap();
        let (c, s) = (lock(&client.inner), lock(&server.inner));
        assert!(c.session.send_leg_attached() && !c.session.recv_leg_attached());
        assert!(s.session.recv_leg_attached() && !s.session.send_leg_attached());
    }

    #[tokio::test]
    async fn of_two_send_legs_attached_at_once_the_last_claimed_wins_in_any_order() {
        use tokio::io::AsyncReadExt;
        let (tunnel, _control) = Tunnel::new(Side::Client, SessionConfig::default());
        let (keys_a, _) = leg_keys();
        let (keys_b, _) = leg_keys();
        let (io_a, mut peer_a) = tokio::io::duplex(64 * 1024);
        let (io_b, mut peer_b) = tokio::io::duplex(64 * 1024);
        // A re-key claims the slot, then a redial claims it again, and the redial's
        // handshake finishes first.
        let (gen_a, wake_a) = tunnel.claim_slot(LegEnd::Send);
        let (gen_b, wake_b) = tunnel.claim_slot(LegEnd::Send);
        for (generation, wake, io, keys) in
            [(gen_b, wake_b, io_b, keys_b), (gen_a, wake_a, io_a, keys_a)]
        {
            let sealer = keys.client_sealer().unwrap();
            tunnel
                .start_send_leg(generation, wake, Box::new(io), sealer, 0)
                .unwrap();
        }
        assert_eq!(lock(&tunnel.inner).send_generation, gen_b);
        // The live leg carries the RESUME; the superseded one is closed unused.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), peer_b.read(&mut buf))
            .await
            .expect("the winning leg got no writer")
            .unwrap();
        assert!(n > 0);
        let n = tokio::time::timeout(Duration::from_secs(5), peer_a.read(&mut buf))
            .await
            .expect("the superseded leg was neither used nor closed")
            .unwrap();
        assert_eq!(n, 0, "the superseded leg carried records");
    }

    #[tokio::test]
    async fn of_two_receive_legs_attached_at_once_a_superseded_one_leaves_the_live_one_alone() {
        let (client, _client_control) = Tunnel::new(Side::Client, SessionConfig::default());
        let (server, mut control) = Tunnel::new(Side::Server, SessionConfig::default());
        let (client_keys, server_keys) = leg_keys();
        let (_, stale_keys) = leg_keys();
        let (io_a, _peer_a) = tokio::io::duplex(64 * 1024);
        let (io_b, peer_b) = tokio::io::duplex(64 * 1024);
        // A re-key and a redial of the uplink both claim the exit's receive slot; the
        // redial (B) finishes first and carries the client's records.
        let (gen_a, _) = server.claim_slot(LegEnd::Recv);
        let (gen_b, _) = server.claim_slot(LegEnd::Recv);
        server.start_recv_leg(
            gen_b,
            Box::new(io_b),
            server_keys.server_opener().unwrap(),
            BytesMut::new(),
        );
        client
            .attach_leg(LegRole::Up, Box::new(peer_b), &client_keys, 0)
            .unwrap();
        let target = TargetAddr::Domain("example.test".into(), 80);
        async fn opened(control: &mut mpsc::Receiver<Control>) -> StreamId {
            match tokio::time::timeout(Duration::from_secs(5), control.recv()).await {
                Ok(Some(Control::StreamOpened { stream, .. })) => stream,
                other => panic!("expected a stream to open, got {other:?}"),
            }
        }
        let (c1, c2) = (client.clone(), client.clone());
        let t1 = target.clone();
        tokio::spawn(async move { c1.open_stream(t1, Duration::from_secs(30)).await });
        let first = opened(&mut control).await;
        // The superseded leg's handshake finishes late: it must not re-attach the session.
        server.start_recv_leg(
            gen_a,
            Box::new(io_a),
            stale_keys.server_opener().unwrap(),
            BytesMut::new(),
        );
        assert_eq!(lock(&server.inner).recv_generation, gen_b);
        // The live leg's next record is read as a continuation, not refused for lacking
        // RESUME: the session stays open and the second stream arrives.
        tokio::spawn(async move { c2.open_stream(target, Duration::from_secs(30)).await });
        let second = opened(&mut control).await;
        assert_ne!(first, second);
        assert!(!server.is_closed() && !client.is_closed());
    }
}
