//! The session state machine: streams, sequencing, acknowledgement, retransmission and
//! flow control over one send leg and one receive leg.
//!
//! The machine is symmetric: each side sends on its *send leg* (the client's uplink, the
//! server's downlink) and receives on its *receive leg*. Acknowledgements of what a side
//! received therefore travel on its own send leg, i.e. the opposite leg of the data.
//!
//! Sequenced frames are numbered per direction and kept in a retransmit buffer until the
//! peer acknowledges them. When a send leg is replaced, transmission rewinds to the oldest
//! unacknowledged frame and the new leg starts with RESUME naming its sequence number; the
//! receiver drops what it already has, so every frame is delivered once and in order.
//!
//! Flow control is by absolute credit, per stream and per session (MAX_STREAM_DATA,
//! MAX_DATA). The receiver grants credit as the application consumes, so a reader that stops
//! reading costs at most its window. The retransmit buffer is bounded by the peer's credit
//! and by this side's own `max_unacked` cap, whichever is smaller; every frame in it costs
//! 64 bytes of that cap besides its DATA, new streams are refused while it is full, and a
//! peer whose OPENs keep asking for replies it never acknowledges is closed at twice the cap.
//!
//! Time is injected: callers pass `Instant`s, and [`Session::poll_timeout`] says when to
//! call [`Session::handle_timeout`] next.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::{
    CloseCode, Frame, FrameDecoder, FrameError, ResetCode, StreamId, StreamMap, DATA_CHUNK,
    MAX_RECORD_PAYLOAD, MIN_RECORD_PAYLOAD,
};
use crate::recv_queue::{BufferId, RecvQueue, SharedBuffers, RECORD_ALONE};
use crate::target::{ConnectStatus, TargetAddr};

/// Credit each side may assume for a new stream before any MAX_STREAM_DATA arrives.
pub const INITIAL_STREAM_CREDIT: u64 = 256 * 1024;
/// Session-wide credit each side may assume before any MAX_DATA arrives.
pub const INITIAL_SESSION_CREDIT: u64 = 1024 * 1024;

/// Tunables of a session. Defaults suit a tunnel on a fast path.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Receive window per stream (bytes buffered for an application that is not reading).
    pub stream_window: u64,
    /// Receive window for the whole session.
    pub session_window: u64,
    /// Cap on what this side keeps for retransmission: DATA bytes, plus 64 bytes per frame.
    pub max_unacked: u64,
    /// Most concurrent streams.
    pub max_streams: usize,
    /// Send something on the send leg at least this often.
    pub keepalive: Duration,
    /// Report the receive leg as dead after this long without a record.
    pub leg_silence: Duration,
    /// Close the session after this long with no stream open.
    pub idle_timeout: Duration,
    /// Close the session when a leg stays down this long.
    pub resume_window: Duration,
    /// Longest an acknowledgement may wait to ride along with other frames.
    pub ack_delay: Duration,
    /// Acknowledge at once after this many sequenced frames.
    pub ack_every: u64,
}

impl SessionConfig {
    /// One of `sessions` sessions' equal share of `total` (a window or retransmit cap the
    /// sessions share), but never less than one stream's window, so that every session can
    /// still move a stream at full speed.
    pub fn share(&self, total: u64, sessions: usize) -> u64 {
        (total / sessions.max(1) as u64).max(self.stream_window)
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            stream_window: 2 * 1024 * 1024,
            session_window: 8 * 1024 * 1024,
            max_unacked: 8 * 1024 * 1024,
            max_streams: 1024,
            keepalive: Duration::from_secs(10),
            leg_silence: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            resume_window: Duration::from_secs(60),
            ack_delay: Duration::from_millis(5),
            ack_every: 32,
        }
    }
}

/// Which end of the session this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Opens streams; sends on the uplink.
    Client,
    /// Accepts streams; sends on the downlink.
    Server,
}

/// Something the driver must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// (Server) the client opened a stream: connect to `target`, then call
    /// [`Session::open_result`].
    StreamOpened {
        /// The new stream.
        stream: StreamId,
        /// Where to connect.
        target: TargetAddr,
    },
    /// (Server) a stream was refused because the session holds `max_streams` streams.
    StreamLimit {
        /// The refused stream.
        stream: StreamId,
    },
    /// (Client) the exit reported its connect outcome.
    Connected {
        /// The stream concerned.
        stream: StreamId,
        /// The outcome; anything but success also ends the stream.
        status: ConnectStatus,
    },
    /// Data or end-of-stream is ready for [`Session::recv`].
    Readable(StreamId),
    /// Credit arrived for a stream whose sender was blocked.
    Writable(StreamId),
    /// The stream was reset by the peer or because the session ended.
    Reset {
        /// The stream concerned.
        stream: StreamId,
        /// Why.
        code: ResetCode,
    },
    /// Nothing arrived on the receive leg for `leg_silence`: replace it.
    RecvLegSilent,
    /// The session is over; no further events follow.
    Closed(CloseReason),
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// This side called [`Session::close`].
    Local(CloseCode),
    /// The peer sent CLOSE.
    Peer(CloseCode),
    /// No stream was open for the idle timeout.
    Idle,
    /// A leg stayed down longer than the resume window.
    ResumeWindowExpired,
    /// The peer broke the protocol.
    ProtocolError(SessionError),
}

