//! A stream's side of the tunnel: the pair of pumps between an application socket and the
//! session, the read-ahead budget they share, the throttle that paces them, and the
//! reader's direct delivery into a waiting stream's socket ([`Lent`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use halfpipe_core::frame::{ResetCode, StreamId};
use halfpipe_core::session::{Recv, Session};
use halfpipe_core::ConnectStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::Tunnel;
use crate::locks::lock;

/// Most bytes the receive leg's reader writes to a waiting stream's socket itself (see
/// [`Lent`]); more is bulk, which the pump writes.
const DELIVERY_MAX: u64 = 8 * 1024;
/// Most bytes read from an application socket at once.
const APP_READ: usize = 128 * 1024;
/// What a stream's read buffer starts at: an idle or interactive stream never needs more,
/// and one that fills its buffer doubles it up to [`APP_READ`].
const APP_READ_MIN: usize = 16 * 1024;
/// Most bytes a tunnel's pumps may hold between reading them from applications and the
/// session taking them (it takes none while its window is full) before each pump's reads
/// shrink to [`APP_READ_MIN`]. One bulk stream never reaches it (it holds at most
/// [`APP_READ`]); without it, 64 streams against a full window held 8 MiB, 1024 held 128.
const READ_AHEAD_BUDGET: usize = 1024 * 1024;
/// Least room left in a stream's read buffer after a short read for the next read to go
/// into it rather than into a new allocation.
const SHORT_READ_SPARE: usize = 4 * 1024;

/// A throttle's answer for a batch of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Charged: move them.
    Go,
    /// Not charged: ask again after this long.
    Wait(Duration),
    /// A limit ends the stream (a transfer quota): it is reset with `LimitReached`.
    Stop,
}

/// Paces a stream's bytes (the exit's per-user byte rates and quotas).
pub trait Throttle: Send + Sync {
    /// `n` bytes were read from the socket and are about to enter the session.
    fn read_from_socket(&self, n: usize) -> Pace;
    /// `n` bytes left the session and are about to be written to the socket.
    fn write_to_socket(&self, n: usize) -> Pace;
}

/// What a stream's pumps wait on, and what the rest of the tunnel signals them with.
#[derive(Default)]
pub(super) struct StreamSignals {
    /// The session has data (or the end) for the application.
    pub(super) readable: Notify,
    /// The session has room for more of the application's data.
    pub(super) writable: Notify,
    /// The exit reported the connect outcome (`status`) or the stream was reset.
    pub(super) connected: Notify,
    /// The connect outcome, once known.
    pub(super) status: Mutex<Option<ConnectStatus>>,
    /// The stream was reset (by the peer, a limit or the session closing): both pumps stop
    /// and the application's socket is closed with a TCP reset, never a clean FIN, so a
    /// cut-short stream cannot pass for a complete one.
    reset: std::sync::atomic::AtomicBool,
    /// Wakes the application-to-session pump out of its wait for the application when the
    /// stream is reset. Apart from `writable` so that the pump can keep one waiter
    /// registered across its reads, instead of registering and unregistering one per read.
    reset_wake: Notify,
    /// The application socket's writer, while the stream's pump lends it (see [`Lent`]).
    lent: Mutex<Lent>,
}

/// A stream's application-socket writer, lent by its pump while the pump waits for data,
/// so that whoever makes the stream readable (the receive leg's reader) writes the bytes
/// itself, as a one-task relay would, instead of waking the pump: one task hand-off fewer
/// per record. Only small deliveries are made so (up to [`DELIVERY_MAX`]): bulk data is the
/// pump's, which waits properly for a full socket. Whatever that delivery
/// cannot finish at once it leaves here, and wakes the pump, which takes the writer back
/// and goes on from there.
#[derive(Default)]
struct Lent {
    /// The write half, while the pump waits (a throttled stream's pump never lends it).
    wr: Option<tokio::net::tcp::OwnedWriteHalf>,
    /// Data a delivery took from the session that the socket did not take at once, in order:
    /// the pump writes it before anything newer.
    unwritten: Vec<Bytes>,
    /// The stream's end (FIN or gone) that a delivery took from the session: the pump acts on
    /// it after writing `unwritten`, without asking the session again.
    end: Option<Drained>,
}

impl StreamSignals {
    pub(super) fn mark_reset(&self) {
        self.reset.store(true, std::sync::atomic::Ordering::Release);
        self.readable.notify_one();
        self.writable.notify_one();
        self.reset_wake.notify_waiters();
    }

