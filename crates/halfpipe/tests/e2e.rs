//! End-to-end tests on loopback: real sockets, real TLS, real Noise, in one process.

mod common;
#[path = "e2e/control_plane.rs"]
mod control_plane;
#[path = "e2e/users_keys.rs"]
mod users_keys;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use halfpipe_core::handshake::{
    ClientHello, HandshakeKeys, HelloStatus, Initiator, LegRole, SessionId, SERVER_PREAMBLE_LEN,
};
use halfpipe_core::session::SessionConfig;
use halfpipe_core::TargetAddr;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

fn is_release() -> bool {
    !cfg!(debug_assertions)
}

/// The data-plane suite, run for every transport and for mixed pairs: integrity under
/// load, leg kills, and the slow-reader memory bound.
macro_rules! data_plane_suite {
    ($($name:ident: $up:literal / $down:literal;)*) => {$(
        mod $name {
            use super::*;
            fn opts() -> Opts {
                Opts { legs: [$up, $down], ..Opts::default() }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sixty_four_streams_each_way_hash_identical() {
                super::sixty_four_streams_each_way_hash_identical(opts()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn killing_uplink_then_downlink_then_both_loses_nothing() {
                super::killing_uplink_then_downlink_then_both_loses_nothing(opts()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn slow_reader_keeps_exit_memory_within_its_window() {
                super::slow_reader_keeps_exit_memory_within_its_window(opts()).await
            }
        }
    )*};
}

data_plane_suite! {
    tls: "tls" / "tls";
    tcp: "tcp" / "tcp";
    quic: "quic" / "quic";
    quic_up_tls_down: "quic" / "tls";
    tls_up_quic_down: "tls" / "quic";
    ws: "ws" / "ws";
    wss: "wss" / "wss";
    wss_up_quic_down: "wss" / "quic";
    wt: "wt" / "wt";
    wt_up_wss_down: "wt" / "wss";
}

async fn sixty_four_streams_each_way_hash_identical(opts: Opts) {
    let pool = opts.sessions;
    let h = start(opts).await;
    let echo = echo_server().await;
    // 64 MiB each way per stream in release builds (the CI profile); 2 MiB in debug builds.
    let per_stream = if is_release() { 64 * MIB } else { 2 * MIB };
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let socks = h.socks;
        tasks.push(tokio::spawn(async move {
            let (code, s) = socks_connect(socks, &TargetAddr::Ip(echo)).await;
            assert_eq!(code, 0, "stream {i}");
            echo_transfer(s, per_stream, i * 7919).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (sent, got, n) = t.await.unwrap();
        assert_eq!(n, per_stream, "stream {i} length");
        assert_eq!(sent, got, "stream {i} hash");
    }
    let sessions = h.server.session_count();
    assert!(
        (1..=pool).contains(&sessions),
        "the client's pool holds at most {pool} sessions, the exit saw {sessions}"
    );
}

/// The suites above run on the default pool; `sessions = 1` puts all 64 streams on one
/// session (with the whole window), and the exit must see exactly that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_streams_on_one_session_hash_identical() {
    sixty_four_streams_each_way_hash_identical(Opts {
        sessions: 1,
        ..Opts::default()
    })
    .await
}

/// Opens a stream through `socks` to the echo server, checks it works, and keeps it open.
async fn held_stream(socks: SocketAddr, echo: SocketAddr) -> TcpStream {
    let (code, mut s) = socks_connect(socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0);
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spread_over_the_session_pool_up_to_its_size() {
    let h = start(Opts {
        sessions: 3,
        ..Opts::default()
    })
    .await;
    let echo = echo_server().await;
    let mut held = Vec::new();
    for n in 1..=3 {
        held.push(held_stream(h.socks, echo).await);
        assert_eq!(
            h.exit.session_ids().len(),
            n,
            "stream {n} opens session {n}"
        );
        assert_eq!(h.server.session_count(), n);
        // The user's sessions share the exit's window, as the client's pool shares its own.
        let config = SessionConfig::default();
        let share = config.share(config.session_window, n);
        assert!(share < config.session_window || n == 1);
        assert_eq!(h.server.session_windows(), vec![share; n], "{n} sessions");
    }
    // The pool is full: the fourth and fifth streams share the least-loaded sessions.
    held.push(held_stream(h.socks, echo).await);
    held.push(held_stream(h.socks, echo).await);
    assert_eq!(h.server.session_count(), 3);
    assert_eq!(h.exit.session_ids().len(), 3);
    drop(held);
}

/// Two streams held open at once run on a single session of the exit.
async fn two_streams_share_one_session(opts: Opts) {
    let h = start(opts).await;
    let echo = echo_server().await;
    let a = held_stream(h.socks, echo).await;
    let b = held_stream(h.socks, echo).await;
    assert_eq!(h.server.session_count(), 1);
    assert_eq!(h.exit.session_ids().len(), 1);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_one_keeps_every_stream_on_one_session() {
    two_streams_share_one_session(Opts {
        sessions: 1,
        ..Opts::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_the_exit_caps_shares_the_live_session() {
    // A pool of two, but the exit allows one session per user: the client's second
    // session is refused, and the second stream goes onto the first session instead of
    // failing.
    two_streams_share_one_session(Opts {
        sessions: 2,
        ..limited(10, 1)
    })
    .await
}

async fn killing_uplink_then_downlink_then_both_loses_nothing(opts: Opts) {
    let h = start(opts).await;
    let echo = echo_server().await;
    let total = if is_release() { 256 * MIB } else { 24 * MIB };
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0);
    let sid = h.exit.session_id().await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut hs = Sha256::new();
        let mut sent = 0;
        let mut i = 0u64;
        while sent < total {
            let chunk = payload(MIB, 1000 + i);
            hs.update(&chunk);
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
            i += 1;
        }
        w.shutdown().await.unwrap();
        hs.finalize()
    });
    let mut hr = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let marks = [total / 4, total / 2, 3 * total / 4];
    let mut next_mark = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), r.read(&mut buf))
            .await
            .expect("transfer stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        hr.update(&buf[..n]);
        got += n;
        if next_mark < marks.len() && got >= marks[next_mark] {
            match next_mark {
                0 => h.exit.kill_leg(LegRole::Up).await,
                1 => h.exit.kill_leg(LegRole::Down).await,
                _ => {
                    h.exit.kill_leg(LegRole::Up).await;
                    h.exit.kill_leg(LegRole::Down).await;
                }
            }
            next_mark += 1;
        }
    }
    assert_eq!(next_mark, 3, "all three kills happened mid-transfer");
    assert_eq!(got, total);
    assert_eq!(writer.await.unwrap(), hr.finalize(), "SHA-256 of echo");
    assert_eq!(h.exit.session_id().await, Some(sid), "same session id");
    let sessions = h.server.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].0, sid);
}

async fn slow_reader_keeps_exit_memory_within_its_window(opts: Opts) {
    let session = SessionConfig {
        stream_window: MIB as u64,
        session_window: 4 * MIB as u64,
        max_unacked: 4 * MIB as u64,
        ..SessionConfig::default()
    };
    let h = start(Opts {
        session: session.clone(),
        ..opts
    })
    .await;
    // A source that writes as fast as it can, towards an application that never reads.
    let src = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let src_addr = src.local_addr().unwrap();
    let (wrote_tx, mut wrote_rx) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        let (mut s, _) = src.accept().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut total = 0;
        while s.write_all(&chunk).await.is_ok() {
            total += chunk.len();
            let _ = wrote_tx.send(total);
        }
    });
    let (code, app) = socks_connect(h.socks, &TargetAddr::Ip(src_addr)).await;
    assert_eq!(code, 0);
    // Wait until the source is blocked: its count stops moving for a while. (The bound
    // asserted below holds at every instant; waiting only makes the check meaningful.)
    let mut last = 0;
    while let Ok(Ok(())) =
        tokio::time::timeout(Duration::from_millis(500), wrote_rx.changed()).await
    {
        last = *wrote_rx.borrow();
    }
    assert!(last > 0, "the source wrote something");
    let held = h.server.buffered_bytes();
    // The exit holds at most what the client's window allows unacknowledged (plus the
    // retransmit cap), however much the source tried to write.
    assert!(
        held <= session.max_unacked + session.stream_window,
        "exit holds {held} bytes"
    );
    drop(app);
}

/// Opens a TLS connection to the exit's first leg listener.
async fn tls_to_exit(h: &Harness) -> tokio_rustls::client::TlsStream<TcpStream> {
    let url = &h.urls[0];
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .unwrap();
    let tls = h.tls.clone().unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.config);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Message 1 of an uplink handshake for `keys` naming `session` at `epoch`.
fn message_one(
    h: &Harness,
    keys: &HandshakeKeys,
    session: SessionId,
    epoch: u32,
) -> (Initiator, Vec<u8>) {
    let hello = ClientHello {
        role: LegRole::Up,
        session_id: session,
        epoch,
        timestamp_ms: now_ms(),
        recv_next: 0,
        channel_binding: None,
    };
    Initiator::start(keys, &h.server_public, &hello).unwrap()
}

/// Sends `msg1` on a fresh leg and returns every byte the exit sends back before it closes
/// the connection (its handshake timeout is 2 s in tests; the wait is bounded).
async fn send_message_one(h: &Harness, msg1: &[u8]) -> Vec<u8> {
    let mut s = tls_to_exit(h).await;
    s.write_all(msg1).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    got
}

/// Builds message 1 for `keys` naming `session` and returns the exit's raw answer.
async fn raw_leg_handshake(
    h: &Harness,
    keys: &HandshakeKeys,
    session: SessionId,
    epoch: u32,
) -> Vec<u8> {
    let (_init, msg1) = message_one(h, keys, session, epoch);
    send_message_one(h, &msg1).await
}

/// Completes a handshake and returns the exit's verdict.
async fn leg_verdict(
    h: &Harness,
    keys: &HandshakeKeys,
    session: SessionId,
    epoch: u32,
) -> HelloStatus {
    verdict_on(h, tls_to_exit(h).await, keys, session, epoch).await
}

/// Completes a handshake on an established TLS leg and returns the exit's verdict.
async fn verdict_on(
    h: &Harness,
    mut s: tokio_rustls::client::TlsStream<TcpStream>,
    keys: &HandshakeKeys,
    session: SessionId,
    epoch: u32,
) -> HelloStatus {
    let (init, msg1) = message_one(h, keys, session, epoch);
    s.write_all(&msg1).await.unwrap();
    let mut pre = [0u8; SERVER_PREAMBLE_LEN];
    s.read_exact(&mut pre).await.unwrap();
    let mut msg2 = vec![0u8; u16::from_be_bytes(pre) as usize];
    s.read_exact(&mut msg2).await.unwrap();
    init.finish(&msg2).unwrap().0.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_handshake_gets_silence_and_old_epoch_is_refused() {
    let h = start(Opts::default()).await;
    let sid = SessionId::random();
    let (_init, msg1) = message_one(&h, &h.user_keys, sid, 1);
    let first = send_message_one(&h, &msg1).await;
    assert!(
        first.len() >= SERVER_PREAMBLE_LEN,
        "the original is answered"
    );
    let replay = send_message_one(&h, &msg1).await;
    assert!(
        replay.is_empty(),
        "a byte-identical replay gets {} bytes",
        replay.len()
    );
    // A fresh handshake for the same leg role with an epoch not above the current one is
    // an out-of-order (older) leg: refused with a verdict, since the peer authenticated.
    assert_eq!(
        leg_verdict(&h, &h.user_keys, sid, 1).await,
        HelloStatus::StaleEpoch
    );
    assert_eq!(
        leg_verdict(&h, &h.user_keys, sid, 2).await,
        HelloStatus::Accepted
    );
    // A later leg of a session the exit never held is a resume of a lost session: the
    // client is told to start afresh rather than handed a session it cannot continue.
    assert_eq!(
        leg_verdict(&h, &h.user_keys, SessionId::random(), 3).await,
        HelloStatus::UnknownSession
    );
}

/// The verdict on a leg that opens a new session.
async fn new_session(h: &Harness, keys: &HandshakeKeys) -> HelloStatus {
    leg_verdict(h, keys, SessionId::random(), 1).await
}

fn limited(max_sessions: usize, max_sessions_per_user: usize) -> Opts {
    Opts {
        limits: halfpipe::server::ServerLimits {
            max_sessions,
            max_sessions_per_user,
            handshake_timeout: Duration::from_secs(2),
            ..halfpipe::server::ServerLimits::default()
        },
        ..Opts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_and_total_session_limits_refuse_with_a_verdict() {
    let h = start(limited(10, 1)).await;
    assert_eq!(new_session(&h, &h.user_keys).await, HelloStatus::Accepted);
    assert_eq!(
        new_session(&h, &h.user_keys).await,
        HelloStatus::UserSessionLimit
    );
    assert_eq!(
        new_session(&h, &h.other_user_keys).await,
        HelloStatus::Accepted
    );
    assert_eq!(h.server.session_count(), 2);

    let h = start(limited(2, 10)).await;
    assert_eq!(new_session(&h, &h.user_keys).await, HelloStatus::Accepted);
    assert_eq!(
        new_session(&h, &h.other_user_keys).await,
        HelloStatus::Accepted
    );
    assert_eq!(
        new_session(&h, &h.user_keys).await,
        HelloStatus::SessionLimit
    );
    assert_eq!(h.server.session_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_user_naming_a_session_id_is_refused_and_session_untouched() {
    let h = start(Opts::default()).await;
    let echo = echo_server().await;
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0);
    let sid = h.exit.session_id().await.unwrap();
    let reply = raw_leg_handshake(&h, &h.other_user_keys, sid, 99).await;
    assert!(reply.is_empty(), "hijacker got {} bytes back", reply.len());
    // The real session still works on the same stream.
    let (a, b, n) = echo_transfer(s, 4 * MIB, 5).await;
    assert_eq!((a, n), (b, 4 * MIB));
    assert_eq!(h.server.sessions(), vec![(sid, "alice".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_gets_no_byte_back() {
    let h = start(Opts::default()).await;
    let (private_key, _) = halfpipe_core::handshake::generate_keypair().unwrap();
    let stranger = HandshakeKeys {
        suite: halfpipe_core::record::CipherSuite::Aes256Gcm,
        private_key,
        psk: None,
    };
    let reply = raw_leg_handshake(&h, &stranger, SessionId::random(), 1).await;
    assert!(reply.is_empty(), "stranger got {} bytes", reply.len());
    // And the exit answers a real user right after: a control, so silence above is not
    // simply a dead server.
    let reply = raw_leg_handshake(&h, &h.user_keys.clone(), SessionId::random(), 1).await;
    assert!(
        reply.len() >= SERVER_PREAMBLE_LEN,
        "registered user got a reply"
    );
    assert_eq!(h.server.session_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_targets_are_denied_by_default_with_not_allowed() {
    let h = start(Opts {
        allow_loopback: false,
        ..Opts::default()
    })
    .await;
    let echo = echo_server().await;
    let v6: SocketAddr = format!("[::1]:{}", echo.port()).parse().unwrap();
    for target in [
        TargetAddr::Ip(echo),
        TargetAddr::Ip(v6),
        TargetAddr::Domain("localhost".into(), echo.port()),
    ] {
        let (code, _) = socks_connect(h.socks, &target).await;
        assert_eq!(code, 2, "{target} must be refused as not allowed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_garbage_gets_precise_replies_and_listener_keeps_serving() {
    let h = start(Opts::default()).await;
    let echo = echo_server().await;
    // Wrong version: closed without a reply.
    let mut s = TcpStream::connect(h.socks).await.unwrap();
    s.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(buf.len() <= 2);
    // BIND: command not supported (7).
    let mut s = TcpStream::connect(h.socks).await.unwrap();
    s.write_all(&[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80])
        .await
        .unwrap();
    let mut r = [0u8; 4];
    s.read_exact(&mut r[..2]).await.unwrap();
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r[1], 7);
    // Unknown address type (8).
    let mut s = TcpStream::connect(h.socks).await.unwrap();
    s.write_all(&[5, 1, 0, 5, 1, 0, 9, 1, 2]).await.unwrap();
    s.read_exact(&mut r[..2]).await.unwrap();
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r[1], 8);
    // Truncated request: the peer goes away mid-request.
    let mut s = TcpStream::connect(h.socks).await.unwrap();
    s.write_all(&[5, 1]).await.unwrap();
    drop(s);
    // Still serving.
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0);
    let (a, b, _) = echo_transfer(s, 1024, 3).await;
    assert_eq!(a, b);
}

/// A one-page HTTP server on 127.0.0.1.
async fn web_page(body: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_socks5_and_http_connect() {
    let curl = tool("curl");
    let h = start(Opts::default()).await;
    let page = web_page("hello through halfpipe").await;
    let url = format!("http://127.0.0.1:{}/", page.port());
    for proxy in [
        format!("socks5h://{}", h.socks),
        format!("http://{}", h.http),
    ] {
        let mut args = vec!["-sS", "--max-time", "20", "-x", &proxy];
        if proxy.starts_with("http://") {
            args.push("--proxytunnel");
        }
        args.push(&url);
        let out = tokio::process::Command::new(&curl)
            .args(&args)
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("all_proxy")
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{proxy}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello through halfpipe",
            "{proxy}"
        );
    }
}

/// Asserts that a TLS connection to `url` fails promptly: the listener dropped it at a
/// limit instead of serving it or holding it open.
async fn assert_dropped_at_once(url: &halfpipe::leg_url::LegUrl) {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .unwrap();
    // Any trust will do: a dropped connection never gets as far as a certificate.
    let cfg = halfpipe::tls::client_config(&halfpipe::tls::ServerTrust::Insecure).unwrap();
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("the over-limit connection is dropped at once, not left hanging");
    assert!(
        refused.is_err(),
        "over the limit, the TLS handshake must fail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_flight_are_capped_and_the_slot_frees_at_the_timeout() {
    let mut opts = limited(10, 10);
    opts.limits.max_handshakes_in_flight = 1;
    let h = start(opts).await;
    let url = &h.urls[0];
    // A peer that connects and says nothing holds the only handshake slot. The listener
    // accepts connections one after another, so it holds the slot before the next arrives.
    let silent = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(h.tls.clone().unwrap().config);
    assert_dropped_at_once(url).await;
    // The silent peer's slot is released by the 2 s handshake timeout; then legs get in.
    let mut buf = [0u8; 1];
    let mut silent = silent;
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "silent peer closed at the timeout"
    );
    // The server closes the silent socket a moment before it returns the slot, so retry
    // the TLS connect (bounded) until one gets through, then run a handshake on that leg.
    let mut admitted = None;
    for _ in 0..100 {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        if let Ok(leg) = connector.connect(name, tcp).await {
            admitted = Some(leg);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leg = admitted.expect("the handshake slot was never released");
    let verdict = verdict_on(&h, leg, &h.user_keys, SessionId::random(), 1).await;
    assert_eq!(verdict, HelloStatus::Accepted);
}

/// Sends `probe` to `addr` (plain TCP) and returns everything that comes back before the
/// server closes (bounded wait).
async fn probe_reply<S>(mut s: S, probe: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(probe).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server neither answered nor closed");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probes_get_the_decoy_and_nothing_else() {
    let h = start(Opts {
        legs: ["ws", "wss"],
        ..Opts::default()
    })
    .await;
    let ws = (h.urls[0].host.clone(), h.urls[0].port);
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let upgrade = |path: &str, key: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n").into_bytes()
    };
    let plain = |b: &[u8]| b.to_vec();
    let decoy = probe_reply(
        TcpStream::connect(ws.clone()).await.unwrap(),
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&decoy);
    assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
    assert!(
        text.contains("nginx") && !text.to_lowercase().contains("halfpipe"),
        "{text}"
    );
    let probes = [
        plain(b"GET /hp HTTP/1.1\r\nHost: example.com\r\n\r\n"),
        upgrade("/hp", "c2hvcnQ="), // a key that is not 16 bytes
        upgrade("/hp", "%%%not-base64%%%"),
        upgrade("/elsewhere", key),
        plain(b"POST /hp HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
        plain(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 random bytes\r\n\r\n"),
    ];
    for p in &probes {
        let got = probe_reply(TcpStream::connect(ws.clone()).await.unwrap(), p).await;
        assert_eq!(
            got,
            decoy,
            "probe {:?} got a different reply",
            String::from_utf8_lossy(p)
        );
    }
    // Over TLS (the wss listener), the same decoy.
    let url = &h.urls[1];
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(h.tls.clone().unwrap().config);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let got = probe_reply(tls, b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n").await;
    assert_eq!(got, decoy, "wss decoy differs");
    // A valid upgrade on the leg path that never authenticates: the 101, then silence
    // until the handshake deadline, then the connection closes.
    let got = probe_reply(
        TcpStream::connect(ws.clone()).await.unwrap(),
        &upgrade("/hp", key),
    )
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 101 Switching Protocols\r\n") && text.ends_with("\r\n\r\n"),
        "{text}"
    );
    // The tunnel is unaffected.
    let echo = echo_server().await;
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0);
    let (sent, got, n) = echo_transfer(s, MIB, 5).await;
    assert_eq!((sent, n), (got, MIB));
}

/// A second client whose uplink goes to `uplink` (a proxy in front of the exit) and whose
/// downlink goes direct, and a stream through it to a fresh echo server.
async fn echo_stream_with_uplink(
    h: &Harness,
    uplink: &str,
) -> (std::sync::Arc<halfpipe::client::Exit>, TcpStream) {
    let uplink: halfpipe::leg_url::LegUrl = uplink.parse().unwrap();
    let (exit, socks) = client_via(
        h,
        vec![uplink],
        vec![h.urls[1].clone()],
        Duration::from_secs(60),
    )
    .await;
    let echo = echo_server().await;
    let (code, s) = socks_connect(socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0, "connect with the uplink through a proxy");
    (exit, s)
}

/// A real nginx, terminating TLS for a `wss://` uplink and forwarding the WebSocket to the
/// exit's plain `ws://` listener (the way a CDN would), while the downlink goes direct over
/// QUIC. A 64 MiB echo through it must come back identical, with a leg kill on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_uplink_through_a_real_nginx_reverse_proxy() {
    let nginx = tool("nginx");
    let h = start(Opts {
        legs: ["ws", "quic"],
        ..Opts::default()
    })
    .await;
    let ws = &h.urls[0];
    let dir = h.dir.join("nginx");
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let port = {
        // A free port for nginx (bound and released; nginx binds it right after).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        location /hp {{
            proxy_pass http://127.0.0.1:{ws_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"#,
        d = dir.display(),
        cert = h.dir.join("cert.pem").display(),
        key = h.dir.join("cert.key").display(),
        ws_port = ws.port,
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = std::process::Command::new(&nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nginx");
    let _nginx = KillOnDrop(child);
    let proxy: SocketAddr = ([127, 0, 0, 1], port).into();
    let ready = async {
        while TcpStream::connect(proxy).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .unwrap_or_else(|_| {
            let log = std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default();
            panic!("nginx did not start listening: {log}")
        });

    let (exit, s) = echo_stream_with_uplink(&h, &format!("wss://127.0.0.1:{port}/hp")).await;
    let total = if is_release() { 64 * MIB } else { 8 * MIB };
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut hs = Sha256::new();
        for i in 0..(total / MIB) as u64 {
            let chunk = payload(MIB, 77 + i);
            hs.update(&chunk);
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        hs.finalize()
    });
    let mut hr = Sha256::new();
    let (mut got, mut killed) = (0usize, false);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), r.read(&mut buf))
            .await
            .expect("transfer through nginx stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        hr.update(&buf[..n]);
        got += n;
        if !killed && got >= total / 2 {
            exit.kill_leg(LegRole::Up).await; // redialled through nginx
            killed = true;
        }
    }
    assert!(killed);
    assert_eq!(got, total);
    assert_eq!(
        writer.await.unwrap(),
        hr.finalize(),
        "SHA-256 through nginx"
    );
    assert_eq!(h.server.session_count(), 1);
}

/// Legs attached and legs attached channel-bound so far on the exit's `tls://` listeners.
fn tls_leg_counts(h: &Harness) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &h.server.control().metrics;
    let i = halfpipe::leg_url::Scheme::Tls.index();
    (
        m.legs_attached[i].load(Relaxed),
        m.legs_channel_bound[i].load(Relaxed),
    )
}

/// A relay that terminates TLS in front of the exit's uplink listener, as a CDN holding
/// the exit's own certificate would: it decrypts what the client sends, keeps the first
/// `keep` plaintext bytes it saw, and re-encrypts the rest of the way to the exit.
async fn tls_terminating_relay(
    h: &Harness,
    keep: usize,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let server_cfg =
        halfpipe::tls::server_config(&h.dir.join("cert.pem"), &h.dir.join("cert.key")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (h_urls, h_tls) = (h.urls.clone(), h.tls.clone());
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen2.clone());
            let (url, tls) = (h_urls[0].clone(), h_tls.clone().unwrap());
            tokio::spawn(async move {
                let Ok(from_client) = acceptor.accept(tcp).await else {
                    return;
                };
                let up = TcpStream::connect((url.host.as_str(), url.port))
                    .await
                    .unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let Ok(to_exit) = tokio_rustls::TlsConnector::from(tls.config)
                    .connect(name, up)
                    .await
                else {
                    return;
                };
                let (mut cr, mut cw) = tokio::io::split(from_client);
                let (mut er, mut ew) = tokio::io::split(to_exit);
                let upward = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        {
                            let mut s = seen.lock().unwrap();
                            let room = keep.saturating_sub(s.len()).min(n);
                            s.extend_from_slice(&buf[..room]);
                        }
                        if ew.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = ew.shutdown().await;
                };
                let downward = async {
                    let _ = tokio::io::copy(&mut er, &mut cw).await;
                };
                tokio::join!(upward, downward);
            });
        }
    });
    (addr, seen)
}

/// A direct `tls://` leg proves by its channel binding that TLS runs end to end, and
/// carries its records inside TLS only; an uplink through a TLS-terminating relay (holding
/// the exit's own certificate) cannot match the binding, keeps the Noise AEAD, and the
/// relay sees none of the application's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_terminating_relay_sees_only_sealed_records_while_direct_legs_go_single_layer() {
    let h = start(Opts::default()).await;
    let (relay, seen) = tls_terminating_relay(&h, 4 * MIB).await;
    let (attached0, bound0) = tls_leg_counts(&h);
    let (_exit, s) =
        echo_stream_with_uplink(&h, &format!("tls://127.0.0.1:{}", relay.port())).await;
    let total = 4 * MIB;
    let (sent, got, n) = echo_transfer(s, total, 99).await;
    assert_eq!((n, sent), (total, got), "bytes changed through the relay");
    let (attached, bound) = tls_leg_counts(&h);
    assert_eq!(
        attached - attached0,
        2,
        "uplink (relayed) and downlink (direct)"
    );
    assert_eq!(
        bound - bound0,
        1,
        "only the direct downlink is channel-bound"
    );
    // What the relay decrypted is Noise records: no 64-byte run of the application's data.
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() > 2 * MIB,
        "the relay carried the uplink ({})",
        seen.len()
    );
    let data = payload(256 * 1024, 99);
    for at in [0, 100_000, 200_000] {
        let needle = &data[at..at + 64];
        assert!(
            !seen.windows(64).any(|w| w == needle),
            "plaintext at {at} visible to the relay"
        );
    }
}

/// `double_encrypt` on either end keeps the Noise AEAD on legs that could go single-layer
/// (the client then offers no binding, the exit then ignores it); the data is the same
/// either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_encrypt_on_either_end_keeps_both_layers_on_direct_tls_legs() {
    for double_encrypt in [[false, false], [true, false], [false, true], [true, true]] {
        let h = start(Opts {
            double_encrypt,
            ..Opts::default()
        })
        .await;
        let echo = echo_server().await;
        let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(echo)).await;
        assert_eq!(code, 0);
        let (sent, got, n) = echo_transfer(s, 8 * MIB, 5).await;
        assert_eq!((n, sent), (8 * MIB, got));
        let (attached, bound) = tls_leg_counts(&h);
        assert!(attached >= 2, "{attached}");
        let want = if double_encrypt == [false, false] {
            attached
        } else {
            0
        };
        assert_eq!(
            bound, want,
            "double_encrypt (exit, client) = {double_encrypt:?}"
        );
    }
}

/// Several URLs per leg: the client skips a dead preferred URL, says which URL each leg is
/// on, and returns to the preferred one at the next redial once it is back and its
/// hold-down has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legs_fail_over_between_urls_and_return_to_the_preferred_one() {
    let h = start(Opts::default()).await;
    // The preferred uplink URL: a port with nothing behind it yet.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let preferred_port = hole.local_addr().unwrap().port();
    drop(hole);
    let mut preferred = h.urls[0].clone();
    preferred.port = preferred_port;
    let (exit, socks) = client_via(
        &h,
        vec![preferred.clone(), h.urls[0].clone()],
        vec![h.urls[1].clone()],
        Duration::from_millis(200),
    )
    .await;
    let echo = echo_server().await;
    let (code, s) = socks_connect(socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0);
    assert_eq!(
        exit.leg_urls()[0].as_ref(),
        Some(&h.urls[0]),
        "fell over to the second URL"
    );
    // Bring the preferred URL up: a plain TCP relay to the exit's real uplink listener.
    let relay = tokio::net::TcpListener::bind(("127.0.0.1", preferred_port))
        .await
        .unwrap();
    let real: SocketAddr = ([127, 0, 0, 1], h.urls[0].port).into();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = relay.accept().await {
            tokio::spawn(async move {
                if let Ok(mut b) = TcpStream::connect(real).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    tokio::time::sleep(Duration::from_millis(250)).await; // past the hold-down
    exit.kill_leg(LegRole::Up).await;
    let back = async {
        while exit.leg_urls()[0].as_ref() != Some(&preferred) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), back)
        .await
        .expect("the uplink returned to the preferred URL");
    // The stream opened before the switch still works, bytes intact.
    let (sent, got, n) = echo_transfer(s, 4 * MIB, 11).await;
    assert_eq!((sent, n), (got, 4 * MIB));
}

/// Each listener caps its open connections (legs included): with a cap of one, the live
/// uplink holds the uplink listener's only slot, a further connection is dropped at once
/// (a TLS handshake fails fast instead of being served), and the tunnel is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_listener_are_capped_and_legs_keep_their_slot() {
    let mut opts = Opts::default();
    opts.limits.max_connections_per_listener = 1;
    let h = start(opts).await;
    let echo = echo_server().await;
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0, "one leg per listener fits");
    let url = &h.urls[0];
    assert_dropped_at_once(url).await;
    let (sent, got, n) = echo_transfer(s, 2 * MIB, 21).await;
    assert_eq!((sent, n), (got, 2 * MIB));
    // A killed uplink gives its slot back: the redial gets in (bounded wait).
    h.exit.kill_leg(LegRole::Up).await;
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0);
    let (sent, got, n) = tokio::time::timeout(Duration::from_secs(20), echo_transfer(s, MIB, 22))
        .await
        .expect("the redialled uplink never got a slot");
    assert_eq!((sent, n), (got, MIB));
}

/// A WebTransport session on a path other than the leg's is rejected like any missing page
/// (404), and the real legs keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_on_another_path_is_rejected() {
    let h = start(Opts {
        legs: ["wt", "wt"],
        ..Opts::default()
    })
    .await;
    let mut elsewhere = h.urls[0].clone();
    elsewhere.path = "/elsewhere".into();
    let settings = halfpipe::transport::DialSettings {
        tls: h.tls.clone(),
        ..Default::default()
    };
    let e = halfpipe::transport::dial(&elsewhere, &settings, Duration::from_secs(5))
        .await
        .err()
        .expect("a session on another path must be refused");
    assert!(e.to_string().contains("WebTransport"), "{e}");
    let echo = echo_server().await;
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(echo)).await;
    assert_eq!(code, 0);
    let (sent, got, n) = echo_transfer(s, MIB, 31).await;
    assert_eq!((sent, n), (got, MIB));
}