/// A protocol violation by the peer, or a misuse by the driver.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// A frame did not decode.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A frame this side never accepts from its peer.
    #[error("unexpected frame from peer: {0}")]
    UnexpectedFrame(&'static str),
    /// A sequenced frame arrived before the leg's RESUME.
    #[error("sequenced frame before RESUME on a new leg")]
    MissingResume,
    /// Frames are missing between what was delivered and what arrived.
    #[error("sequence gap: expected {expected}, got {got}")]
    SequenceGap {
        /// The next expected sequence number.
        expected: u64,
        /// The one that arrived.
        got: u64,
    },
    /// An ACK for frames never sent.
    #[error("ACK {acked} beyond the {sent} frames sent")]
    AckBeyondSent {
        /// Acknowledged.
        acked: u64,
        /// Sent.
        sent: u64,
    },
    /// The peer sent beyond a stream's credit.
    #[error("stream {0} exceeded its flow-control window")]
    StreamFlowControl(StreamId),
    /// The peer sent beyond the session's credit.
    #[error("session flow-control window exceeded")]
    SessionFlowControl,
    /// OPEN with a stream id not above every earlier one.
    #[error("stream id {0} is not above earlier ids")]
    StreamIdReused(StreamId),
    /// A frame names a stream that was never opened.
    #[error("stream {0} was never opened")]
    UnknownStream(StreamId),
    /// The driver used a stream that is gone or not writable.
    #[error("stream {0} is closed")]
    StreamClosed(StreamId),
    /// The session holds `max_streams` streams already.
    #[error("stream limit of {0} reached")]
    StreamLimit(usize),
    /// The operation is not for this side.
    #[error("operation not available on this side")]
    WrongSide,
    /// The session has ended.
    #[error("session closed")]
    SessionClosed,
    /// The peer let the frames waiting for its acknowledgement outgrow twice the
    /// retransmit cap: it stopped acknowledging while asking for replies (OPENs).
    #[error("the peer left {frames} frames unacknowledged")]
    PeerNotAcknowledging {
        /// Frames held for retransmission.
        frames: usize,
    },
}

/// What [`Session::recv`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recv {
    /// Bytes, in order.
    Data(Bytes),
    /// The peer finished; no more data will come.
    Fin,
    /// Nothing yet: wait for [`Event::Readable`]. (A reset stream is gone: `recv` then
    /// fails with [`SessionError::StreamClosed`], after [`Event::Reset`].)
    Blocked,
}

#[derive(Debug)]
struct Stream {
    /// (Client) sequence number of this stream's OPEN: credit for the stream may only
    /// travel after the OPEN has, or the peer would not know the stream yet.
    open_seq: Option<u64>,
    sent: u64,
    send_limit: u64,
    fin_sent: bool,
    writer_blocked: bool,
    queue: RecvQueue,
    received: u64,
    consumed: u64,
    advertised: u64,
    fin_received: bool,
    fin_delivered: bool,
}

impl Stream {
    fn new(open_seq: Option<u64>) -> Self {
        Self {
            open_seq,
            sent: 0,
            send_limit: INITIAL_STREAM_CREDIT,
            fin_sent: false,
            writer_blocked: false,
            queue: RecvQueue::default(),
            received: 0,
            consumed: 0,
            advertised: INITIAL_STREAM_CREDIT,
            fin_received: false,
            fin_delivered: false,
        }
    }

    fn is_done(&self) -> bool {
        self.fin_sent && self.fin_delivered
    }

    /// Bytes received and not yet taken by the application.
    fn unread(&self) -> u64 {
        self.received - self.consumed
    }
}

/// What a frame held for retransmission is charged against [`SessionConfig::max_unacked`]
/// besides its DATA bytes: its place in the queue. Without it, 1-byte writes, or the
/// replies to a peer's OPENs, could fill the queue with millions of frames while the peer
/// withheld its ACKs.
const FRAME_COST: u64 = 64;

/// The DATA bytes that fit in `room` of the retransmit cap: each [`DATA_CHUNK`] of them
/// is a frame, which costs its [`FRAME_COST`] besides.
fn data_room(room: u64) -> u64 {
    let per_frame = DATA_CHUNK as u64 + FRAME_COST;
    (room / per_frame) * DATA_CHUNK as u64 + (room % per_frame).saturating_sub(FRAME_COST)
}