    fn is_reset(&self) -> bool {
        self.reset.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// How a pump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    /// Its direction finished (EOF / FIN).
    Done,
    /// The stream was reset.
    Reset,
}

/// The bytes a tunnel's pumps hold outside the session (see [`READ_AHEAD_BUDGET`]).
#[derive(Default)]
pub(super) struct ReadAhead(std::sync::atomic::AtomicUsize);

impl ReadAhead {
    /// How much a pump that would read `want` bytes may read now.
    fn allowance(&self, want: usize) -> usize {
        read_allowance(want, self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Counts `n` bytes a pump now holds, until the returned guard lets them go.
    fn hold(&self, n: usize) -> HeldBytes<'_> {
        self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        HeldBytes { ahead: self, n }
    }
}

/// Bytes one pump holds outside the session; released as the session takes them, and the
/// rest when the pump ends.
struct HeldBytes<'a> {
    ahead: &'a ReadAhead,
    n: usize,
}

impl HeldBytes<'_> {
    /// The pump now holds `left` bytes (the session took the others).
    fn shrink_to(&mut self, left: usize) {
        let taken = self.n.saturating_sub(left);
        self.ahead
            .0
            .fetch_sub(taken, std::sync::atomic::Ordering::Relaxed);
        self.n -= taken;
    }
}

impl Drop for HeldBytes<'_> {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

/// A read of `want` bytes cut to what the budget has left with `held` bytes already held
/// by the tunnel's pumps, but never below [`APP_READ_MIN`] (so no pump waits for others).
fn read_allowance(want: usize, held: usize) -> usize {
    want.min(READ_AHEAD_BUDGET.saturating_sub(held).max(APP_READ_MIN))
}

