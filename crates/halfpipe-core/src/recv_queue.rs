//! A stream's received bytes, waiting for the application.
//!
//! A DATA frame's payload arrives as a slice of the receive leg's read buffer, and a slice
//! keeps its whole buffer (about 128 KiB) alive. Queued as they came, one-byte payloads,
//! which a peer can send to an application that does not read, would each hold a buffer:
//! a stream's 2 MiB window could hold 250 GiB. So:
//!
//! - payloads under [`SHARE_FROM`] bytes are copied, gathered into chunks of
//!   [`GATHER_CHUNK`] bytes, so that a payload costs no more than its bytes and a share
//!   of a queue entry;
//! - larger ones stay slices of their read buffer (copying every payload of a transfer
//!   cost a tenth of its rate in A/B runs) while the session's slices, queued or on their
//!   way to the application, hold fewer than [`MAX_BUFFERS`] read buffers
//!   ([`SharedBuffers`]), and are copied past that.
//!
//! A session's received data thus holds at most [`MAX_BUFFERS`] read buffers besides its
//! window's bytes, and an application that keeps up never meets the copying.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};

/// Payloads of this many bytes or more are queued as slices of the read buffer they
/// arrived in (a queue entry and a buffer count cost them under a tenth); smaller ones
/// are copied.
pub const SHARE_FROM: usize = 1024;
/// Size of the chunks small payloads are copied into.
pub const GATHER_CHUNK: usize = 16 * 1024;
/// Most read buffers one session's received slices may hold (about 128 KiB each: 16 MiB,
/// twice the default session window, which bulk at a full window holds in 64).
pub const MAX_BUFFERS: usize = 128;

/// Which read buffer a record was opened in: records with the same id share one. An id
/// may be used for several buffers only if it is never reused after a buffer changes.
pub type BufferId = u64;

/// The id of a record whose buffer is unknown: it is counted as a buffer of its own.
pub const RECORD_ALONE: BufferId = BufferId::MAX;

/// Counts the read buffers a session's received slices hold, wherever the slices are.
#[derive(Debug, Default)]
pub struct SharedBuffers {
    alive: Arc<AtomicUsize>,
    /// The buffer the last shared slice came from, while any slice of it is alive.
    current: Option<(BufferId, Weak<Held>)>,
}

impl SharedBuffers {
    /// Buffers held now.
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::Relaxed)
    }

    /// A new reader numbers its buffers from the start again: no id of the old one may
    /// name a buffer of the new one.
    pub fn new_reader(&mut self) {
        self.current = None;
    }

    /// `data` (from buffer `buffer`) as a slice that holds its buffer's count until it and
    /// every clone and slice of it are dropped; `Err(data)` when that would take one buffer
    /// more than [`MAX_BUFFERS`].
    fn share(&mut self, data: Bytes, buffer: BufferId) -> Result<Bytes, Bytes> {
        let same = self
            .current
            .as_ref()
            .filter(|(id, _)| *id == buffer && buffer != RECORD_ALONE)
            .and_then(|(_, held)| held.upgrade());
        let held = match same {
            Some(held) => held,
            None if self.alive() < MAX_BUFFERS => {
                self.alive.fetch_add(1, Ordering::Relaxed);
                let held = Arc::new(Held(Arc::clone(&self.alive)));
                self.current = Some((buffer, Arc::downgrade(&held)));
                held
            }
            None => return Err(data),
        };
        Ok(Bytes::from_owner(Counted {
            data,
            _buffer: held,
        }))
    }
}

/// One read buffer counted in [`SharedBuffers`] while a slice of it is alive.
#[derive(Debug)]
struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A shared slice with its buffer's count.
struct Counted {
    data: Bytes,
    _buffer: Arc<Held>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// Received bytes of one stream, in order.
#[derive(Debug, Default)]
pub struct RecvQueue {
    /// Whole pieces, oldest first; all of them come before `gathering`.
    pieces: VecDeque<Bytes>,
    /// Small payloads gathered since the last piece (the newest bytes).
    gathering: BytesMut,
}

impl RecvQueue {
    /// Appends `data`, which arrived in read buffer `buffer`: itself when it is large and
    /// `shared` has room, else a copy.
    pub fn push(&mut self, data: Bytes, buffer: BufferId, shared: &mut SharedBuffers) {
        if data.len() >= SHARE_FROM {
            self.close_gathering();
            let piece = shared
                .share(data, buffer)
                .unwrap_or_else(|data| Bytes::copy_from_slice(&data));
            self.pieces.push_back(piece);
            return;
        }
        if self.gathering.capacity() - self.gathering.len() < data.len() {
            self.close_gathering();
            // A fresh chunk: what was split off the old one keeps that one alive only as
            // long as the application has not taken it.
            self.gathering = BytesMut::with_capacity(GATHER_CHUNK);
        }
        self.gathering.extend_from_slice(&data);
    }

    /// Takes the oldest bytes, if any.
    pub fn pop(&mut self) -> Option<Bytes> {
        if let Some(piece) = self.pieces.pop_front() {
            return Some(piece);
        }
        (!self.gathering.is_empty()).then(|| self.gathering.split().freeze())
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.gathering.is_empty()
    }