/// Per-direction retransmit buffer: frames from `base_seq` on, not yet acknowledged.
#[derive(Debug, Default)]
struct SendQueue {
    frames: VecDeque<Frame>,
    base_seq: u64,
    tx_next: u64,
    unacked_data: u64,
}

impl SendQueue {
    fn next_seq(&self) -> u64 {
        self.base_seq + self.frames.len() as u64
    }

    /// What the queue holds, charged as in [`FRAME_COST`].
    fn cost(&self) -> u64 {
        self.unacked_data + self.frames.len() as u64 * FRAME_COST
    }

    fn push(&mut self, f: Frame) {
        if let Frame::Data { data, .. } = &f {
            self.unacked_data += data.len() as u64;
        }
        self.frames.push_back(f);
    }

    fn ack(&mut self, next: u64) -> Result<(), SessionError> {
        if next > self.next_seq() {
            return Err(SessionError::AckBeyondSent {
                acked: next,
                sent: self.next_seq(),
            });
        }
        while self.base_seq < next {
            if let Some(Frame::Data { data, .. }) = self.frames.pop_front() {
                self.unacked_data -= data.len() as u64;
            }
            self.base_seq += 1;
        }
        self.tx_next = self.tx_next.max(self.base_seq);
        Ok(())
    }

    fn pending(&self) -> Option<&Frame> {
        self.frames.get((self.tx_next - self.base_seq) as usize)
    }
}

/// The state of one session at one end.
pub struct Session {
    side: Side,
    config: SessionConfig,
    closed: bool,
    events: VecDeque<Event>,
    streams: StreamMap<Stream>,
    highest_stream: StreamId,

    tx: SendQueue,
    /// The read buffers received bulk holds, queued or with the application (see
    /// `recv_queue`).
    shared_buffers: SharedBuffers,
    send_attached: bool,
    need_resume: bool,
    /// Sequenced frames received since the last ACK sent.
    unacked_recv: u64,
    /// When the pending ACK must go out at the latest.
    ack_due: Option<Instant>,
    /// The ACK must go out now (timer expired, or a new leg).
    ack_now: bool,
    max_data_dirty: bool,
    credit_updates: BTreeSet<StreamId>,
    data_sent: u64,
    peer_max_data: u64,

    recv_attached: bool,
    leg_seq: Option<u64>,
    recv_next: u64,
    data_received: u64,
    data_consumed: u64,
    max_data_advertised: u64,

    last_tx: Instant,
    /// When a keepalive fell due and the driver was told (`handle_timeout`), if nothing
    /// has been sent since. The next keepalive deadline then counts from here, not from
    /// `last_tx`: a writer held up by a peer that does not read cannot send it, and the
    /// timer must not fire on it again and again until the writer can. Since the writer
    /// sends no earlier than this, sending never moves the deadline earlier.
    keepalive_asked: Option<Instant>,
    last_rx: Instant,
    silence_reported: bool,
    last_activity: Instant,
    send_down_since: Option<Instant>,
    recv_down_since: Option<Instant>,
}

impl Session {
    /// A new session with no legs attached yet.
    pub fn new(side: Side, config: SessionConfig, now: Instant) -> Self {
        let mut s = Self {
            side,
            config,
            closed: false,
            events: VecDeque::new(),
            streams: StreamMap::default(),
            highest_stream: 0,
            tx: SendQueue::default(),
            shared_buffers: SharedBuffers::default(),
            send_attached: false,
            need_resume: false,
            unacked_recv: 0,
            ack_due: None,
            ack_now: false,
            max_data_dirty: false,
            credit_updates: BTreeSet::new(),
            data_sent: 0,
            peer_max_data: INITIAL_SESSION_CREDIT,
            recv_attached: false,
            leg_seq: None,
            recv_next: 0,
            data_received: 0,
            data_consumed: 0,
            max_data_advertised: INITIAL_SESSION_CREDIT,
            last_tx: now,
            keepalive_asked: None,
            last_rx: now,
            silence_reported: false,
            last_activity: now,
            send_down_since: Some(now),
            recv_down_since: Some(now),
        };
        s.update_session_credit();
        s
    }