impl Tunnel {
    /// Writes `stream`'s readable data straight to its application socket if its pump has
    /// lent the writer (see [`Lent`]). True when all of it was written and the pump may go on
    /// waiting; false when the pump must be woken (no writer lent, more than
    /// [`DELIVERY_MAX`], the socket full, or the stream's end).
    pub(super) fn deliver(&self, stream: StreamId, sig: &StreamSignals) -> bool {
        // Busy means the pump is taking the writer back, or this is a delivery's own event.
        let Ok(mut lent) = sig.lent.try_lock() else {
            return false;
        };
        let lent = &mut *lent;
        let Some(wr) = &lent.wr else {
            return false;
        };
        if lent.end.is_some() || !lent.unwritten.is_empty() {
            return false; // already handed to the pump
        }
        let drained = self.with_session(|s| {
            (s.buffered_on(stream) <= DELIVERY_MAX).then(|| drain(s, stream, &mut lent.unwritten))
        });
        let Some(drained) = drained else {
            return false; // bulk: the pump writes it, with a proper wait for a full socket
        };
        let data = !lent.unwritten.is_empty();
        write_now(wr.as_ref(), &mut lent.unwritten);
        let count = match lent.unwritten.is_empty() {
            true => &self.stats.delivered_by_reader,
            false => &self.stats.left_unwritten,
        };
        if data {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match drained {
            Drained::Empty => lent.unwritten.is_empty(),
            Drained::More => false,
            end @ (Drained::Fin | Drained::Gone) => {
                lent.end = Some(end);
                false
            }
        }
    }

    /// Moves bytes between `socket` and `stream` in both directions until both are done.
    /// `initial` is data the application already sent (e.g. after an HTTP CONNECT head);
    /// `throttle`, when given, paces both directions.
    pub async fn pump(
        self: Arc<Self>,
        stream: StreamId,
        socket: TcpStream,
        initial: Bytes,
        throttle: Option<Arc<dyn Throttle>>,
    ) {
        let Some(sig) = lock(&self.inner).signals.get(&stream).cloned() else {
            return;
        };
        let (rd, wr) = socket.into_split();
        let up = Arc::clone(&self).pump_app_to_session(
            stream,
            sig.clone(),
            rd,
            initial,
            throttle.clone(),
        );
        let down = Arc::clone(&self).pump_session_to_app(stream, sig, wr, throttle);
        let ((rd, up_end), (wr, down_end)) = tokio::join!(up, down);
        lock(&self.inner).signals.remove(&stream);
        if let (Some(wr), true) = (wr, up_end == PumpEnd::Reset || down_end == PumpEnd::Reset) {
            abort_socket(rd, wr);
        }
    }

    /// Resets `stream` in the session and stops both of its pumps.
    fn reset_stream(&self, stream: StreamId, sig: &StreamSignals, code: ResetCode) {
        self.with_session(|s| s.reset(stream, code).ok());
        sig.mark_reset();
    }

    async fn pump_app_to_session(
        self: Arc<Self>,
        stream: StreamId,
        sig: Arc<StreamSignals>,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        initial: Bytes,
        throttle: Option<Arc<dyn Throttle>>,
    ) -> (tokio::net::tcp::OwnedReadHalf, PumpEnd) {
        let mut held = self.read_ahead.hold(initial.len());
        let mut pending = initial;
        // One buffer, refilled in place: `split` hands the filled part to the session and
        // `reserve` reclaims the allocation once the session has released it. After a read
        // that came back short, the next one goes into the rest of the same allocation, so
        // a request/response stream fills one buffer over many exchanges instead of taking
        // a fresh one per read (each read's bytes hold theirs until acknowledged).
        let mut want = APP_READ_MIN;
        let mut buf = BytesMut::with_capacity(want);
        let mut last = LastRead::default();
        // Created before the first check of the flag, so no reset after it goes unseen.
        let reset = sig.reset_wake.notified();
        tokio::pin!(reset);
        loop {
            while !pending.is_empty() {
                let (sent, wants_tx) = self.locked(|g| g.session.send(stream, &mut pending));
                held.shrink_to(pending.len());
                if wants_tx {
                    self.transmit_inline().await;
                }
                match sent {
                    Ok(_) if pending.is_empty() => {}
                    Ok(_) => sig.writable.notified().await,
                    Err(e) => {
                        tracing::debug!(stream, error = %e, "stream ended while sending");
                        return (rd, PumpEnd::Reset);
                    }
                }
            }
            if sig.is_reset() {
                return (rd, PumpEnd::Reset);
            }
            let limit = read_room(&mut buf, self.read_ahead.allowance(want), last);
            // A reset arriving while the application is quiet must not wait for its next
            // byte (`read_buf` is cancel-safe: nothing read is lost).
            let mut limited = (&mut rd).take(limit as u64);
            let read = tokio::select! {
                biased;
                r = limited.read_buf(&mut buf) => r,
                _ = &mut reset => return (rd, PumpEnd::Reset),
            };
            match read {
                Ok(0) => {
                    self.with_session(|s| s.finish(stream).ok());
                    return (rd, PumpEnd::Done);
                }
                Ok(n) => {
                    // A read the budget or the buffer's rest cut short says nothing about
                    // the stream's rate.
                    want = next_read_size(want, n + (want - limit));
                    last = LastRead { len: n, limit };
                    if let Some(t) = &throttle {
                        if !pace(|| t.read_from_socket(n)).await {
                            self.reset_stream(stream, &sig, ResetCode::LimitReached);
                            return (rd, PumpEnd::Reset);
                        }
                    }
                    pending = buf.split().freeze();
                    held = self.read_ahead.hold(pending.len());
                }
                Err(e) => {
                    tracing::debug!(stream, error = %e, "application socket read failed: stream reset");
                    self.reset_stream(stream, &sig, ResetCode::Cancelled);
                    return (rd, PumpEnd::Reset);
                }
            }
        }
    }

    async fn pump_session_to_app(
        self: Arc<Self>,
        stream: StreamId,
        sig: Arc<StreamSignals>,
        mut wr: tokio::net::tcp::OwnedWriteHalf,
        throttle: Option<Arc<dyn Throttle>>,
    ) -> (Option<tokio::net::tcp::OwnedWriteHalf>, PumpEnd) {
        let mut chunks: Vec<Bytes> = Vec::with_capacity(MAX_WRITE_CHUNKS);
        // The stream's end as a delivery found it (then the session has nothing more).
        let mut delivered_end = None;
        loop {
            // Take what is readable (up to a batch) under one lock, then write it with
            // vectored writes.
            let next = match delivered_end.take() {
                Some(end) => end,
                None => self.with_session(|s| drain(s, stream, &mut chunks)),
            };
            if let (Some(t), false) = (&throttle, chunks.is_empty()) {
                let n = chunks.iter().map(Bytes::len).sum();
                if !pace(|| t.write_to_socket(n)).await {
                    self.reset_stream(stream, &sig, ResetCode::LimitReached);
                    return (Some(wr), PumpEnd::Reset);
                }
            }
            if !chunks.is_empty() {
                if let Err(e) = write_all_chunks(&mut wr, &mut chunks).await {
                    tracing::debug!(stream, error = %e, "application socket write failed: stream reset");
                    self.reset_stream(stream, &sig, ResetCode::Cancelled);
                    return (Some(wr), PumpEnd::Reset);
                }
            }
            match next {
                Drained::More => {}
                Drained::Empty if throttle.is_some() => sig.readable.notified().await,
                Drained::Empty => {
                    lock(&sig.lent).wr = Some(wr);
                    sig.readable.notified().await;
                    let mut lent = lock(&sig.lent);
                    let Some(back) = lent.wr.take() else {
                        // Deliveries borrow the writer only under this lock, so this is a bug;
                        // the stream cannot go on without its writer.
                        drop(lent);
                        tracing::error!(
                            stream,
                            "a stream's lent writer went missing: stream reset"
                        );
                        self.reset_stream(stream, &sig, ResetCode::Cancelled);
                        return (None, PumpEnd::Reset);
                    };
                    wr = back;
                    chunks.append(&mut lent.unwritten);
                    delivered_end = lent.end.take();
                }
                Drained::Fin => {
                    let _ = wr.shutdown().await;
                    return (Some(wr), PumpEnd::Done);
                }
                Drained::Gone => {
                    tracing::debug!(
                        stream,
                        "stream gone while receiving (reset or session closed)"
                    );
                    sig.mark_reset(); // the read pump may be waiting on the application
                    return (Some(wr), PumpEnd::Reset);
                }
            }
        }
    }
}

/// Closes an application socket with a TCP reset (`SO_LINGER` 0), so the application
/// sees its stream was cut short (`ECONNRESET`) rather than ended.
fn abort_socket(rd: tokio::net::tcp::OwnedReadHalf, wr: tokio::net::tcp::OwnedWriteHalf) {
    if let Ok(socket) = rd.reunite(wr) {
        let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
    }
}

/// The next read size of a stream after a read of `got` bytes into `want`: doubled after a
/// full read, halved after one under a quarter, within [`APP_READ_MIN`]..=[`APP_READ`].
fn next_read_size(want: usize, got: usize) -> usize {
    if got >= want {
        (want * 2).min(APP_READ)
    } else if got < want / 4 {
        (want / 2).max(APP_READ_MIN)
    } else {
        want
    }
}

/// How a pump's last read went: what it got and what it was allowed (see [`read_room`]).
#[derive(Clone, Copy, Debug, Default)]
struct LastRead {
    len: usize,
    limit: usize,
}

impl LastRead {
    /// Whether it took all the room it had (bulk).
    fn filled(self) -> bool {
        self.len > 0 && self.len == self.limit
    }
}

/// Makes room in `buf` for a pump's next read of at most `allowed` bytes and returns how
/// many it may read. After a read that filled its room (bulk) the buffer is grown to
/// `allowed`, reclaiming its allocation when the session has released it. After a short
/// one, the rest of the allocation takes the next read while it holds at least
/// [`SHORT_READ_SPARE`] and twice the last read, so that a request/response stream fills
/// one buffer over many exchanges without cutting a message of the size it sends in two.
fn read_room(buf: &mut BytesMut, allowed: usize, last: LastRead) -> usize {
    let rest_will_do = !last.filled() && buf.capacity() >= SHORT_READ_SPARE.max(2 * last.len);
    if !rest_will_do {
        buf.reserve(allowed);
    }
    allowed.min(buf.capacity())
}

/// Asks the throttle until it lets the bytes pass (a wait charges nothing, so the bytes
/// are charged by the call that says go); false when it stops the stream.
async fn pace(mut ask: impl FnMut() -> Pace) -> bool {
    loop {
        match ask() {
            Pace::Go => return true,
            Pace::Stop => return false,
            Pace::Wait(d) => tokio::time::sleep(d).await,
        }
    }
}

/// What draining a stream's receive queue ended on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// The batch is full; more may be queued.
    More,
    /// Nothing more for now.
    Empty,
    /// The peer finished the stream.
    Fin,
    /// The stream was reset or is gone.
    Gone,
}

