//! Who writes a stream's application socket, and when.
//!
//! Received data normally reaches the application through the stream's down pump: the
//! receive-leg reader queues it in the session and wakes the pump, which writes it. For a
//! small delivery (an interactive reply, a request) that wake-up is most of the latency, so
//! the reader may write the socket itself when the pump is idle, as a one-task relay would.
//!
//! One [`AppWriter`] per stream decides who may write: a claim that the pump or the reader
//! takes, so bytes always leave in the order the session hands them out. The reader never
//! waits: it either claims at once or leaves the data to the pump. What the reader took
//! but the socket would not accept is handed back to the pump, which writes it first.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

/// Most bytes the reader writes to an application socket itself; more is left to the pump,
/// so bulk transfers keep reading the leg and writing the socket on separate tasks.
pub(super) const DIRECT_MAX: u64 = 16 * 1024;

/// Nobody is writing.
const FREE: u8 = 0;
/// The pump or the reader is writing.
const CLAIMED: u8 = 1;
/// The reader is writing and the pump waits for it to finish.
const CLAIMED_PUMP_WAITS: u8 = 2;
/// The pump has finished: nobody writes any more.
const RETIRED: u8 = 3;

/// What the reader took from the session but did not write.
#[derive(Default)]
pub(super) struct HandedBack {
    /// Bytes the socket did not accept, in order.
    pub chunks: Vec<Bytes>,
    /// The reader took the stream's FIN after them.
    pub fin: bool,
}

