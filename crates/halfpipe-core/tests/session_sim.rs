//! Deterministic simulation of a client and a server session over two legs, with injected
//! time, leg loss and hostile input. No sockets: records are passed as plaintext queues.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use halfpipe_core::frame::{CloseCode, Frame, ResetCode, MAX_RECORD_PAYLOAD, MIN_RECORD_PAYLOAD};
use halfpipe_core::session::{
    CloseReason, Event, Recv, Session, SessionConfig, SessionError, Side,
};
use halfpipe_core::{ConnectStatus, TargetAddr};

/// A tiny deterministic PRNG (xorshift) so loss patterns are reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Sim {
    now: Instant,
    client_ack_delay: Duration,
    client: Session,
    server: Session,
    up: VecDeque<Bytes>,
    down: VecDeque<Bytes>,
    client_events: Vec<Event>,
    server_events: Vec<Event>,
    /// The most plaintext each leg's records carry (a TLS record's, or the default).
    record_limit: usize,
}

impl Sim {
    fn new(config: SessionConfig) -> Self {
        let now = Instant::now();
        let mut sim = Self {
            now,
            client_ack_delay: config.ack_delay,
            client: Session::new(Side::Client, config.clone(), now),
            server: Session::new(Side::Server, config, now),
            up: VecDeque::new(),
            down: VecDeque::new(),
            client_events: Vec::new(),
            server_events: Vec::new(),
            record_limit: MAX_RECORD_PAYLOAD,
        };
        sim.attach_up();
        sim.attach_down();
        sim
    }

    /// A new uplink: the handshake tells the client the server's recv_next.
    fn attach_up(&mut self) {
        let n = self.server.recv_next();
        self.client.attach_send_leg(self.now, Some(n)).unwrap();
        self.server.attach_recv_leg(self.now);
    }

    /// A new downlink: the handshake tells the server the client's recv_next.
    fn attach_down(&mut self) {
        let n = self.client.recv_next();
        self.server.attach_send_leg(self.now, Some(n)).unwrap();
        self.client.attach_recv_leg(self.now);
    }

    fn kill_up(&mut self) {
        self.up.clear();
        self.client.detach_send_leg(self.now);
        self.server.detach_recv_leg(self.now);
    }

    fn kill_down(&mut self) {
        self.down.clear();
        self.server.detach_send_leg(self.now);
        self.client.detach_recv_leg(self.now);
    }

    /// Moves at most `budget` records each way; returns whether anything moved.
    fn step(&mut self, budget: usize) -> bool {
        let mut moved = false;
        for _ in 0..budget {
            let limit = self.record_limit;
            let mut buf = Vec::new();
            if self.client.poll_transmit_up_to(self.now, &mut buf, limit) > 0 {
                assert!(buf.len() <= limit, "{} > {limit}", buf.len());
                self.up.push_back(Bytes::from(buf));
            }
            let mut buf = Vec::new();
            if self.server.poll_transmit_up_to(self.now, &mut buf, limit) > 0 {
                assert!(buf.len() <= limit, "{} > {limit}", buf.len());
                self.down.push_back(Bytes::from(buf));
            }
        }
        for _ in 0..budget {
            if let Some(r) = self.up.pop_front() {
                self.server.handle_record(self.now, r).unwrap();
                moved = true;
            }
            if let Some(r) = self.down.pop_front() {
                self.client.handle_record(self.now, r).unwrap();
                moved = true;
            }
        }
        while let Some(e) = self.client.poll_event() {
            self.client_events.push(e);
        }
        while let Some(e) = self.server.poll_event() {
            self.server_events.push(e);
        }
        moved
    }