/// Moves what `stream` has readable in `session` onto `chunks`, up to
/// [`MAX_WRITE_CHUNKS`].
fn drain(session: &mut Session, stream: StreamId, chunks: &mut Vec<Bytes>) -> Drained {
    while chunks.len() < MAX_WRITE_CHUNKS {
        match session.recv(stream) {
            Ok(Recv::Data(d)) => chunks.push(d),
            Ok(Recv::Blocked) => return Drained::Empty,
            Ok(Recv::Fin) => return Drained::Fin,
            Err(_) => return Drained::Gone,
        }
    }
    Drained::More
}

/// Writes what `socket` takes now of `chunks` without waiting, removing what it took. An
/// error leaves the chunks for the pump, whose own write then reports it.
fn write_now(socket: &TcpStream, chunks: &mut Vec<Bytes>) {
    while !chunks.is_empty() {
        let written = match chunks.as_slice() {
            [one] => socket.try_write(one), // a round trip's usual single chunk
            _ => socket.try_write_vectored(IoSlices::of(chunks).get()),
        };
        let Ok(n) = written else {
            return;
        };
        if n == 0 {
            return;
        }
        consume(chunks, n);
    }
}

/// Removes the first `n` bytes of `chunks`.
fn consume(chunks: &mut Vec<Bytes>, mut n: usize) {
    let mut whole = 0;
    while whole < chunks.len() && n >= chunks[whole].len() {
        n -= chunks[whole].len();
        whole += 1;
    }
    chunks.drain(..whole);
    if n > 0 {
        chunks[0] = chunks[0].slice(n..);
    }
}