/// The arbitration over one stream's application socket.
#[derive(Default)]
pub(super) struct AppWriter {
    claim: AtomicU8,
    /// The socket's write half, shared with the pump; `None` when the reader must not
    /// write (a throttled stream, or before the pump starts and after it ends).
    socket: Mutex<Option<Arc<OwnedWriteHalf>>>,
    handed_back: Mutex<HandedBack>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AppWriter {
    /// Lets the reader write `socket` directly.
    pub fn share(&self, socket: Arc<OwnedWriteHalf>) {
        *lock(&self.socket) = Some(socket);
    }

    /// The pump takes the claim, waiting on `wake` while the reader holds it.
    pub async fn claim_for_pump(&self, wake: &Notify) {
        loop {
            match self
                .claim
                .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            {
                // (RETIRED cannot happen: the pump claims only before it retires.)
                Ok(_) | Err(RETIRED) => return,
                Err(_) => {}
            }
            // The reader holds it: ask to be woken when it lets go. If it let go in the
            // meantime, try again at once.
            let asked = self.claim.compare_exchange(
                CLAIMED,
                CLAIMED_PUMP_WAITS,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if matches!(asked, Ok(_) | Err(CLAIMED_PUMP_WAITS)) {
                wake.notified().await;
            }
        }
    }

    /// The pump lets go of the claim before it waits for more data.
    pub fn release_by_pump(&self) {
        self.claim.store(FREE, Ordering::Release);
    }

    /// The pump has finished: the reader never writes again, and the socket is the pump's
    /// alone once this returns (a reader mid-write finishes first).
    pub fn retire(&self) {
        self.claim.store(RETIRED, Ordering::Release);
        lock(&self.socket).take();
    }

    /// What the reader handed back, for the pump to write before anything newer.
    pub fn take_handed_back(&self) -> HandedBack {
        std::mem::take(&mut *lock(&self.handed_back))
    }

    /// The reader's turn: when the pump is idle and the reader may write, runs `deliver`
    /// with the socket under the claim. `deliver` returns what it could not write. Returns
    /// whether the pump must be woken (it was not free, it waits, or something was handed
    /// back).
    pub fn try_deliver(&self, deliver: impl FnOnce(&OwnedWriteHalf) -> Option<HandedBack>) -> bool {
        let socket = lock(&self.socket);
        let Some(socket) = socket.as_ref() else {
            return true;
        };
        if self
            .claim
            .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return true;
        }
        let rest = deliver(socket);
        let had_rest = rest.is_some();
        if let Some(rest) = rest {
            let mut back = lock(&self.handed_back);
            back.chunks.extend(rest.chunks);
            back.fin |= rest.fin;
        }
        let before = self.claim.swap(FREE, Ordering::Release);
        had_rest || before == CLAIMED_PUMP_WAITS
    }
}

/// Writes as much of `chunks` to `socket` as it takes now, without waiting; returns the
/// number of bytes written (`Err` only for a socket error other than would-block).
pub(super) fn try_write_chunks(
    socket: &OwnedWriteHalf,
    chunks: &[Bytes],
) -> std::io::Result<usize> {
    let mut total = 0;
    let mut first = 0;
    let mut skip = 0;
    while first < chunks.len() {
        let slices = io_slices(&chunks[first..], skip);
        match socket.try_write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                total += n;
                (first, skip) = advance(chunks, first, skip, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Writes every chunk to `socket`, waiting for room, and empties `chunks`.
pub(super) async fn write_all_chunks(
    socket: &OwnedWriteHalf,
    chunks: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut first = 0;
    let mut skip = 0;
    while first < chunks.len() {
        let n = {
            let slices = io_slices(&chunks[first..], skip);
            match socket.try_write_vectored(&slices) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            socket.writable().await?;
            continue;
        }
        (first, skip) = advance(chunks, first, skip, n);
    }
    chunks.clear();
    Ok(())
}

/// What is left of `chunks` after the first `written` bytes.
pub(super) fn remainder(chunks: Vec<Bytes>, written: usize) -> Vec<Bytes> {
    let (first, skip) = advance(&chunks, 0, 0, written);
    let mut rest: Vec<Bytes> = chunks.into_iter().skip(first).collect();
    if let Some(c) = rest.first_mut() {
        *c = c.slice(skip..);
    }
    rest
}

fn io_slices(chunks: &[Bytes], skip: usize) -> Vec<std::io::IoSlice<'_>> {
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| std::io::IoSlice::new(if i == 0 { &c[skip..] } else { c }))
        .collect()
}

/// The position (chunk index, bytes into it) `n` bytes after (`first`, `skip`).
fn advance(chunks: &[Bytes], mut first: usize, mut skip: usize, mut n: usize) -> (usize, usize) {
    while n > 0 && first < chunks.len() {
        let left = chunks[first].len() - skip;
        if n >= left {
            n -= left;
            first += 1;
            skip = 0;
        } else {
            skip += n;
            n = 0;
        }
    }
    (first, skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::from_static(p)).collect()
    }

    #[test]
    fn remainder_cuts_inside_and_between_chunks() {
        let c = chunks(&[b"abc", b"de", b"fgh"]);
        let flat = |v: Vec<Bytes>| v.concat();
        assert_eq!(flat(remainder(c.clone(), 0)), b"abcdefgh");
        assert_eq!(flat(remainder(c.clone(), 2)), b"cdefgh");
        assert_eq!(flat(remainder(c.clone(), 3)), b"defgh");
        assert_eq!(flat(remainder(c.clone(), 6)), b"gh");
        assert!(remainder(c, 8).is_empty());
    }

    async fn socket_pair() -> (Arc<OwnedWriteHalf>, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = l.accept().await.unwrap();
        let (_rd, wr) = a.into_split();
        std::mem::forget(_rd); // keep the socket open for the test's length
        (Arc::new(wr), b)
    }

    #[tokio::test]
    async fn the_reader_writes_only_when_the_pump_is_idle() {
        let w = AppWriter::default();
        let wake = Notify::new();
        // No socket shared: the pump must do it.
        assert!(w.try_deliver(|_| panic!("no socket to write")));
        let (socket, _peer) = socket_pair().await;
        w.share(socket);
        w.claim_for_pump(&wake).await;
        assert!(w.try_deliver(|_| panic!("the pump holds the claim")));
        w.release_by_pump();
        let mut ran = false;
        assert!(!w.try_deliver(|_| {
            ran = true;
            None
        }));
        assert!(ran, "a free claim lets the reader write");
        w.retire();
        assert!(w.try_deliver(|_| panic!("a retired writer is the pump's")));
    }

    #[tokio::test]
    async fn what_the_reader_hands_back_reaches_the_pump_in_order() {
        let w = AppWriter::default();
        let (socket, _peer) = socket_pair().await;
        w.share(socket);
        assert!(w.try_deliver(|_| Some(HandedBack {
            chunks: chunks(&[b"one"]),
            fin: false
        })));
        assert!(w.try_deliver(|_| Some(HandedBack {
            chunks: chunks(&[b"two"]),
            fin: true
        })));
        let back = w.take_handed_back();
        assert_eq!(back.chunks.concat(), b"onetwo");
        assert!(back.fin);
        assert!(w.take_handed_back().chunks.is_empty());
    }

    #[tokio::test]
    async fn a_pump_waiting_for_the_reader_is_woken_when_it_lets_go() {
        let w = Arc::new(AppWriter::default());
        let wake = Arc::new(Notify::new());
        let (socket, _peer) = socket_pair().await;
        w.share(socket);
        let (in_deliver, mut entered) = tokio::sync::mpsc::channel::<()>(1);
        let (let_go, go) = std::sync::mpsc::channel::<()>();
        // The reader holds the claim on a blocking thread until told to let go.
        let reader = {
            let w = w.clone();
            tokio::task::spawn_blocking(move || {
                w.try_deliver(|_| {
                    in_deliver.blocking_send(()).unwrap();
                    go.recv().unwrap();
                    None
                })
            })
        };
        entered.recv().await.unwrap();
        let pump = {
            let (w, wake) = (w.clone(), wake.clone());
            tokio::spawn(async move { w.claim_for_pump(&wake).await })
        };
        // The pump cannot claim yet; wait until it has asked to be woken.
        while w.claim.load(Ordering::Acquire) != CLAIMED_PUMP_WAITS {
            tokio::task::yield_now().await;
        }
        assert!(!pump.is_finished());
        let_go.send(()).unwrap();
        let wake_pump = reader.await.unwrap();
        assert!(wake_pump, "the reader says the waiting pump must be woken");
        wake.notify_one();
        tokio::time::timeout(std::time::Duration::from_secs(10), pump)
            .await
            .expect("the pump gets the claim")
            .unwrap();
        assert_eq!(w.claim.load(Ordering::Acquire), CLAIMED);
    }

    #[tokio::test]
    async fn try_write_chunks_stops_when_the_socket_is_full() {
        let (socket, mut peer) = socket_pair().await;
        let big = Bytes::from(vec![7u8; 64 * 1024 * 1024]);
        let n = try_write_chunks(&socket, std::slice::from_ref(&big)).unwrap();
        assert!(n > 0 && n < big.len(), "wrote {n} of {}", big.len());
        let mut rest = remainder(vec![big], n);
        let drain = tokio::spawn(async move {
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 20];
            while got < 64 * 1024 * 1024 {
                got += tokio::io::AsyncReadExt::read(&mut peer, &mut buf)
                    .await
                    .unwrap();
            }
            got
        });
        write_all_chunks(&socket, &mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(drain.await.unwrap(), 64 * 1024 * 1024);
    }
}