    /// Ends the gathering chunk's current piece, so that what comes next follows it.
    fn close_gathering(&mut self) {
        if !self.gathering.is_empty() {
            self.pieces.push_back(self.gathering.split().freeze());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut RecvQueue) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = q.pop() {
            assert!(!b.is_empty(), "an empty piece");
            out.extend_from_slice(&b);
        }
        assert!(q.is_empty());
        out
    }

    #[test]
    fn bytes_come_out_in_order_whatever_the_mix_of_sizes() {
        let (mut q, mut shared) = (RecvQueue::default(), SharedBuffers::default());
        let mut want = Vec::new();
        let sizes = [1, 5000, 3, 8191, 8192, 16_384, 2, 16_383, 7, 16_000, 1];
        for (i, &n) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            q.push(Bytes::from(data.clone()), i as BufferId, &mut shared);
            want.extend_from_slice(&data);
            if i % 3 == 2 {
                // Interleaved takes must not reorder what is left.
                let got = q.pop().unwrap();
                assert_eq!(&want[..got.len()], &got[..]);
                want.drain(..got.len());
            }
        }
        assert_eq!(drain(&mut q), want);
        assert_eq!(shared.alive(), 0);
    }

    #[test]
    fn a_small_payload_does_not_hold_its_read_buffer_and_a_large_one_does() {
        let read_buffer = Bytes::from(vec![7u8; 128 * 1024]);
        let (mut q, mut shared) = (RecvQueue::default(), SharedBuffers::default());
        q.push(read_buffer.slice(10..11), 0, &mut shared);
        q.push(read_buffer.slice(100..100 + SHARE_FROM - 1), 0, &mut shared);
        // No queued piece refers to the read buffer.
        assert!(read_buffer.is_unique());
        q.push(read_buffer.slice(..SHARE_FROM), 0, &mut shared);
        q.push(read_buffer.slice(..SHARE_FROM), 0, &mut shared);
        assert!(!read_buffer.is_unique(), "bulk is not copied");
        assert_eq!(shared.alive(), 1, "two slices of one buffer count once");
        assert_eq!(drain(&mut q), vec![7u8; 3 * SHARE_FROM]);
        assert!(read_buffer.is_unique());
        assert_eq!(shared.alive(), 0);
    }

    #[test]
    fn a_flood_of_one_byte_payloads_costs_about_a_byte_each() {
        let (mut q, mut shared) = (RecvQueue::default(), SharedBuffers::default());
        for i in 0..100_000u32 {
            q.push(
                Bytes::copy_from_slice(&[i as u8]),
                u64::from(i),
                &mut shared,
            );
        }
        // 100 000 bytes gathered into 16 KiB chunks: 7 pieces, not 100 000.
        assert!(
            q.pieces.len() <= 100_000 / GATHER_CHUNK + 1,
            "{}",
            q.pieces.len()
        );
        assert_eq!(drain(&mut q).len(), 100_000);
    }

    #[test]
    fn past_max_buffers_held_bulk_is_copied_until_the_application_lets_one_go() {
        // Each payload from a buffer of its own, as a hostile peer would arrange.
        let buffers: Vec<Bytes> = (0..MAX_BUFFERS + 2)
            .map(|_| Bytes::from(vec![1u8; 64 * 1024]))
            .collect();
        let (mut q, mut shared) = (RecvQueue::default(), SharedBuffers::default());
        for (id, b) in buffers.iter().enumerate() {
            q.push(b.slice(..SHARE_FROM), id as BufferId, &mut shared);
        }
        assert_eq!(shared.alive(), MAX_BUFFERS);
        let held = buffers.iter().filter(|b| !b.is_unique()).count();
        assert_eq!(held, MAX_BUFFERS, "the last two were copied");
        // What the application took and dropped makes room again; what it still holds
        // (a slice of a piece) still counts.
        let first = q.pop().unwrap();
        let part = first.slice(1..);
        drop(first);
        assert_eq!(shared.alive(), MAX_BUFFERS);
        drop(part);
        assert_eq!(shared.alive(), MAX_BUFFERS - 1);
        let again = Bytes::from(vec![2u8; 64 * 1024]);
        q.push(again.slice(..SHARE_FROM), 1000, &mut shared);
        assert!(!again.is_unique());
        assert_eq!(shared.alive(), MAX_BUFFERS);
        // A buffer already held takes more slices at no count.
        q.push(again.slice(SHARE_FROM..), 1000, &mut shared);
        assert_eq!(shared.alive(), MAX_BUFFERS);
    }

    #[test]
    fn a_new_reader_s_ids_never_name_the_old_reader_s_buffers() {
        let (mut q, mut shared) = (RecvQueue::default(), SharedBuffers::default());
        let (old, new) = (Bytes::from(vec![1u8; 4096]), Bytes::from(vec![2u8; 4096]));
        q.push(old.slice(..SHARE_FROM), 1, &mut shared);
        shared.new_reader();
        // The new leg's reader starts its ids again: its buffer 1 is another buffer.
        q.push(new.slice(..SHARE_FROM), 1, &mut shared);
        assert_eq!(shared.alive(), 2);
    }
}