/// Most chunks gathered for one vectored write to an application socket.
const MAX_WRITE_CHUNKS: usize = 32;

/// Writes every chunk with vectored writes, emptying `chunks`.
async fn write_all_chunks(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    chunks: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    while !chunks.is_empty() {
        let n = match chunks.as_slice() {
            [one] => wr.write(one).await?,
            _ => wr.write_vectored(IoSlices::of(chunks).get()).await?,
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        consume(chunks, n);
    }
    Ok(())
}

/// The first [`MAX_WRITE_CHUNKS`] of `chunks` as one vectored write, kept on the stack (a
/// round trip writes one small chunk at each end; an allocation per write was measurable).
struct IoSlices<'a> {
    slices: [std::io::IoSlice<'a>; MAX_WRITE_CHUNKS],
    len: usize,
}

impl<'a> IoSlices<'a> {
    fn of(chunks: &'a [Bytes]) -> Self {
        let mut slices = [std::io::IoSlice::new(&[]); MAX_WRITE_CHUNKS];
        let len = chunks.len().min(MAX_WRITE_CHUNKS);
        for (slot, chunk) in slices.iter_mut().zip(chunks) {
            *slot = std::io::IoSlice::new(chunk);
        }
        Self { slices, len }
    }

    fn get(&self) -> &[std::io::IoSlice<'a>] {
        &self.slices[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use halfpipe_core::handshake::LegRole;
    use halfpipe_core::session::{SessionConfig, Side};
    use halfpipe_core::TargetAddr;

    use super::super::tests::leg_keys;
    use super::super::Control;
    use super::*;

    #[test]
    fn short_reads_share_one_allocation_and_bulk_reads_get_their_full_room() {
        let mut buf = BytesMut::with_capacity(APP_READ_MIN);
        let start = buf.as_ptr() as usize;
        // What the session still holds (unacknowledged), keeping the allocation shared.
        let mut held = Vec::new();
        let mut last = LastRead::default();
        // Short reads: each goes right after the last, in the same allocation.
        for i in 0..100 {
            let limit = read_room(&mut buf, APP_READ_MIN, last);
            assert_eq!(buf.as_ptr() as usize, start + i * 10, "read {i} moved");
            assert!((10..=APP_READ_MIN).contains(&limit));
            buf.extend_from_slice(&[i as u8; 10]);
            held.push(buf.split().freeze());
            last = LastRead { len: 10, limit };
        }
        // A read that filled its room asks for the full allowance again.
        let bulk = LastRead {
            len: 4096,
            limit: 4096,
        };
        assert_eq!(
            read_room(&mut buf, 4 * APP_READ_MIN, bulk),
            4 * APP_READ_MIN
        );
        assert!(buf.capacity() >= 4 * APP_READ_MIN);
        // Too little left for a short read's successor: a new allocation too.
        let mut small = BytesMut::with_capacity(APP_READ_MIN);
        small.extend_from_slice(&vec![0; APP_READ_MIN - SHORT_READ_SPARE + 1]);
        held.push(small.split().freeze());
        let short = LastRead {
            len: 10,
            limit: APP_READ_MIN,
        };
        assert_eq!(read_room(&mut small, APP_READ_MIN, short), APP_READ_MIN);
        // A rest that could not take the last read's size twice: a new allocation, so a
        // 10 KiB message repeated is never cut in two.
        let mut mid = BytesMut::with_capacity(APP_READ_MIN);
        mid.extend_from_slice(&[1; 10 * 1024]);
        held.push(mid.split().freeze());
        let ten_k = LastRead {
            len: 10 * 1024,
            limit: APP_READ_MIN,
        };
        assert_eq!(read_room(&mut mid, APP_READ_MIN, ten_k), APP_READ_MIN);
        // The bytes handed on are intact.
        assert!(held[..100]
            .iter()
            .enumerate()
            .all(|(i, b)| b[..] == [i as u8; 10]));
    }

    #[test]
    fn reads_shrink_to_the_minimum_as_the_pumps_hold_the_read_ahead_budget() {
        assert_eq!(
            read_allowance(APP_READ, 0),
            APP_READ,
            "one bulk stream reads fully"
        );
        assert_eq!(
            read_allowance(APP_READ, READ_AHEAD_BUDGET - APP_READ),
            APP_READ
        );
        assert_eq!(
            read_allowance(APP_READ, READ_AHEAD_BUDGET - 40_000),
            40_000,
            "cut to what is left"
        );
        for held in [
            READ_AHEAD_BUDGET - 1,
            READ_AHEAD_BUDGET,
            64 * READ_AHEAD_BUDGET,
        ] {
            assert_eq!(
                read_allowance(APP_READ, held),
                APP_READ_MIN,
                "never below the minimum"
            );
        }
        assert_eq!(
            read_allowance(APP_READ_MIN / 2, 0),
            APP_READ_MIN / 2,
            "never above want"
        );
    }

    #[test]
    fn held_bytes_are_released_as_the_session_takes_them_and_when_the_pump_ends() {
        let ahead = ReadAhead::default();
        let held_now = || ahead.0.load(std::sync::atomic::Ordering::Relaxed);
        let mut a = ahead.hold(100_000);
        {
            let mut b = ahead.hold(50_000);
            assert_eq!(held_now(), 150_000);
            b.shrink_to(20_000);
            assert_eq!(held_now(), 120_000);
            assert_eq!(ahead.allowance(APP_READ), APP_READ);
        } // b's pump ended holding 20 000
        assert_eq!(held_now(), 100_000);
        a.shrink_to(0);
        a.shrink_to(5); // cannot grow back
        assert_eq!(held_now(), 0);
        drop(a);
        assert_eq!(held_now(), 0);
        let _many: Vec<_> = (0..64).map(|_| ahead.hold(APP_READ)).collect();
        assert_eq!(ahead.allowance(APP_READ), APP_READ_MIN);
    }

    #[test]
    fn read_buffers_grow_with_full_reads_and_shrink_with_small_ones() {
        let mut w = APP_READ_MIN;
        for _ in 0..10 {
            w = next_read_size(w, w);
        }
        assert_eq!(w, APP_READ, "a bulk stream reaches the largest reads");
        assert_eq!(next_read_size(APP_READ, APP_READ / 2), APP_READ, "steady");
        let mut w = APP_READ;
        for _ in 0..10 {
            w = next_read_size(w, 1);
        }
        assert_eq!(
            w, APP_READ_MIN,
            "an interactive stream falls back to the least"
        );
    }

    /// A client and an exit tunnel joined by two in-memory legs, with one stream open
    /// between an application socket and a target socket (loopback TCP). The sockets'
    /// buffers are as small as the kernel allows when `small_buffers`.
    struct StreamPair {
        client: Arc<Tunnel>,
        exit: Arc<Tunnel>,
        client_stream: StreamId,
        exit_stream: StreamId,
        app: TcpStream,
        target: TcpStream,
    }

    /// Two connected loopback sockets; the first one's receive buffer and the second's send
    /// buffer are shrunk first when `small_buffers`.
    async fn socket_pair(small_buffers: bool) -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if small_buffers {
            socket.set_recv_buffer_size(4096).unwrap();
        }
        let (near, far) = tokio::join!(socket.connect(listener.local_addr().unwrap()), async {
            listener.accept().await.unwrap().0
        });
        if small_buffers {
            socket2::SockRef::from(&far)
                .set_send_buffer_size(4096)
                .unwrap();
        }
        (near.unwrap(), far)
    }

    async fn stream_pair(small_buffers: bool) -> StreamPair {
        let (client, _client_control) = Tunnel::new(Side::Client, SessionConfig::default());
        let (exit, mut control) = Tunnel::new(Side::Server, SessionConfig::default());
        for role in [LegRole::Up, LegRole::Down] {
            let (client_keys, exit_keys) = leg_keys();
            let (a, b) = tokio::io::duplex(256 * 1024);
            client
                .attach_leg(role, Box::new(a), &client_keys, 0)
                .unwrap();
            exit.attach_leg(role, Box::new(b), &exit_keys, 0).unwrap();
        }
        let opener = client.clone();
        let opening = tokio::spawn(async move {
            let target = TargetAddr::Domain("example.test".into(), 80);
            opener.open_stream(target, Duration::from_secs(20)).await
        });
        let exit_stream = match tokio::time::timeout(Duration::from_secs(20), control.recv()).await
        {
            Ok(Some(Control::StreamOpened { stream, .. })) => stream,
            other => panic!("expected a stream to open, got {other:?}"),
        };
        exit.open_result(exit_stream, ConnectStatus::Succeeded)
            .unwrap();
        let (client_stream, status) = opening.await.unwrap().unwrap();
        assert_eq!(status, ConnectStatus::Succeeded);
        let (app, client_end) = socket_pair(small_buffers).await;
        let (exit_end, target) = socket_pair(false).await;
        tokio::spawn(
            client
                .clone()
                .pump(client_stream, client_end, Bytes::new(), None),
        );
        tokio::spawn(exit.clone().pump(exit_stream, exit_end, Bytes::new(), None));
        StreamPair {
            client,
            exit,
            client_stream,
            exit_stream,
            app,
            target,
        }
    }

    /// Waits (20 s at most, else fails saying `what` never happened) until `done`.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{what} never happened");
    }

    /// `stream`'s signals in `tunnel`, while its pumps run.
    fn signals(tunnel: &Tunnel, stream: StreamId) -> Option<Arc<StreamSignals>> {
        lock(&tunnel.inner).signals.get(&stream).cloned()
    }

    /// Waits (bounded) until `stream`'s pump has lent its socket writer.
    async fn until_lent(tunnel: &Tunnel, stream: StreamId) {
        until("the pump lending its writer", || {
            signals(tunnel, stream).is_some_and(|s| lock(&s.lent).wr.is_some())
        })
        .await;
    }

    fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (bounded) until the counter `c` reaches `n`.
    async fn until_counted(c: &std::sync::atomic::AtomicU64, n: u64) {
        until(&format!("a count of {n}"), || count(c) >= n).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_streams_data_is_written_by_the_reader_and_its_fin_goes_to_the_pump() {
        let mut p = stream_pair(false).await;
        for round in 0..3u8 {
            until_lent(&p.exit, p.exit_stream).await;
            until_lent(&p.client, p.client_stream).await;
            let (exit_before, client_before) = (
                count(&p.exit.stats.delivered_by_reader),
                count(&p.client.stats.delivered_by_reader),
            );
            p.app.write_all(&[round; 3]).await.unwrap();
            let mut got = [0u8; 3];
            p.target.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round; 3]);
            p.target.write_all(&[round + 100]).await.unwrap();
            p.app.read_exact(&mut got[..1]).await.unwrap();
            assert_eq!(got[0], round + 100);
            // Each way, the reader wrote the bytes itself, in one delivery (counted just after
            // the write, so perhaps after the bytes arrived).
            until_counted(&p.exit.stats.delivered_by_reader, exit_before + 1).await;
            until_counted(&p.client.stats.delivered_by_reader, client_before + 1).await;
            assert_eq!(count(&p.exit.stats.delivered_by_reader), exit_before + 1);
            assert_eq!(
                count(&p.client.stats.delivered_by_reader),
                client_before + 1
            );
        }
        // The application finishes first; then the target's last bytes and FIN reach it as
        // a clean end (the FIN, delivered last, also ends the stream in the session).
        p.app.shutdown().await.unwrap();
        let mut none = Vec::new();
        p.target.read_to_end(&mut none).await.unwrap();
        assert!(none.is_empty());
        until_lent(&p.client, p.client_stream).await;
        p.target.write_all(b"last").await.unwrap();
        p.target.shutdown().await.unwrap();
        let mut rest = Vec::new();
        p.app
            .read_to_end(&mut rest)
            .await
            .expect("a clean end, not a reset");
        assert_eq!(rest, b"last");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_full_socket_cannot_take_is_left_to_the_pump_in_order() {
        let mut p = stream_pair(true).await;
        // The application reads nothing. The target sends small pieces, each once the last
        // one was delivered, so the reader writes every piece itself, until the socket is
        // full in the middle of one; the pump must then write the rest of it first.
        const PIECE: usize = 4096;
        let mut sent: Vec<u8> = Vec::new();
        let stats = &p.client.stats;
        let mut filled = false;
        for i in 0..4096 {
            until_lent(&p.client, p.client_stream).await;
            let whole = count(&stats.delivered_by_reader);
            let piece: Vec<u8> = (0..PIECE).map(|j| ((i * PIECE + j) % 251) as u8).collect();
            p.target.write_all(&piece).await.unwrap();
            sent.extend_from_slice(&piece);
            until("the piece delivered, or left to the pump", || {
                count(&stats.left_unwritten) > 0 || count(&stats.delivered_by_reader) > whole
            })
            .await;
            if count(&stats.left_unwritten) > 0 {
                filled = true;
                break;
            }
        }
        assert!(filled, "16 MiB went into a socket with a 4 KiB buffer");
        // More behind it, then the end; the application reads it all, in order.
        sent.extend_from_slice(&[7; 100_000]);
        p.target.write_all(&[7; 100_000]).await.unwrap();
        p.target.shutdown().await.unwrap();
        let mut got = Vec::with_capacity(sent.len());
        tokio::time::timeout(Duration::from_secs(60), p.app.read_to_end(&mut got))
            .await
            .expect("the stream stalled")
            .expect("a clean end, not a reset");
        assert!(
            got == sent,
            "bytes lost or out of order ({} of {})",
            got.len(),
            sent.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lent_writer_gone_missing_resets_the_stream_and_the_rest_goes_on() {
        let mut p = stream_pair(false).await;
        until_lent(&p.client, p.client_stream).await;
        // What no code path does: the writer vanishes from the slot while lent.
        let sig = signals(&p.client, p.client_stream).expect("the stream's signals");
        drop(lock(&sig.lent).wr.take());
        p.target.write_all(b"x").await.unwrap();
        // The pump notices when it wakes: the stream is reset, not a panic or a hang.
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(20), p.app.read(&mut buf))
            .await
            .expect("the application was left hanging");
        assert!(
            !matches!(read, Ok(n) if n > 0),
            "the application got data through a missing writer: {read:?}"
        );
        until("the stream's pumps ending", || {
            signals(&p.client, p.client_stream).is_none()
        })
        .await;
        // The session itself goes on.
        assert!(!p.client.is_closed() && !p.exit.is_closed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_reaches_an_application_that_sends_nothing() {
        let mut p = stream_pair(false).await;
        // Both pumps wait: the client's for its application, which stays quiet throughout.
        until_lent(&p.client, p.client_stream).await;
        // The exit resets it as its pumps do on a socket error or a limit.
        let exit_sig = signals(&p.exit, p.exit_stream).expect("the exit stream's signals");
        p.exit
            .reset_stream(p.exit_stream, &exit_sig, ResetCode::Cancelled);
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(20), p.app.read(&mut buf))
            .await
            .expect("a quiet application never learnt of the reset");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "a reset stream must end in a TCP reset"
        );
        until("the client's pumps ending", || {
            signals(&p.client, p.client_stream).is_none()
        })
        .await;
        // The exit's own pumps stop as well: its target sees the reset too.
        let read = tokio::time::timeout(Duration::from_secs(20), p.target.read(&mut buf))
            .await
            .expect("the exit's pumps went on after the reset");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        assert!(!p.client.is_closed() && !p.exit.is_closed());
    }

    #[test]
    fn consumed_bytes_leave_whole_chunks_and_cut_the_next() {
        let mut chunks: Vec<Bytes> = vec![
            b"abc".to_vec().into(),
            b"de".to_vec().into(),
            b"f".to_vec().into(),
        ];
        consume(&mut chunks, 0);
        assert_eq!(chunks.len(), 3);
        consume(&mut chunks, 4);
        assert_eq!(chunks, [Bytes::from_static(b"e"), Bytes::from_static(b"f")]);
        consume(&mut chunks, 2);
        assert!(chunks.is_empty());
    }
}