    /// This end's side.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next sequence number this side expects from the peer (its cumulative ACK).
    pub fn recv_next(&self) -> u64 {
        self.recv_next
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Frames held for retransmission, and the DATA bytes among them.
    pub fn unacked(&self) -> (usize, u64) {
        (self.tx.frames.len(), self.tx.unacked_data)
    }

    /// Bytes buffered for the application across all streams.
    pub fn buffered(&self) -> u64 {
        self.data_received - self.data_consumed
    }

    /// Bytes buffered for the application on `stream` (0 for a stream that is gone).
    pub fn buffered_on(&self, stream: StreamId) -> u64 {
        self.streams.get(&stream).map_or(0, Stream::unread)
    }

    /// Whether a send leg is attached.
    pub fn send_leg_attached(&self) -> bool {
        self.send_attached
    }

    /// Whether a receive leg is attached.
    pub fn recv_leg_attached(&self) -> bool {
        self.recv_attached
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- legs ----------------------------------------------------------------------

    /// A new send leg is up. `peer_recv_next` is the peer's ACK learnt in the handshake.
    pub fn attach_send_leg(
        &mut self,
        now: Instant,
        peer_recv_next: Option<u64>,
    ) -> Result<(), SessionError> {
        if let Some(n) = peer_recv_next {
            self.tx.ack(n)?;
        }
        self.tx.tx_next = self.tx.base_seq;
        self.send_attached = true;
        self.send_down_since = None;
        self.need_resume = true;
        self.ack_now = true;
        self.max_data_dirty = true;
        self.credit_updates = self.streams.keys().copied().collect();
        self.last_tx = now;
        self.keepalive_asked = None;
        Ok(())
    }

    /// The send leg failed or was closed.
    pub fn detach_send_leg(&mut self, now: Instant) {
        if self.send_attached {
            self.send_attached = false;
            self.send_down_since = Some(now);
        }
    }

    /// A new receive leg is up; its first record must start with RESUME.
    pub fn attach_recv_leg(&mut self, now: Instant) {
        // The new leg's reader numbers its buffers afresh (`handle_record_in`).
        self.shared_buffers.new_reader();
        self.recv_attached = true;
        self.recv_down_since = None;
        self.leg_seq = None;
        self.last_rx = now;
        self.silence_reported = false;
    }

    /// The receive leg failed or was closed.
    pub fn detach_recv_leg(&mut self, now: Instant) {
        if self.recv_attached {
            self.recv_attached = false;
            self.recv_down_since = Some(now);
        }
    }

    // ---- streams, application side -------------------------------------------------

    /// (Client) opens a stream to `target`; data may be sent at once (it is buffered by the
    /// exit until its connect completes).
    pub fn open_stream(&mut self, target: TargetAddr) -> Result<StreamId, SessionError> {
        self.check_open()?;
        if self.side != Side::Client {
            return Err(SessionError::WrongSide);
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(SessionError::StreamLimit(self.config.max_streams));
        }
        if self.tx.cost() >= self.config.max_unacked {
            // The peer has not acknowledged a full cap (a stalled leg, or a peer that
            // stopped): no new stream until it does.
            return Err(SessionError::PeerNotAcknowledging {
                frames: self.tx.frames.len(),
            });
        }
        self.highest_stream += 1;
        let id = self.highest_stream;
        self.streams
            .insert(id, Stream::new(Some(self.tx.next_seq())));
        self.tx.push(Frame::Open { stream: id, target });
        self.schedule_stream_credit(id);
        Ok(id)
    }

    /// (Server) reports the outcome of the connect for `stream`. A failure ends the stream.
    pub fn open_result(
        &mut self,
        stream: StreamId,
        status: ConnectStatus,
    ) -> Result<(), SessionError> {
        self.check_open()?;
        if self.side != Side::Server {
            return Err(SessionError::WrongSide);
        }
        if !self.streams.contains_key(&stream) {
            return Err(SessionError::StreamClosed(stream));
        }
        self.queue_reply(Frame::OpenResult { stream, status })?;
        if status != ConnectStatus::Succeeded {
            self.drop_stream(stream);
        }
        Ok(())
    }

    /// How many bytes [`Session::send`] would accept on `stream` now.
    pub fn send_capacity(&self, stream: StreamId) -> u64 {
        match self.streams.get(&stream) {
            Some(s) if !s.fin_sent && !self.closed => {
                let stream_credit = s.send_limit.saturating_sub(s.sent);
                let session_credit = self.peer_max_data.saturating_sub(self.data_sent);
                let buffer_room = data_room(self.config.max_unacked.saturating_sub(self.tx.cost()));
                stream_credit.min(session_credit).min(buffer_room)
            }
            _ => 0,
        }
    }

    /// Queues as much of `data` as credit allows, advancing it past what was taken. When
    /// nothing could be taken, [`Event::Writable`] follows once credit arrives.
    pub fn send(&mut self, stream: StreamId, data: &mut Bytes) -> Result<usize, SessionError> {
        self.check_open()?;
        match self.streams.get(&stream) {
            Some(s) if !s.fin_sent => {}
            _ => return Err(SessionError::StreamClosed(stream)),
        }
        let take = (self.send_capacity(stream).min(data.len() as u64)) as usize;
        let Some(s) = self.streams.get_mut(&stream) else {
            return Err(SessionError::StreamClosed(stream));
        };
        if take < data.len() {
            s.writer_blocked = true;
        }
        s.sent += take as u64;
        self.data_sent += take as u64;
        let mut chunk = data.split_to(take);
        while !chunk.is_empty() {
            let n = chunk.len().min(DATA_CHUNK);
            self.tx.push(Frame::Data {
                stream,
                data: chunk.split_to(n),
            });
        }
        Ok(take)
    }

    /// Ends the sending half of `stream` (half-close).
    pub fn finish(&mut self, stream: StreamId) -> Result<(), SessionError> {
        self.check_open()?;
        let s = self
            .streams
            .get_mut(&stream)
            .filter(|s| !s.fin_sent)
            .ok_or(SessionError::StreamClosed(stream))?;
        s.fin_sent = true;
        self.tx.push(Frame::Fin { stream });
        self.reap(stream);
        Ok(())
    }

    /// Aborts `stream` in both directions; unread data is discarded.
    pub fn reset(&mut self, stream: StreamId, code: ResetCode) -> Result<(), SessionError> {
        self.check_open()?;
        if !self.streams.contains_key(&stream) {
            return Err(SessionError::StreamClosed(stream));
        }
        self.tx.push(Frame::Rst { stream, code });
        self.drop_stream(stream);
        Ok(())
    }

    /// Takes the next chunk of received data for `stream`.
    pub fn recv(&mut self, stream: StreamId) -> Result<Recv, SessionError> {
        let Some(s) = self.streams.get_mut(&stream) else {
            return Err(SessionError::StreamClosed(stream));
        };
        if let Some(chunk) = s.queue.pop() {
            let n = chunk.len() as u64;
            s.consumed += n;
            self.data_consumed += n;
            self.schedule_stream_credit(stream);
            self.update_session_credit();
            return Ok(Recv::Data(chunk));
        }
        if s.fin_received {
            if !s.fin_delivered {
                s.fin_delivered = true;
                self.reap(stream);
            }
            return Ok(Recv::Fin);
        }
        Ok(Recv::Blocked)
    }

    /// Closes the whole session: every stream is reset and CLOSE is queued for the peer.
    pub fn close(&mut self, code: CloseCode) {
        if self.closed {
            return;
        }
        self.tx.push(Frame::Close { code });
        self.finish_close(CloseReason::Local(code));
    }

    // ---- wire side -----------------------------------------------------------------

    /// Whether [`Session::poll_transmit`] has something to send now.
    pub fn wants_transmit(&self) -> bool {
        self.send_attached
            && (self.need_resume
                || self.ack_now
                || self.unacked_recv >= self.config.ack_every
                || self.max_data_dirty
                || !self.credit_updates.is_empty()
                || self.tx.pending().is_some())
    }

    /// Appends the plaintext of at most one record (≤ [`MAX_RECORD_PAYLOAD`] bytes) for the
    /// send leg to `out`. Returns the number of bytes written; 0 means nothing to send.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> usize {
        self.poll_transmit_up_to(now, out, MAX_RECORD_PAYLOAD)
    }

    /// [`Session::poll_transmit`] for a leg whose records carry at most `max_payload`
    /// bytes (at least [`MIN_RECORD_PAYLOAD`], at most [`MAX_RECORD_PAYLOAD`]), such as
    /// TLS records.
    pub fn poll_transmit_up_to(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
        max_payload: usize,
    ) -> usize {
        let max_payload = max_payload.clamp(MIN_RECORD_PAYLOAD, MAX_RECORD_PAYLOAD);
        if !self.send_attached {
            return 0;
        }
        let start = out.len();
        if self.need_resume {
            Frame::Resume {
                seq: self.tx.tx_next,
            }
            .encode(out);
            self.need_resume = false;
        }
        // Any record carries the ACK when one is pending: acknowledgements ride along
        // with other traffic, and travel alone only when due (count or timer).
        if self.ack_now || self.unacked_recv > 0 {
            Frame::Ack {
                next_seq: self.recv_next,
            }
            .encode(out);
            self.ack_now = false;
            self.unacked_recv = 0;
            self.ack_due = None;
        }
        if self.max_data_dirty {
            Frame::MaxData {
                limit: self.max_data_advertised,
            }
            .encode(out);
            self.max_data_dirty = false;
        }
        self.write_credit_updates(out, start, max_payload);
        while let Some(f) = self.tx.pending() {
            if out.len() - start + f.encoded_len() > max_payload {
                break;
            }
            f.encode(out);
            self.tx.tx_next += 1;
        }
        self.write_credit_updates(out, start, max_payload);
        if out.len() == start && now >= self.last_tx + self.config.keepalive {
            Frame::Ping.encode(out);
        }
        if out.len() > start {
            self.last_tx = now;
            self.keepalive_asked = None;
        }
        out.len() - start
    }

    /// Processes the plaintext of one record from the receive leg. An error is a protocol
    /// violation: the session is closed and [`Event::Closed`] queued. The record is taken
    /// to be alone in its buffer (see [`Session::handle_record_in`]).
    pub fn handle_record(&mut self, now: Instant, record: Bytes) -> Result<(), SessionError> {
        self.handle_record_in(now, record, RECORD_ALONE)
    }

    /// [`Session::handle_record`] for a record opened in read buffer `buffer`, an id the
    /// caller never gives again once that buffer is replaced ([`RECORD_ALONE`]: unknown).
    /// Bulk DATA stays a slice of its buffer while the session's slices hold few buffers
    /// (`recv_queue`).
    pub fn handle_record_in(
        &mut self,
        now: Instant,
        record: Bytes,
        buffer: BufferId,
    ) -> Result<(), SessionError> {
        if self.closed {
            return Err(SessionError::SessionClosed);
        }
        self.last_rx = now;
        self.silence_reported = false;
        let r = self.handle_frames(now, record, buffer);
        if let Err(e) = &r {
            self.close_for(e.clone());
        }
        r
    }

    fn handle_frames(
        &mut self,
        now: Instant,
        record: Bytes,
        buffer: BufferId,
    ) -> Result<(), SessionError> {
        for frame in FrameDecoder::new(record)? {
            let frame = frame?;
            if frame.is_sequenced() {
                let seq = self.leg_seq.ok_or(SessionError::MissingResume)?;
                if seq > self.recv_next {
                    return Err(SessionError::SequenceGap {
                        expected: self.recv_next,
                        got: seq,
                    });
                }
                // seq <= recv_next here, and recv_next counts frames received, so +1 fits.
                self.leg_seq = Some(seq + 1);
                if seq < self.recv_next {
                    continue; // already delivered over an earlier leg
                }
                self.recv_next += 1;
                self.unacked_recv += 1;
                if self.ack_due.is_none() {
                    self.ack_due = Some(now + self.config.ack_delay);
                }
                self.handle_sequenced(now, frame, buffer)?;
                if self.closed {
                    return Ok(());
                }
            } else {
                self.handle_state(frame)?;
            }
        }
        Ok(())
    }

    fn handle_state(&mut self, frame: Frame) -> Result<(), SessionError> {
        match frame {
            Frame::Resume { seq } => self.leg_seq = Some(seq),
            Frame::Ack { next_seq } => {
                let before = self.tx.cost();
                self.tx.ack(next_seq)?;
                // Freed retransmit room is credit too (`max_unacked`), DATA or not.
                if self.tx.cost() < before {
                    self.wake_blocked_writers();
                }
            }
            Frame::MaxData { limit } => {
                if limit > self.peer_max_data {
                    self.peer_max_data = limit;
                    self.wake_blocked_writers();
                }
            }
            Frame::MaxStreamData { stream, limit } => {
                self.check_known(stream)?;
                if let Some(s) = self.streams.get_mut(&stream) {
                    if limit > s.send_limit {
                        s.send_limit = limit;
                        if s.writer_blocked {
                            self.wake_writer(stream);
                        }
                    }
                }
            }
            Frame::Ping => {}
            _ => return Err(SessionError::UnexpectedFrame("sequenced frame as state")),
        }
        Ok(())
    }

    /// Handles a sequenced frame of a record opened in read buffer `buffer`.
    fn handle_sequenced(
        &mut self,
        now: Instant,
        frame: Frame,
        buffer: BufferId,
    ) -> Result<(), SessionError> {
        match frame {
            Frame::Open { stream, target } => {
                if self.side != Side::Server {
                    return Err(SessionError::UnexpectedFrame("OPEN sent to a client"));
                }
                if stream <= self.highest_stream {
                    return Err(SessionError::StreamIdReused(stream));
                }
                self.highest_stream = stream;
                self.last_activity = now;
                if self.streams.len() >= self.config.max_streams {
                    self.events.push_back(Event::StreamLimit { stream });
                    self.queue_reply(Frame::Rst {
                        stream,
                        code: ResetCode::LimitReached,
                    })?;
                } else {
                    self.streams.insert(stream, Stream::new(None));
                    self.schedule_stream_credit(stream);
                    self.events
                        .push_back(Event::StreamOpened { stream, target });
                }
            }
            Frame::OpenResult { stream, status } => {
                if self.side != Side::Client {
                    return Err(SessionError::UnexpectedFrame(
                        "OPEN_RESULT sent to a server",
                    ));
                }
                self.check_known(stream)?;
                if self.streams.contains_key(&stream) {
                    self.events.push_back(Event::Connected { stream, status });
                    if status != ConnectStatus::Succeeded {
                        self.drop_stream(stream);
                    }
                }
            }
            Frame::Data { stream, data } => self.handle_data(now, stream, data, buffer)?,
            Frame::Fin { stream } => {
                self.check_known(stream)?;
                if let Some(s) = self.streams.get_mut(&stream) {
                    if !s.fin_received {
                        s.fin_received = true;
                        if s.queue.is_empty() {
                            self.events.push_back(Event::Readable(stream));
                        }
                    }
                }
            }
            Frame::Rst { stream, code } => {
                self.check_known(stream)?;
                if self.streams.contains_key(&stream) {
                    self.events.push_back(Event::Reset { stream, code });
                    self.drop_stream(stream);
                }
            }
            Frame::Close { code } => self.finish_close(CloseReason::Peer(code)),
            _ => return Err(SessionError::UnexpectedFrame("state frame as sequenced")),
        }
        Ok(())
    }

    fn handle_data(
        &mut self,
        now: Instant,
        stream: StreamId,
        data: Bytes,
        buffer: BufferId,
    ) -> Result<(), SessionError> {
        self.check_known(stream)?;
        let n = data.len() as u64;
        if self.data_received + n > self.max_data_advertised {
            return Err(SessionError::SessionFlowControl);
        }
        self.data_received += n;
        self.last_activity = now;
        let Some(s) = self.streams.get_mut(&stream) else {
            // The stream is gone (reset here): the bytes count as consumed at once.
            self.data_consumed += n;
            self.update_session_credit();
            return Ok(());
        };
        if s.fin_received {
            return Err(SessionError::UnexpectedFrame("DATA after FIN"));
        }
        if s.received + n > s.advertised {
            return Err(SessionError::StreamFlowControl(stream));
        }
        s.received += n;
        if n > 0 {
            let was_empty = s.queue.is_empty();
            s.queue.push(data, buffer, &mut self.shared_buffers);
            if was_empty {
                self.events.push_back(Event::Readable(stream));
            }
        }
        Ok(())
    }

    /// Changes how many bytes the peer may have in flight to this side across all streams
    /// (an exit shares one window among a user's sessions). Credit already granted stays
    /// granted; a smaller window takes effect as the application consumes it, a larger one
    /// at once.
    pub fn set_session_window(&mut self, window: u64) {
        self.config.session_window = window;
        self.update_session_credit();
    }

    /// The current session window (see [`Session::set_session_window`]).
    pub fn session_window(&self) -> u64 {
        self.config.session_window
    }

    // ---- timers --------------------------------------------------------------------

    /// When [`Session::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut consider = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if self.send_attached {
            consider(self.keepalive_asked.unwrap_or(self.last_tx) + self.config.keepalive);
            if let Some(due) = self.ack_due.filter(|_| !self.ack_now) {
                consider(due);
            }
        }
        if self.recv_attached && !self.silence_reported {
            consider(self.last_rx + self.config.leg_silence);
        }
        if self.streams.is_empty() {
            consider(self.last_activity + self.config.idle_timeout);
        }
        if let Some(since) = self.leg_down_since() {
            consider(since + self.config.resume_window);
        }
        t
    }

    /// Runs the timers due at `now`: leg silence, idle timeout, resume window. Keepalives
    /// are produced by [`Session::poll_transmit`] once due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if !self.streams.is_empty() {
            self.last_activity = now;
        }
        if self.ack_due.is_some_and(|due| now >= due) {
            self.ack_now = true;
        }
        if self.keepalive_due(now) {
            self.keepalive_asked = Some(now);
        }
        if let Some(since) = self.leg_down_since() {
            if now >= since + self.config.resume_window {
                self.finish_close(CloseReason::ResumeWindowExpired);
                return;
            }
        }
        if self.streams.is_empty() && now >= self.last_activity + self.config.idle_timeout {
            self.tx.push(Frame::Close {
                code: CloseCode::Idle,
            });
            self.finish_close(CloseReason::Idle);
            return;
        }
        if self.recv_attached
            && !self.silence_reported
            && now >= self.last_rx + self.config.leg_silence
        {
            self.silence_reported = true;
            self.events.push_back(Event::RecvLegSilent);
        }
    }

    /// Whether a keepalive is due at `now` (the driver then calls `poll_transmit`).
    pub fn keepalive_due(&self, now: Instant) -> bool {
        self.send_attached && now >= self.last_tx + self.config.keepalive
    }

    // ---- internals -----------------------------------------------------------------

    /// Writes the pending MAX_STREAM_DATA frames that fit, for streams the peer already
    /// knows. Inline: called twice per record, almost always with nothing pending.
    #[inline]
    fn write_credit_updates(&mut self, out: &mut Vec<u8>, start: usize, max_payload: usize) {
        if !self.credit_updates.is_empty() {
            self.write_pending_credit_updates(out, start, max_payload);
        }
    }

    /// [`Session::write_credit_updates`] when some are pending.
    fn write_pending_credit_updates(
        &mut self,
        out: &mut Vec<u8>,
        start: usize,
        max_payload: usize,
    ) {
        const LEN: usize = 1 + 4 + 8;
        let tx_next = self.tx.tx_next;
        let mut sent = Vec::new();
        for &stream in &self.credit_updates {
            if out.len() - start + LEN > max_payload {
                break;
            }
            match self.streams.get(&stream) {
                None => sent.push(stream),
                Some(s) if s.open_seq.is_none_or(|seq| seq < tx_next) => {
                    Frame::MaxStreamData {
                        stream,
                        limit: s.advertised,
                    }
                    .encode(out);
                    sent.push(stream);
                }
                Some(_) => {}
            }
        }
        for stream in sent {
            self.credit_updates.remove(&stream);
        }
    }

    fn leg_down_since(&self) -> Option<Instant> {
        match (self.send_down_since, self.recv_down_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn check_open(&self) -> Result<(), SessionError> {
        if self.closed {
            Err(SessionError::SessionClosed)
        } else {
            Ok(())
        }
    }

    /// A stream id is known when it is at or below the highest opened so far.
    fn check_known(&self, stream: StreamId) -> Result<(), SessionError> {
        if stream == 0 || stream > self.highest_stream {
            Err(SessionError::UnknownStream(stream))
        } else {
            Ok(())
        }
    }

    fn wake_blocked_writers(&mut self) {
        let blocked: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.writer_blocked)
            .map(|(id, _)| *id)
            .collect();
        for id in blocked {
            self.wake_writer(id);
        }
    }

    fn wake_writer(&mut self, stream: StreamId) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.writer_blocked = false;
            self.events.push_back(Event::Writable(stream));
        }
    }

    fn schedule_stream_credit(&mut self, stream: StreamId) {
        let window = self.config.stream_window;
        if let Some(s) = self.streams.get_mut(&stream) {
            if s.fin_received {
                return;
            }
            if s.advertised - s.consumed <= window / 2 {
                let limit = s.consumed + window;
                if limit > s.advertised {
                    s.advertised = limit;
                    self.credit_updates.insert(stream);
                }
            }
        }
    }

    fn update_session_credit(&mut self) {
        let window = self.config.session_window;
        if self.max_data_advertised - self.data_consumed <= window / 2 {
            let limit = self.data_consumed + window;
            if limit > self.max_data_advertised {
                self.max_data_advertised = limit;
                self.max_data_dirty = true;
            }
        }
    }

    /// Removes a stream, returning its unread bytes to the session credit.
    fn drop_stream(&mut self, stream: StreamId) {
        if let Some(s) = self.streams.remove(&stream) {
            let unread = s.unread();
            self.data_consumed += unread;
            self.update_session_credit();
        }
        self.credit_updates.remove(&stream);
    }

    fn reap(&mut self, stream: StreamId) {
        if self.streams.get(&stream).is_some_and(Stream::is_done) {
            self.drop_stream(stream);
        }
    }

    /// Queues a frame that answers the peer's OPEN (RST at the stream limit, OPEN_RESULT).
    /// Past twice the retransmit cap the peer keeps asking for replies it never
    /// acknowledges: the session closes rather than grow. (This side's own frames are
    /// bounded otherwise: DATA by [`Session::send_capacity`], OPEN by the refusal of new
    /// streams while the cap is full, FIN and RST by one each per stream.)
    fn queue_reply(&mut self, f: Frame) -> Result<(), SessionError> {
        self.tx.push(f);
        if self.tx.cost() > self.config.max_unacked.saturating_mul(2) {
            let e = SessionError::PeerNotAcknowledging {
                frames: self.tx.frames.len(),
            };
            self.close_for(e.clone());
            return Err(e);
        }
        Ok(())
    }

    fn close_for(&mut self, e: SessionError) {
        if !self.closed {
            self.tx.push(Frame::Close {
                code: CloseCode::ProtocolError,
            });
            self.finish_close(CloseReason::ProtocolError(e));
        }
    }

    fn finish_close(&mut self, reason: CloseReason) {
        self.closed = true;
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for stream in ids {
            self.events.push_back(Event::Reset {
                stream,
                code: ResetCode::SessionClosing,
            });
            self.drop_stream(stream);
        }
        self.events.push_back(Event::Closed(reason));
    }
}