    /// Runs until nothing moves, letting delayed ACKs fall due (time advances by the ACK
    /// delay whenever the legs go quiet).
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if self.step(64) {
                continue;
            }
            self.now += self.client_ack_delay;
            self.client.handle_timeout(self.now);
            self.server.handle_timeout(self.now);
            if !self.step(64) {
                return;
            }
        }
        panic!("simulation did not settle");
    }

    fn open(&mut self) -> u32 {
        let id = self
            .client
            .open_stream(TargetAddr::Domain("example.com".into(), 443))
            .unwrap();
        self.settle();
        assert!(self.server_events.contains(&Event::StreamOpened {
            stream: id,
            target: TargetAddr::Domain("example.com".into(), 443)
        }));
        self.server
            .open_result(id, ConnectStatus::Succeeded)
            .unwrap();
        self.settle();
        assert!(self.client_events.contains(&Event::Connected {
            stream: id,
            status: ConnectStatus::Succeeded
        }));
        id
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `data` from `tx` to `rx` on `stream`, reading everything, with a hook run between
/// steps (used to kill legs). Returns what `rx` received.
fn transfer(
    sim: &mut Sim,
    stream: u32,
    data: &[u8],
    client_to_server: bool,
    mut hook: impl FnMut(&mut Sim, usize),
) -> Vec<u8> {
    let mut pending = Bytes::copy_from_slice(data);
    let mut got = Vec::new();
    let mut finished = false;
    let mut fin_seen = false;
    for round in 0..100_000 {
        let (tx, _rx) = if client_to_server {
            (&mut sim.client, &mut sim.server)
        } else {
            (&mut sim.server, &mut sim.client)
        };
        if !pending.is_empty() {
            tx.send(stream, &mut pending).unwrap();
        } else if !finished {
            tx.finish(stream).unwrap();
            finished = true;
        }
        sim.step(4);
        hook(sim, round);
        let rx = if client_to_server {
            &mut sim.server
        } else {
            &mut sim.client
        };
        loop {
            match rx.recv(stream) {
                Ok(Recv::Data(d)) => got.extend_from_slice(&d),
                Ok(Recv::Fin) => {
                    fin_seen = true;
                    break;
                }
                Ok(Recv::Blocked) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        if fin_seen {
            return got;
        }
    }
    panic!(
        "transfer did not finish: got {} of {}",
        got.len(),
        data.len()
    );
}

#[test]
fn stream_roundtrip_both_ways_and_reaped() {
    let mut sim = Sim::new(SessionConfig::default());
    let id = sim.open();
    let up = pattern(3 << 20, 1);
    let down = pattern(5 << 20, 2);
    assert_eq!(transfer(&mut sim, id, &up, true, |_, _| {}), up);
    assert_eq!(transfer(&mut sim, id, &down, false, |_, _| {}), down);
    sim.settle();
    assert_eq!(sim.client.stream_count(), 0);
    assert_eq!(sim.server.stream_count(), 0);
    assert_eq!(sim.client.unacked(), (0, 0));
    assert_eq!(sim.server.unacked(), (0, 0));
}

#[test]
fn records_sized_for_tls_carry_everything_and_never_exceed_a_tls_record() {
    // Legs whose records are TLS records hold 16 KiB each: every DATA frame still fits,
    // with the acknowledgements and credit that ride along, in both directions and across
    // leg loss.
    let mut sim = Sim::new(SessionConfig::default());
    sim.record_limit = MIN_RECORD_PAYLOAD;
    let id = sim.open();
    let up = pattern(3 << 20, 3);
    let down = pattern(3 << 20, 4);
    let mut kill = |sim: &mut Sim, round: usize| {
        if round % 97 == 50 {
            sim.kill_down();
            sim.attach_down();
        }
    };
    assert_eq!(transfer(&mut sim, id, &up, true, &mut kill), up);
    assert_eq!(transfer(&mut sim, id, &down, false, &mut kill), down);
    sim.settle();
    assert_eq!(sim.client.unacked(), (0, 0));
    assert_eq!(sim.server.unacked(), (0, 0));
}

#[test]
fn leg_loss_mid_stream_loses_and_duplicates_nothing() {
    // Kill the uplink, the downlink, or both at pseudo-random points; every byte must still
    // arrive exactly once and in order, in both directions.
    for seed in 1..=12u64 {
        let mut sim = Sim::new(SessionConfig::default());
        let id = sim.open();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut kills = 0;
        let mut hook = |sim: &mut Sim, _round: usize| {
            if rng.below(3) == 0 {
                kills += 1;
                match rng.below(3) {
                    0 => {
                        sim.kill_up();
                        sim.attach_up();
                    }
                    1 => {
                        sim.kill_down();
                        sim.attach_down();
                    }
                    _ => {
                        sim.kill_up();
                        sim.kill_down();
                        sim.attach_down();
                        sim.attach_up();
                    }
                }
            }
        };
        let up = pattern(2 << 20, seed as u8);
        assert_eq!(
            transfer(&mut sim, id, &up, true, &mut hook),
            up,
            "seed {seed}"
        );
        let down = pattern(2 << 20, seed as u8 ^ 0x55);
        assert_eq!(
            transfer(&mut sim, id, &down, false, &mut hook),
            down,
            "seed {seed}"
        );
        assert!(kills >= 2, "seed {seed}: only {kills} kills");
    }
}

#[test]
fn reattach_without_handshake_ack_retransmits_and_receiver_drops_duplicates() {
    let mut sim = Sim::new(SessionConfig::default());
    let id = sim.open();
    let data = pattern(600_000, 9);
    let mut pending = Bytes::copy_from_slice(&data);
    sim.client.send(id, &mut pending).unwrap();
    sim.step(8);
    // The uplink dies after delivering some records, and the new one is attached without
    // the server's recv_next (as if the handshake reply carried a stale value): the client
    // rewinds to its last ACK and resends frames the server already has.
    sim.up.clear();
    sim.client.detach_send_leg(sim.now);
    sim.server.detach_recv_leg(sim.now);
    sim.client.attach_send_leg(sim.now, None).unwrap();
    sim.server.attach_recv_leg(sim.now);
    sim.settle();
    let mut got = Vec::new();
    while let Ok(Recv::Data(d)) = sim.server.recv(id) {
        got.extend_from_slice(&d);
    }
    assert_eq!(got.len(), data.len() - pending.len());
    assert_eq!(&got[..], &data[..got.len()]);
}

#[test]
fn window_exhaustion_bounds_buffers_and_writable_follows_reading() {
    let config = SessionConfig {
        stream_window: 300_000,
        session_window: 1_000_000,
        ..SessionConfig::default()
    };
    let mut sim = Sim::new(config);
    let id = sim.open();
    let mut pending = Bytes::from(pattern(5_000_000, 3));
    for _ in 0..50 {
        let _ = sim.client.send(id, &mut pending).unwrap();
        sim.settle();
    }
    // The server app never read: the client can send no more, and the server holds at most
    // the window it advertised.
    assert_eq!(sim.client.send_capacity(id), 0);
    assert!(
        sim.server.buffered() <= 300_000,
        "{}",
        sim.server.buffered()
    );
    // All of it on the one stream, none on another.
    assert_eq!(sim.server.buffered_on(id), sim.server.buffered());
    assert!(sim.server.buffered_on(id) > 0);
    assert_eq!(sim.server.buffered_on(id + 4), 0);
    assert!(pending.len() >= 5_000_000 - 300_000);
    assert!(sim.client.unacked().1 == 0, "everything sent was acked");
    // Reading frees credit, and the blocked writer is woken.
    while let Ok(Recv::Data(_)) = sim.server.recv(id) {}
    sim.client_events.clear();
    sim.settle();
    assert!(sim.client_events.contains(&Event::Writable(id)));
    assert!(sim.client.send_capacity(id) > 0);
}

#[test]
fn retransmit_buffer_is_capped_when_peer_never_acks() {
    let (mut c, now, target) = client_capped_at(200_000);
    let id = c.open_stream(target).unwrap();
    let mut data = Bytes::from(vec![0u8; 1_000_000]);
    let mut sink = Vec::new();
    for _ in 0..100 {
        c.send(id, &mut data).unwrap();
        c.poll_transmit(now, &mut sink);
    }
    // The cap holds the DATA bytes and the frames' places in the queue (64 bytes each).
    let (frames, data) = c.unacked();
    assert!(
        data + frames as u64 * 64 <= 200_000,
        "{frames} frames, {data} bytes"
    );
    assert!(data > 190_000, "{data} bytes");
}

#[test]
fn one_byte_writes_to_a_peer_that_never_acks_fill_the_cap_with_few_frames() {
    let (mut c, now, target) = client_capped_at(64 * 1024);
    let id = c.open_stream(target).unwrap();
    let mut sink = Vec::new();
    let mut writes = 0;
    while c.send(id, &mut Bytes::from_static(b"x")).unwrap() == 1 {
        c.poll_transmit(now, &mut sink);
        sink.clear();
        writes += 1;
        assert!(writes < 100_000, "1-byte writes were never refused");
    }
    // Each frame is charged its place in the queue: 65 bytes of the cap, not 1.
    let (frames, data) = c.unacked();
    assert!(frames <= 64 * 1024 / 64, "{frames} frames held");
    assert_eq!(data, writes);
}

#[test]
fn a_peer_that_withholds_acks_while_opening_streams_is_closed_before_the_queue_grows() {
    let (mut s, now) = server_with(SessionConfig {
        max_streams: 1,
        max_unacked: 64 * 1024,
        ..SessionConfig::default()
    });
    s.handle_record(now, record(&[Frame::Resume { seq: 0 }]))
        .unwrap();
    let mut sink = Vec::new();
    let mut stream = 0;
    let refused = loop {
        stream += 1;
        assert!(stream < 100_000, "the session never closed");
        // Past the first, every OPEN is refused with an RST the peer never acknowledges.
        let open = Frame::Open {
            stream,
            target: TargetAddr::Domain("a.example".into(), 80),
        };
        if let Err(e) = s.handle_record(now, record(&[open])) {
            break e;
        }
        s.poll_transmit(now, &mut sink);
        sink.clear();
    };
    assert!(
        matches!(refused, SessionError::PeerNotAcknowledging { .. }),
        "{refused}"
    );
    assert!(s.is_closed());
    let (frames, _) = s.unacked();
    assert!(frames <= 2 * 64 * 1024 / 64 + 2, "{frames} frames held");
    assert!(
        matches!(
            closed_with(&mut s),
            Some(CloseReason::ProtocolError(
                SessionError::PeerNotAcknowledging { .. }
            ))
        ),
        "closed for the wrong reason"
    );
    // A record after the close is refused, not processed.
    assert_eq!(
        s.handle_record(now, record(&[Frame::Ping])),
        Err(SessionError::SessionClosed)
    );
}

#[test]
fn fin_and_rst_in_every_state() {
    let mut sim = Sim::new(SessionConfig::default());

    // RST before the exit has connected.
    let a = sim
        .client
        .open_stream(TargetAddr::Ip("127.0.0.1:1".parse().unwrap()))
        .unwrap();
    sim.client.reset(a, ResetCode::Cancelled).unwrap();
    sim.settle();
    assert!(sim.server_events.contains(&Event::Reset {
        stream: a,
        code: ResetCode::Cancelled
    }));
    assert!(matches!(
        sim.server.open_result(a, ConnectStatus::Succeeded),
        Err(SessionError::StreamClosed(_))
    ));

    // A refused connect ends the stream on both sides.
    let b = sim
        .client
        .open_stream(TargetAddr::Ip("127.0.0.1:2".parse().unwrap()))
        .unwrap();
    sim.settle();
    sim.server
        .open_result(b, ConnectStatus::ConnectionRefused)
        .unwrap();
    sim.settle();
    assert!(sim.client_events.contains(&Event::Connected {
        stream: b,
        status: ConnectStatus::ConnectionRefused
    }));
    assert!(matches!(sim.client.send_capacity(b), 0));

    // Half-close one way, then keep sending the other way, then RST after FIN.
    let c = sim.open();
    sim.client.finish(c).unwrap();
    assert!(matches!(
        sim.client.finish(c),
        Err(SessionError::StreamClosed(_))
    ));
    assert!(matches!(
        sim.client.send(c, &mut Bytes::from_static(b"x")),
        Err(SessionError::StreamClosed(_))
    ));
    sim.settle();
    assert_eq!(sim.server.recv(c).unwrap(), Recv::Fin);
    let mut d = Bytes::from_static(b"still flowing down");
    sim.server.send(c, &mut d).unwrap();
    sim.settle();
    assert_eq!(
        sim.client.recv(c).unwrap(),
        Recv::Data(Bytes::from_static(b"still flowing down"))
    );
    sim.server.reset(c, ResetCode::TargetError).unwrap();
    sim.settle();
    assert!(sim.client_events.contains(&Event::Reset {
        stream: c,
        code: ResetCode::TargetError
    }));
    assert!(sim.client.recv(c).is_err());

    // Both FINs: the stream is reaped on both sides once read.
    let e = sim.open();
    sim.client.finish(e).unwrap();
    sim.server.finish(e).unwrap();
    sim.settle();
    assert_eq!(sim.server.recv(e).unwrap(), Recv::Fin);
    assert_eq!(sim.client.recv(e).unwrap(), Recv::Fin);
    assert_eq!(sim.client.stream_count(), 0);
    assert_eq!(sim.server.stream_count(), 0);

    // Data arriving for a stream already reset here is discarded but its credit returned.
    let f = sim.open();
    let mut big = Bytes::from(vec![1u8; 100_000]);
    sim.client.send(f, &mut big).unwrap();
    sim.server.reset(f, ResetCode::Cancelled).unwrap();
    sim.settle();
    assert_eq!(sim.server.buffered(), 0);
}

fn record(frames: &[Frame]) -> Bytes {
    let mut out = Vec::new();
    for f in frames {
        f.encode(&mut out);
    }
    Bytes::from(out)
}

fn fresh_server() -> (Session, Instant) {
    server_with(SessionConfig::default())
}

/// A server session under `config` with both legs attached.
fn server_with(config: SessionConfig) -> (Session, Instant) {
    let now = Instant::now();
    let mut s = Session::new(Side::Server, config, now);
    s.attach_recv_leg(now);
    s.attach_send_leg(now, Some(0)).unwrap();
    (s, now)
}

/// A client session with a send leg whose retransmit cap is `max_unacked`, and a
/// destination for its streams (never dialled: sessions do not touch the network).
fn client_capped_at(max_unacked: u64) -> (Session, Instant, TargetAddr) {
    let config = SessionConfig {
        max_unacked,
        ..SessionConfig::default()
    };
    let now = Instant::now();
    let mut c = Session::new(Side::Client, config, now);
    c.attach_send_leg(now, None).unwrap();
    (c, now, TargetAddr::Ip("192.0.2.1:80".parse().unwrap()))
}

/// A server session whose peer has opened stream 1 (sequence numbers 0 and 1 used).
fn server_with_stream_1() -> (Session, Instant) {
    let (mut s, now) = fresh_server();
    let open = Frame::Open {
        stream: 1,
        target: TargetAddr::Domain("a.example".into(), 1),
    };
    s.handle_record(now, record(&[Frame::Resume { seq: 0 }, open]))
        .unwrap();
    (s, now)
}

/// A record with `len` bytes of DATA for stream 1, in a buffer of its own.
fn data_record(len: usize) -> Bytes {
    record(&[Frame::Data {
        stream: 1,
        data: Bytes::from(vec![9u8; len]),
    }])
}

fn closed_with(s: &mut Session) -> Option<CloseReason> {
    while let Some(e) = s.poll_event() {
        if let Event::Closed(r) = e {
            return Some(r);
        }
    }
    None
}

#[test]
fn hostile_records_close_only_that_session_with_a_precise_reason() {
    let open = Frame::Open {
        stream: 1,
        target: TargetAddr::Domain("a.example".into(), 1),
    };
    let cases: Vec<(Bytes, SessionError)> = vec![
        (
            Bytes::from_static(&[0xee]),
            SessionError::Frame(halfpipe_core::frame::FrameError::UnknownType(0xee)),
        ),
        (
            record(std::slice::from_ref(&open)),
            SessionError::MissingResume,
        ),
        (
            record(&[Frame::Resume { seq: 5 }, open.clone()]),
            SessionError::SequenceGap {
                expected: 0,
                got: 5,
            },
        ),
        (
            record(&[Frame::Resume { seq: u64::MAX }, open.clone()]),
            SessionError::SequenceGap {
                expected: 0,
                got: u64::MAX,
            },
        ),
        (
            record(&[Frame::Ack { next_seq: 3 }]),
            SessionError::AckBeyondSent { acked: 3, sent: 0 },
        ),
        (
            record(&[
                Frame::Resume { seq: 0 },
                Frame::Data {
                    stream: 1,
                    data: Bytes::from_static(b"x"),
                },
            ]),
            SessionError::UnknownStream(1),
        ),
        (
            record(&[
                Frame::Resume { seq: 0 },
                open.clone(),
                Frame::Open {
                    stream: 1,
                    target: TargetAddr::Domain("b".into(), 2),
                },
            ]),
            SessionError::StreamIdReused(1),
        ),
        (
            record(&[
                Frame::Resume { seq: 0 },
                Frame::OpenResult {
                    stream: 1,
                    status: ConnectStatus::Succeeded,
                },
            ]),
            SessionError::UnexpectedFrame("OPEN_RESULT sent to a server"),
        ),
        (
            record(&[
                Frame::Resume { seq: 0 },
                open.clone(),
                Frame::Fin { stream: 1 },
                Frame::Data {
                    stream: 1,
                    data: Bytes::from_static(b"late"),
                },
            ]),
            SessionError::UnexpectedFrame("DATA after FIN"),
        ),
    ];
    for (rec, want) in cases {
        let (mut s, now) = fresh_server();
        assert_eq!(
            s.handle_record(now, rec.clone()),
            Err(want.clone()),
            "{rec:?}"
        );
        assert!(s.is_closed());
        assert_eq!(closed_with(&mut s), Some(CloseReason::ProtocolError(want)));
        // The CLOSE goes out to the peer.
        let mut out = Vec::new();
        assert!(s.poll_transmit(now, &mut out) > 0);
        assert!(out.ends_with(&[0x06, CloseCode::ProtocolError as u8]));
    }
}

#[test]
fn flow_control_violations_are_refused() {
    // Stream window: the peer may not exceed the initial stream credit.
    let (mut s, now) = fresh_server();
    let mut frames = vec![
        Frame::Resume { seq: 0 },
        Frame::Open {
            stream: 1,
            target: TargetAddr::Domain("a".into(), 1),
        },
    ];
    let chunk = Bytes::from(vec![0u8; 32 * 1024]);
    for _ in 0..(halfpipe_core::session::INITIAL_STREAM_CREDIT / (32 * 1024)) {
        frames.push(Frame::Data {
            stream: 1,
            data: chunk.clone(),
        });
    }
    // Send them in records of 1 frame each.
    for f in &frames {
        assert_eq!(
            s.handle_record(now, record(std::slice::from_ref(f))),
            Ok(())
        );
    }
    // The server has meanwhile advertised a bigger stream window; exceed the session one.
    let r = (0..1000)
        .map(|_| {
            s.handle_record(
                now,
                record(&[Frame::Data {
                    stream: 1,
                    data: chunk.clone(),
                }]),
            )
        })
        .find(|r| r.is_err());
    assert!(
        matches!(
            r,
            Some(Err(SessionError::StreamFlowControl(1)))
                | Some(Err(SessionError::SessionFlowControl))
        ),
        "{r:?}"
    );
}

#[test]
fn timers_keepalive_silence_idle_and_resume_window() {
    let config = SessionConfig {
        keepalive: Duration::from_secs(10),
        leg_silence: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(100),
        resume_window: Duration::from_secs(60),
        ..SessionConfig::default()
    };
    let mut sim = Sim::new(config.clone());
    sim.settle();
    // Keepalive: after 10 s of nothing, a PING goes out.
    sim.now += Duration::from_secs(10);
    let mut out = Vec::new();
    assert_eq!(sim.client.poll_transmit(sim.now, &mut out), 1);
    assert_eq!(out, vec![0x14]);
    // Silence: the server's receive leg heard nothing for 30 s.
    sim.now += Duration::from_secs(30);
    assert!(sim.server.poll_timeout().unwrap() <= sim.now);
    sim.server.handle_timeout(sim.now);
    assert_eq!(sim.server.poll_event(), Some(Event::RecvLegSilent));
    // Idle: no stream for 100 s closes the session.
    sim.now += Duration::from_secs(60);
    sim.client.handle_timeout(sim.now);
    assert_eq!(closed_with(&mut sim.client), Some(CloseReason::Idle));

    // Resume window: a leg down for longer than 60 s ends the session, even with streams.
    let mut sim = Sim::new(config);
    let id = sim.open();
    let _ = id;
    sim.kill_down();
    sim.now += Duration::from_secs(59);
    sim.server.handle_timeout(sim.now);
    assert!(!sim.server.is_closed());
    sim.now += Duration::from_secs(1);
    assert_eq!(sim.server.poll_timeout(), Some(sim.now));
    sim.server.handle_timeout(sim.now);
    let mut reasons = Vec::new();
    while let Some(e) = sim.server.poll_event() {
        reasons.push(e);
    }
    assert!(reasons.contains(&Event::Reset {
        stream: id,
        code: ResetCode::SessionClosing
    }));
    assert_eq!(
        reasons.last(),
        Some(&Event::Closed(CloseReason::ResumeWindowExpired))
    );
}

#[test]
fn an_overdue_keepalive_is_asked_for_again_one_interval_later_not_at_once() {
    let config = SessionConfig {
        keepalive: Duration::from_secs(10),
        leg_silence: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(100),
        ..SessionConfig::default()
    };
    let mut sim = Sim::new(config);
    sim.settle();
    sim.now += Duration::from_secs(10);
    assert!(
        sim.client.poll_timeout().unwrap() <= sim.now,
        "keepalive due"
    );
    // The driver is told; its writer cannot send yet (a peer that does not read).
    sim.client.handle_timeout(sim.now);
    assert!(sim.client.keepalive_due(sim.now));
    let next = sim.client.poll_timeout().unwrap();
    assert!(
        next > sim.now,
        "the overdue keepalive still counts: {next:?}"
    );
    assert_eq!(
        next,
        sim.now + Duration::from_secs(10),
        "asked again an interval on"
    );
    // Once the writer sends (here the PING itself), the next keepalive counts again.
    sim.now += Duration::from_secs(1);
    let mut out = Vec::new();
    assert_eq!(sim.client.poll_transmit(sim.now, &mut out), 1);
    assert_eq!(
        sim.client.poll_timeout(),
        Some(sim.now + Duration::from_secs(10))
    );
}

#[test]
fn stream_limit_refuses_excess_streams() {
    let config = SessionConfig {
        max_streams: 2,
        ..SessionConfig::default()
    };
    let mut sim = Sim::new(config);
    let t = TargetAddr::Domain("x".into(), 1);
    sim.client.open_stream(t.clone()).unwrap();
    sim.client.open_stream(t.clone()).unwrap();
    assert_eq!(sim.client.open_stream(t), Err(SessionError::StreamLimit(2)));
}

#[test]
fn writer_blocked_on_retransmit_room_is_woken_by_ack() {
    // Credit is plentiful; only the sender's own retransmit cap limits it.
    let config = SessionConfig {
        max_unacked: 100_000,
        ..SessionConfig::default()
    };
    let mut sim = Sim::new(config);
    let id = sim.open();
    let mut data = Bytes::from(vec![5u8; 150_000]);
    // All of the cap but the frames' places in the queue (64 bytes each).
    let taken = sim.client.send(id, &mut data).unwrap();
    assert!((99_000..100_000).contains(&taken), "{taken}");
    assert_eq!(sim.client.send_capacity(id), 0);
    sim.client_events.clear();
    sim.settle();
    assert!(
        sim.client_events.contains(&Event::Writable(id)),
        "{:?}",
        sim.client_events
    );
    assert!(sim.client.send_capacity(id) > 0);
}

#[test]
fn acks_are_delayed_until_count_or_timer_then_ride_along() {
    let config = SessionConfig {
        ack_delay: Duration::from_millis(5),
        ack_every: 4,
        ..SessionConfig::default()
    };
    let mut sim = Sim::new(config);
    let id = sim.open();
    // Two DATA frames: below the count, so the server has nothing urgent to send.
    let mut d = Bytes::from(vec![1u8; 2 * halfpipe_core::frame::DATA_CHUNK]);
    sim.client.send(id, &mut d).unwrap();
    let mut buf = Vec::new();
    assert!(sim.client.poll_transmit(sim.now, &mut buf) > 0);
    sim.server.handle_record(sim.now, Bytes::from(buf)).unwrap();
    while sim
        .server
        .recv(id)
        .is_ok_and(|r| matches!(r, Recv::Data(_)))
    {}
    let (frames_held, _) = sim.client.unacked();
    assert_eq!(frames_held, 2);
    // Credit updates may be pending from reading; only the ACK is under test here.
    let due = sim.server.poll_timeout().unwrap();
    assert!(due <= sim.now + Duration::from_millis(5));
    sim.now += Duration::from_millis(5);
    sim.server.handle_timeout(sim.now);
    assert!(
        sim.server.wants_transmit(),
        "the ACK is due after the delay"
    );
    sim.settle();
    assert_eq!(sim.client.unacked(), (0, 0));
    // Four frames reach the count: the ACK is wanted at once, without the timer.
    let mut d = Bytes::from(vec![2u8; 4 * halfpipe_core::frame::DATA_CHUNK]);
    sim.client.send(id, &mut d).unwrap();
    loop {
        let mut buf = Vec::new();
        if sim.client.poll_transmit(sim.now, &mut buf) == 0 {
            break;
        }
        sim.server.handle_record(sim.now, Bytes::from(buf)).unwrap();
    }
    assert!(sim.server.wants_transmit());
}

#[test]
fn a_shrunk_session_window_bounds_the_peer_once_granted_credit_is_used_and_a_larger_one_at_once() {
    let config = SessionConfig {
        stream_window: 300_000,
        session_window: 2_000_000,
        ..SessionConfig::default()
    };
    assert_eq!(config.share(config.session_window, 4), 500_000);
    assert_eq!(
        config.share(config.session_window, 16),
        300_000,
        "never below a stream"
    );
    assert_eq!(config.share(config.session_window, 0), 2_000_000);
    let mut sim = Sim::new(config);
    let ids: Vec<u32> = (0..4).map(|_| sim.open()).collect();
    let mut pendings = vec![Bytes::from(pattern(20_000_000, 5)); ids.len()];
    // Sends until the windows stop the client, then returns what the exit holds.
    let mut fill = |sim: &mut Sim| {
        for _ in 0..50 {
            for (id, p) in ids.iter().zip(pendings.iter_mut()) {
                let _ = sim.client.send(*id, p).unwrap();
            }
            sim.settle();
        }
        sim.server.buffered()
    };
    let drain = |sim: &mut Sim| {
        for id in 1..=4 {
            while let Ok(Recv::Data(_)) = sim.server.recv(id) {}
        }
        sim.settle();
    };
    let before = fill(&mut sim);
    assert!(
        before > 1_000_000,
        "four streams filled their windows: {before}"
    );
    sim.server.set_session_window(500_000);
    assert_eq!(sim.server.session_window(), 500_000);
    // Credit granted under the old window is used up first, then the new one holds.
    let mut held = Vec::new();
    for _ in 0..3 {
        drain(&mut sim);
        held.push(fill(&mut sim));
    }
    assert!(held[2] <= 500_000, "the shrunk window held {held:?}");
    assert!(held[2] >= 250_000, "credit still flows: {held:?}");
    drain(&mut sim);
    sim.server.set_session_window(2_000_000);
    sim.settle();
    // (Each stream's own credit, granted in halves of its window, now bounds it.)
    let after = fill(&mut sim);
    assert!(
        after > 500_000,
        "a larger window is granted at once: {after}"
    );
}

#[test]
fn small_data_queued_for_the_application_does_not_hold_the_record_it_came_in() {
    let (mut s, now) = server_with_stream_1();
    let first = data_record(1);
    s.handle_record(now, first.clone()).unwrap();
    // The byte waits for the application, but as a copy: the record is free.
    assert_eq!(s.buffered(), 1);
    assert!(first.is_unique());
    // Bulk stays a slice of its record (copying it would cost the download rate).
    let bulk = data_record(16 * 1024);
    s.handle_record(now, bulk.clone()).unwrap();
    assert!(!bulk.is_unique());
    assert!(matches!(s.recv(1), Ok(halfpipe_core::session::Recv::Data(d)) if d.len() == 1));
    assert!(matches!(s.recv(1), Ok(halfpipe_core::session::Recv::Data(d)) if d.len() == 16 * 1024));
    assert!(bulk.is_unique());
}

#[test]
fn queued_bulk_holds_at_most_max_buffers_read_buffers() {
    use halfpipe_core::recv_queue::{MAX_BUFFERS, SHARE_FROM};
    let (mut s, now) = server_with_stream_1();
    // Each record alone in its buffer, each with one bulk-sized payload the application
    // never reads, as a hostile peer would send them.
    let records: Vec<Bytes> = (0..MAX_BUFFERS + 50)
        .map(|_| data_record(SHARE_FROM))
        .collect();
    for r in &records {
        s.handle_record(now, r.clone()).unwrap();
    }
    assert_eq!(s.buffered(), ((MAX_BUFFERS + 50) * SHARE_FROM) as u64);
    let held = records.iter().filter(|r| !r.is_unique()).count();
    assert_eq!(held, MAX_BUFFERS);
}

#[test]
fn a_client_whose_peer_stops_acknowledging_refuses_new_streams_and_stays_open() {
    let (mut c, now, target) = client_capped_at(64 * 1024);
    let mut sink = Vec::new();
    let mut opened = 0;
    let refused = loop {
        // Applications that connect and give up at once, while no ACK comes back.
        match c.open_stream(target.clone()) {
            Ok(id) => c.reset(id, ResetCode::Cancelled).unwrap(),
            Err(e) => break e,
        }
        c.poll_transmit(now, &mut sink);
        sink.clear();
        opened += 1;
        assert!(opened < 100_000, "new streams were never refused");
    };
    assert!(
        matches!(refused, SessionError::PeerNotAcknowledging { .. }),
        "{refused}"
    );
    assert!(!c.is_closed(), "a stalled peer must not close the session");
    let (frames, _) = c.unacked();
    assert!(frames <= 64 * 1024 / 64 + 1, "{frames} frames held");
}

#[test]
fn a_writer_blocked_by_control_frames_in_the_queue_is_woken_when_they_are_acknowledged() {
    let (mut c, now, target) = client_capped_at(64 * 1024);
    c.attach_recv_leg(now);
    let kept = c.open_stream(target.clone()).unwrap();
    // Streams opened and reset until their OPEN and RST frames fill the cap.
    while let Ok(id) = c.open_stream(target.clone()) {
        c.reset(id, ResetCode::Cancelled).unwrap();
    }
    let mut sink = Vec::new();
    c.poll_transmit(now, &mut sink);
    assert_eq!(c.send(kept, &mut Bytes::from_static(b"x")).unwrap(), 0);
    while c.poll_event().is_some() {}
    // The peer acknowledges every frame: no DATA was among them, but the room is back.
    let (frames, data) = c.unacked();
    assert_eq!(data, 0);
    c.handle_record(
        now,
        record(&[Frame::Ack {
            next_seq: frames as u64,
        }]),
    )
    .unwrap();
    let mut events = Vec::new();
    while let Some(e) = c.poll_event() {
        events.push(e);
    }
    assert!(events.contains(&Event::Writable(kept)), "{events:?}");
    assert_eq!(c.send(kept, &mut Bytes::from_static(b"x")).unwrap(), 1);
}

#[test]
fn a_new_receive_leg_s_buffer_ids_never_join_the_old_leg_s_buffers() {
    use halfpipe_core::recv_queue::{MAX_BUFFERS, SHARE_FROM};
    let (mut s, now) = server_with_stream_1();
    // The old leg's reader fills the count with buffers 1..=MAX_BUFFERS.
    let old: Vec<Bytes> = (0..MAX_BUFFERS).map(|_| data_record(SHARE_FROM)).collect();
    for (id, r) in (1..).zip(&old) {
        s.handle_record_in(now, r.clone(), id).unwrap();
    }
    assert!(old.iter().all(|r| !r.is_unique()));
    // A new leg, whose reader counts from 1 again: its buffer MAX_BUFFERS is another
    // buffer, so with the count full its bulk is copied, not added to the old one's.
    s.attach_recv_leg(now);
    let resume = Frame::Resume {
        seq: 1 + MAX_BUFFERS as u64,
    };
    s.handle_record(now, record(&[resume])).unwrap();
    let new = data_record(SHARE_FROM);
    s.handle_record_in(now, new.clone(), MAX_BUFFERS as u64)
        .unwrap();
    assert!(
        new.is_unique(),
        "the new leg's buffer joined an old one's count"
    );
}
