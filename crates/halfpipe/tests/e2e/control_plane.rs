//! The control plane inside a running exit: every tripwire drives the mode it should, the
//! capability table holds on the real API, tokens are refused when they should be and
//! never logged.

use std::sync::Arc;

use halfpipe::admin::handle;
use halfpipe::control::settings::ControlSettings;
use halfpipe_control::capability::{Capability, CapabilitySet};
use halfpipe_control::endpoint::Endpoint;
use halfpipe_control::mode::Mode;
use halfpipe_control::tripwire::{Action, TripwireKind};
use hyper::StatusCode;

use super::*;

fn with_tripwire(kind: TripwireKind, threshold: u32, action: Action) -> Opts {
    Opts {
        control: Some(Arc::new(move |c: &mut ControlSettings| {
            let t = c.tripwires.get_mut(&kind).unwrap();
            t.threshold = threshold;
            t.action = action;
        })),
        ..Opts::default()
    }
}

/// Waits (bounded) until `f` holds: the exit records a refusal just after it drops the
/// connection, so the test may see the close first.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends garbage to the uplink listener: a failed (transport) handshake.
async fn garbage_handshake(h: &Harness) {
    let url = &h.urls[0];
    let mut s = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .unwrap();
    let _ = s
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 9, 9, 9, 9])
        .await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_overall_drive_restricted_and_restricted_refuses_others() {
    let h = start(with_tripwire(
        TripwireKind::HandshakeFailuresTotal,
        3,
        Action::Restricted,
    ))
    .await;
    let cp = h.server.control().clone();
    for i in 0..2 {
        garbage_handshake(&h).await;
        eventually("the refusal counted", || {
            h.server
                .control()
                .metrics
                .handshake_failures()
                .values()
                .sum::<u64>()
                > i
        })
        .await;
    }
    assert_eq!(cp.mode(), Mode::Open, "fired below its threshold");
    garbage_handshake(&h).await;
    eventually("RESTRICTED", || cp.mode() == Mode::Restricted).await;
    assert_eq!(
        cp.mode_state().changed_by,
        "tripwire:handshake_failures_total"
    );
    // alice is not on the RESTRICTED user list: a new session is refused with a verdict.
    assert_eq!(new_session(&h, &h.user_keys).await, HelloStatus::Refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_from_one_source_ban_it() {
    let h = start(with_tripwire(
        TripwireKind::HandshakeFailuresPerSource,
        2,
        Action::BanSource,
    ))
    .await;
    garbage_handshake(&h).await;
    garbage_handshake(&h).await;
    let cp = h.server.control();
    eventually("the ban", || {
        let now = cp.db().clock().now_ms();
        cp.db().bans().banned("src:127.0.0.1", now).is_some()
    })
    .await;
    assert_eq!(cp.mode(), Mode::Open, "a ban is not a mode change");
    // The banned source now gets its connection dropped before any handshake.
    let url = &h.urls[0];
    let mut s = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "banned source was held or served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_handshakes_drive_lockdown_and_lockdown_closes_sessions() {
    let h = start(with_tripwire(
        TripwireKind::ReplayedHandshakes,
        2,
        Action::Lockdown,
    ))
    .await;
    let target = echo_server().await;
    let (code, _s) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    assert_eq!(h.server.session_count(), 1);
    let (_init, msg1) = message_one(&h, &h.user_keys, SessionId::random(), 1);
    let _ = send_message_one(&h, &msg1).await;
    let _ = send_message_one(&h, &msg1).await;
    assert_eq!(h.server.control().mode(), Mode::Open);
    let _ = send_message_one(&h, &msg1).await;
    assert_eq!(h.server.control().mode(), Mode::Lockdown);
    let start = std::time::Instant::now();
    while h.server.session_count() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sessions survived LOCKDOWN"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_denials_of_one_user_drive_restricted() {
    let h = start(Opts {
        allow_loopback: false,
        ..with_tripwire(TripwireKind::EgressDenialsPerUser, 2, Action::Restricted)
    })
    .await;
    let target = echo_server().await;
    for i in 0..2 {
        assert_eq!(h.server.control().mode(), Mode::Open, "fired after {i}");
        let (code, _) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
        assert_eq!(code, 2, "loopback must be denied with 'not allowed'");
    }
    let start = std::time::Instant::now();
    while h.server.control().mode() != Mode::Restricted {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = h.server.status();
    let fired =
        status["tripwires"].as_array().unwrap().iter().any(|t| {
            t["kind"] == "egress_denials_per_user" && t["key"] == "alice" && t["fires"] == 1
        });
    assert!(fired, "status does not show the tripwire: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_freezes_de_escalation_until_an_admin_unfreezes() {
    let h = start(Opts::default()).await;
    let cp = h.server.control().clone();
    let admin = admin_token(&h, &[Capability::Admin]);
    let call = |m: &'static str, p: &'static str, body: &'static str| {
        let (h, t) = (h.server.clone(), admin.clone());
        async move { handle(&h, m, p, "", Some(&t), body.as_bytes()).await }
    };
    let (st, _) = call("POST", "/v1/mode", r#"{"mode":"restricted"}"#).await;
    assert_eq!(st, StatusCode::OK);
    // The wall clock leaps an hour ahead while monotonic time moves a second.
    cp.tick_at(
        halfpipe::control::wall_ms() + 3_600_000,
        cp.uptime().as_millis() as u64 + 1000,
    );
    assert!(cp.mode_state().frozen);
    let (st, body) = call("POST", "/v1/mode", r#"{"mode":"open"}"#).await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("unfreeze"),
        "{body}"
    );
    // Escalation still works while frozen.
    let (st, _) = call("POST", "/v1/mode", r#"{"mode":"lockdown"}"#).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = call("POST", "/v1/mode/unfreeze", "").await;
    assert_eq!(st, StatusCode::OK);
    let (st, body) = call("POST", "/v1/mode", r#"{"mode":"open","confirm":true}"#).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(cp.mode(), Mode::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_store_that_cannot_write_drives_lockdown() {
    let h = start(Opts::default()).await;
    let cp = h.server.control().clone();
    // Make the mode file impossible to replace: a non-empty directory in its place.
    let mode_file = &cp.settings().paths.mode_file;
    std::fs::remove_file(mode_file).unwrap();
    std::fs::create_dir_all(mode_file.join("blocker")).unwrap();
    let admin = admin_token(&h, &[Capability::Admin]);
    let (st, body) = handle(
        &h.server,
        "POST",
        "/v1/mode",
        "",
        Some(&admin),
        br#"{"mode":"restricted"}"#,
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        cp.mode(),
        Mode::Lockdown,
        "a failing key store must lock down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_that_fails_drives_lockdown_and_pins_it() {
    let h = start(Opts::default()).await;
    let cp = h.server.control().clone();
    cp.simulate_audit_failure("disk full (simulated)");
    let start = std::time::Instant::now();
    while cp.mode() != Mode::Lockdown {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no lockdown after an audit failure"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cp.audit_failure().is_some());
    let admin = admin_token(&h, &[Capability::Admin]);
    let (st, body) = handle(
        &h.server,
        "POST",
        "/v1/mode",
        "",
        Some(&admin),
        br#"{"mode":"open","confirm":true}"#,
    )
    .await;
    assert_eq!(
        st,
        StatusCode::CONFLICT,
        "left lockdown without an audit trail: {body}"
    );
}

/// A fresh token with `caps`, made directly in the store.
fn admin_token(h: &Harness, caps: &[Capability]) -> String {
    let cp = h.server.control();
    let (_, secret) = cp
        .tokens()
        .create(
            "test",
            CapabilitySet::new(caps.iter().copied()),
            None,
            halfpipe::control::wall_ms(),
        )
        .unwrap();
    secret.expose().to_string()
}

/// A request that fits the endpoint's pattern (a made-up id or name where it has one).
fn request_for(e: Endpoint) -> (&'static str, String) {
    let path = e
        .path_pattern()
        .replace("{id}", "00000000")
        .replace("{name}", "nobody");
    (e.method(), path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capability_table_holds_on_the_real_api() {
    let h = start(Opts::default()).await;
    let mut sets: Vec<Vec<Capability>> = Capability::ALL.iter().map(|c| vec![*c]).collect();
    sets.push(vec![Capability::Status, Capability::SessionsRead]);
    for caps in sets {
        let token = admin_token(&h, &caps);
        let set = CapabilitySet::new(caps.iter().copied());
        for e in Endpoint::ALL {
            // Mutating endpoints that would end the test's world are judged without a body,
            // which the handler refuses (400) after the capability check passed.
            let (method, path) = request_for(e);
            let (st, body) = handle(&h.server, method, &path, "", Some(&token), b"").await;
            let allowed = set.allows(e.capability());
            if allowed {
                assert_ne!(st, StatusCode::FORBIDDEN, "{caps:?} denied {e:?}: {body}");
                assert_ne!(st, StatusCode::UNAUTHORIZED);
            } else {
                assert_eq!(st, StatusCode::FORBIDDEN, "{caps:?} allowed {e:?}: {body}");
            }
        }
    }
    // No token, a malformed one, an unknown one: 401 on every endpoint.
    for e in Endpoint::ALL {
        let (method, path) = request_for(e);
        for bearer in [None, Some("nonsense"), Some("hpt_0011223344556677_AAAA")] {
            let (st, _) = handle(&h.server, method, &path, "", bearer, b"").await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{e:?} with {bearer:?}");
        }
    }
    // An unknown path and a wrong method.
    let t = admin_token(&h, &[Capability::Admin]);
    assert_eq!(
        handle(&h.server, "GET", "/v1/nothing", "", Some(&t), b"")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        handle(&h.server, "PUT", "/v1/status", "", Some(&t), b"")
            .await
            .0,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_tokens_are_refused_and_never_logged() {
    let h = start(Opts::default()).await;
    let cp = h.server.control().clone();
    let now = halfpipe::control::wall_ms();
    let (info, secret) = cp
        .tokens()
        .create(
            "soon-gone",
            CapabilitySet::new([Capability::Status]),
            Some(now + 60_000),
            now,
        )
        .unwrap();
    let secret = secret.expose().to_string();
    assert_eq!(
        handle(&h.server, "GET", "/v1/status", "", Some(&secret), b"")
            .await
            .0,
        StatusCode::OK
    );
    cp.tokens().revoke(&info.id).unwrap();
    let (st, body) = handle(&h.server, "GET", "/v1/status", "", Some(&secret), b"").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    assert!(!body.to_string().contains(&secret));

    let (_, expired) = cp
        .tokens()
        .create(
            "past",
            CapabilitySet::new([Capability::Admin]),
            Some(now - 1),
            now - 10,
        )
        .unwrap();
    let expired = expired.expose().to_string();
    let (st, body) = handle(&h.server, "GET", "/v1/status", "", Some(&expired), b"").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    // Neither secret is in the audit log or anywhere in the state directory's files.
    cp.shutdown();
    for entry in walk(&cp.settings().paths.dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for s in [&secret, &expired] {
            let secret_part = s.rsplit('_').next().unwrap();
            assert!(
                !text.contains(secret_part),
                "{} holds a token secret",
                entry.display()
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_over_loopback_tcp_needs_a_client_certificate() {
    use halfpipe::control::settings::AdminTls;
    use halfpipe::ctl::{AdminAddr, CtlClient, CtlError};
    use halfpipe::tls::{client_config_with, server_config_with, ServerTrust};
    let dir = temp_dir("admin-tls");
    let write = |name: &str| {
        let c = halfpipe::cert::generate_self_signed(&["127.0.0.1".into()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        halfpipe::cert::write_dev_cert(&c, &cert, &key).unwrap();
        (cert, key)
    };
    let (server_cert, server_key) = write("server");
    let (client_cert, client_key) = write("client");
    let (stranger_cert, stranger_key) = write("stranger");
    let config = server_config_with(&server_cert, &server_key, Some(&client_cert)).unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = start(Opts {
        control: Some(Arc::new(move |c: &mut ControlSettings| {
            c.admin_tls = Some(AdminTls {
                listen,
                config: config.clone(),
            });
        })),
        ..Opts::default()
    })
    .await;
    let token = admin_token(&h, &[Capability::Status]);
    let client = |identity: Option<(&std::path::Path, &std::path::Path)>| {
        let config =
            client_config_with(&ServerTrust::CaFile(server_cert.clone()), identity).unwrap();
        CtlClient::new(
            AdminAddr::Tls {
                addr: listen,
                config,
            },
            token.clone(),
        )
    };
    let ok = client(Some((&client_cert, &client_key)))
        .call("GET", "/v1/status", None)
        .await
        .unwrap();
    assert_eq!(ok["mode"], "open");
    // The token still decides: status yes, sessions no.
    let denied = client(Some((&client_cert, &client_key)))
        .call("GET", "/v1/sessions", None)
        .await
        .unwrap_err();
    assert!(
        matches!(denied, CtlError::Server { status: 403, .. }),
        "{denied}"
    );
    // No certificate, or one the server does not trust: no API at all.
    for identity in [
        None,
        Some((stranger_cert.as_path(), stranger_key.as_path())),
    ] {
        let e = client(identity)
            .call("GET", "/v1/status", None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, CtlError::Unreachable { .. } | CtlError::Protocol(_)),
            "served without the right client certificate: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_on_loopback() {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = start(Opts {
        control: Some(Arc::new(move |c: &mut ControlSettings| {
            c.metrics = Some(listen)
        })),
        ..Opts::default()
    })
    .await;
    let target = echo_server().await;
    let (code, mut s) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    let fetch = |path: &'static str| async move {
        let mut c = TcpStream::connect(listen).await.unwrap();
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut page = String::new();
        c.read_to_string(&mut page).await.unwrap();
        page
    };
    let page = fetch("/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for needle in [
        "halfpipe_sessions 1",
        "halfpipe_mode 0",
        "halfpipe_legs_attached_total{transport=\"tls\"} 2",
        "# TYPE halfpipe_leg_bytes_total counter",
    ] {
        assert!(page.contains(needle), "{needle:?} not in\n{page}");
    }
    let up = page
        .lines()
        .find(|l| l.starts_with("halfpipe_leg_bytes_total{direction=\"up\",transport=\"tls\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap();
    assert!(up > 0, "no up bytes counted");
    assert!(fetch("/other").await.starts_with("HTTP/1.1 404"));
}

/// Reads one RFC 5425 frame (`LEN SP MSG`) from `s`.
async fn read_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut len = Vec::new();
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        if b[0] == b' ' {
            break;
        }
        assert!(b[0].is_ascii_digit() && len.len() < 8, "bad MSG-LEN");
        len.push(b[0]);
    }
    let n: usize = String::from_utf8(len).unwrap().parse().unwrap();
    let mut msg = vec![0u8; n];
    s.read_exact(&mut msg).await.unwrap();
    String::from_utf8(msg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_are_forwarded_to_a_tls_syslog_collector() {
    let dir = temp_dir("syslog");
    let (settings, mut frames, _cut) = syslog_collector(&dir).await;
    let h = start(Opts {
        control: Some(Arc::new(move |c: &mut ControlSettings| {
            c.syslog = Some(settings.clone())
        })),
        ..Opts::default()
    })
    .await;
    let target = echo_server().await;
    let (code, _s) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let opened = loop {
        let (_, f) = tokio::time::timeout_at(deadline, frames.recv())
            .await
            .expect("no session_opened record reached the collector")
            .unwrap();
        assert!(f.starts_with("<109>1 "), "{f}");
        let parts: Vec<&str> = f.splitn(8, ' ').collect();
        assert_eq!(parts[2], "exit-1");
        assert_eq!(parts[3], "halfpipe");
        seen.push(parts[5].to_string());
        if parts[5] == "session_opened" {
            break parts[7].to_string();
        }
    };
    let record: serde_json::Value = serde_json::from_str(&opened).unwrap();
    assert_eq!(record["fields"]["user"], "alice");
    assert!(
        record["hash"].as_str().is_some_and(|h| h.len() == 64),
        "{record}"
    );
    assert!(seen.contains(&"server_started".to_string()), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legs_rekey_on_their_time_budget_without_disturbing_a_transfer() {
    let h = start(Opts {
        rekey_after: Duration::from_millis(300),
        ..Opts::default()
    })
    .await;
    let target = echo_server().await;
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    let session_before = h.exit.session_id().await;
    let (sent, got, n) = echo_transfer(s, 48 * MIB, 21).await;
    assert_eq!(n, 48 * MIB);
    assert_eq!(sent, got, "bytes changed across re-keys");
    // Fresh handshakes happened on both legs of the same session.
    let start = std::time::Instant::now();
    loop {
        let attached =
            h.server.control().metrics.legs_attached[1].load(std::sync::atomic::Ordering::Relaxed);
        if attached >= 6 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "only {attached} legs attached: no re-key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        h.exit.session_id().await,
        session_before,
        "re-keying must not start a new session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_serves_the_api_and_refuses_oversized_bodies() {
    use halfpipe::ctl::{AdminAddr, CtlClient, CtlError};
    let h = start(Opts::default()).await;
    let socket = h.server.control().settings().paths.admin_socket.clone();
    let client = CtlClient::new(
        AdminAddr::Unix(socket),
        admin_token(&h, &[Capability::Admin]),
    );
    let status = client.call("GET", "/v1/status", None).await.unwrap();
    assert_eq!(status["mode"], "open");
    let big = serde_json::json!({ "name": "x".repeat(100_000), "caps": "status" });
    let e = client
        .call("POST", "/v1/tokens", Some(big))
        .await
        .unwrap_err();
    assert!(matches!(e, CtlError::Server { status: 413, .. }), "{e}");
    assert_eq!(e.exit_code(), 2);
    // Durations past what a millisecond clock holds are refused, never wrapped.
    for (path, far) in [
        (
            "/v1/tokens",
            serde_json::json!({ "name": "x", "caps": "status", "expires_in": "600000000years" }),
        ),
        (
            "/v1/keys/rotate",
            serde_json::json!({ "overlap": "600000000years" }),
        ),
    ] {
        let e = client.call("POST", path, Some(far)).await.unwrap_err();
        assert!(
            matches!(&e, CtlError::Server { status: 400, .. })
                && e.to_string().contains("too long"),
            "{path}: {e}"
        );
    }
    let e = client.call("GET", "/v1/nothing", None).await.unwrap_err();
    assert!(matches!(e, CtlError::Server { status: 404, .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_serves_at_most_64_connections_and_a_freed_slot_serves_again() {
    use halfpipe::ctl::{AdminAddr, CtlClient};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;
    let h = start(Opts::default()).await;
    let socket = h.server.control().settings().paths.admin_socket.clone();
    // 64 connections, each holding a slot with a request head begun and never finished
    // (the exit would cut them after its 10 s head timeout).
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut s = UnixStream::connect(&socket).await.unwrap();
        s.write_all(b"GET /v1/status HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    // The 65th is accepted after them (the backlog is first in, first out) and dropped.
    let mut extra = UnixStream::connect(&socket).await.unwrap();
    let _ = extra
        .write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("the connection over the limit was neither served nor dropped");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the 65th connection was served: {read:?}"
    );
    // One held connection ends: its slot serves the next client.
    drop(held.pop());
    let client = CtlClient::new(
        AdminAddr::Unix(socket),
        admin_token(&h, &[Capability::Admin]),
    );
    let start = std::time::Instant::now();
    loop {
        match client.call("GET", "/v1/status", None).await {
            Ok(status) => {
                assert_eq!(status["mode"], "open");
                break;
            }
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(5),
                "the freed slot never served: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
}

/// A collector on loopback TLS: each accepted connection's frames go to the channel with
/// the connection's number.
async fn syslog_collector(
    dir: &std::path::Path,
) -> (
    halfpipe::control::syslog::SyslogSettings,
    tokio::sync::mpsc::Receiver<(usize, String)>,
    Arc<tokio::sync::Notify>,
) {
    use halfpipe::control::syslog::SyslogSettings;
    let cert = halfpipe::cert::generate_self_signed(&["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("collector.pem"), dir.join("collector.key"));
    halfpipe::cert::write_dev_cert(&cert, &cert_path, &key_path).unwrap();
    let server_cfg = halfpipe::tls::server_config(&cert_path, &key_path).unwrap();
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = collector.local_addr().unwrap().to_string();
    let (tx, frames) = tokio::sync::mpsc::channel(64);
    // Notified: drop the current connection (as a collector restart would).
    let cut = Arc::new(tokio::sync::Notify::new());
    let cut_rx = cut.clone();
    tokio::spawn(async move {
        for n in 0.. {
            let (tcp, _) = collector.accept().await.unwrap();
            let mut tls = halfpipe::tls_stream::accept(server_cfg.clone(), tcp)
                .await
                .unwrap();
            loop {
                tokio::select! {
                    f = read_frame(&mut tls) => if tx.send((n, f)).await.is_err() { return },
                    _ = cut_rx.notified() => break,
                }
            }
        }
    });
    let tls = halfpipe::tls::client_config(&halfpipe::tls::ServerTrust::CaFile(cert_path)).unwrap();
    let settings = SyslogSettings {
        address,
        server_name: rustls::pki_types::ServerName::try_from("localhost").unwrap(),
        tls,
        hostname: "exit-1".into(),
    };
    (settings, frames, cut)
}

// One thread: the forwarder cannot run while the test fills its queue, so exactly the
// lines beyond the bound are dropped.
#[tokio::test(flavor = "current_thread")]
async fn the_syslog_forwarder_counts_drops_reports_the_gap_and_reconnects() {
    use halfpipe::control::syslog::{spawn, QUEUE};
    let dir = temp_dir("syslog-gap");
    let (settings, mut frames, cut) = syslog_collector(&dir).await;
    let queue = spawn(settings);
    for i in 0..QUEUE + 10 {
        queue.push(&format!(
            r#"{{"seq":{i},"time_ms":1,"kind":"session_opened"}}"#
        ));
    }
    assert_eq!(queue.dropped(), 10, "exactly the lines over the bound");
    async fn next(frames: &mut tokio::sync::mpsc::Receiver<(usize, String)>) -> (usize, String) {
        tokio::time::timeout(Duration::from_secs(20), frames.recv())
            .await
            .expect("the collector got nothing")
            .unwrap()
    }
    // The gap comes first, in the stream itself, then the queued lines in order.
    let (conn, gap) = next(&mut frames).await;
    assert_eq!(conn, 0);
    assert!(
        gap.contains(r#""kind":"forward_gap""#) && gap.contains(r#""dropped":10"#),
        "{gap}"
    );
    let (_, first) = next(&mut frames).await;
    assert!(first.contains(r#""seq":0,"#), "{first}");
    // The collector goes away: the forwarder reconnects and goes on.
    cut.notify_one();
    loop {
        let (conn, f) = next(&mut frames).await;
        if conn == 1 {
            assert!(f.contains("session_opened"), "{f}");
            break;
        }
    }
}
