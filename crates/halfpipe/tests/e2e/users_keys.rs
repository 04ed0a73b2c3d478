//! Users with limits and keys that rotate, inside a running exit: speed limits, transfer
//! quotas, device limits, expiry, allowed destinations; a key rotation in the middle of a
//! transfer, a client that learns the new key, one that comes back too late.

use std::sync::Arc;
use std::time::Instant;

use halfpipe::admin::handle;
use halfpipe::client::{ClientError, Exit};
use halfpipe_control::capability::{Capability, CapabilitySet};
use hyper::StatusCode;
use serde_json::Value;

use super::*;

fn admin(h: &Harness) -> String {
    let (_, secret) = h
        .server
        .control()
        .tokens()
        .create(
            "test",
            CapabilitySet::new([Capability::Admin]),
            None,
            halfpipe::control::wall_ms(),
        )
        .unwrap();
    secret.expose().to_string()
}

async fn api(h: &Harness, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
    handle(
        &h.server,
        method,
        path,
        "",
        Some(&admin(h)),
        body.as_bytes(),
    )
    .await
}

async fn set_policy(h: &Harness, user: &str, policy: &str) {
    let (st, body) = api(h, "POST", &format!("/v1/users/{user}/policy"), policy).await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_speed_limit_of_10_mb_per_s_holds_within_ten_percent() {
    let h = start(Opts::default()).await;
    set_policy(&h, "alice", r#"{"down_bytes_per_sec": 10000000}"#).await;
    let target = echo_server().await;
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    // 50 MB each way through the echo: the download side is limited, the upload is not
    // (the echo cannot send faster than it is read, so the upload follows the download).
    let total = 50_000_000;
    let start = Instant::now();
    let (sent, got, n) = echo_transfer(s, total, 5).await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!((n, sent), (total, got));
    let rate = total as f64 / secs;
    assert!(
        (9_000_000.0..=11_000_000.0).contains(&rate),
        "{:.2} MB/s over {secs:.2} s",
        rate / 1e6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_at_quota_is_refused_with_the_reason_and_usage_shows() {
    let h = start(Opts::default()).await;
    set_policy(
        &h,
        "alice",
        r#"{"quota": {"bytes": 1000000, "period": "day"}}"#,
    )
    .await;
    let target = echo_server().await;
    // 400 kB each way: 800 kB counted, under the 1 MB quota.
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    let (sent, got, n) = echo_transfer(s, 400_000, 6).await;
    assert_eq!((sent, n), (got, 400_000));
    // The next 400 kB crosses the quota: the stream is reset part-way (RST LimitReached).
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    let (r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&payload(400_000, 7)).await;
        let _ = w.shutdown().await;
    });
    let mut r = r;
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got))
        .await
        .expect("the stream crossing the quota was not ended");
    let _ = writer.await;
    assert!(
        got.len() < 400_000,
        "the stream went past the quota ({} bytes)",
        got.len()
    );
    // Cut short, not finished: the application gets a TCP reset, never a clean EOF.
    assert_eq!(
        ended.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "a reset stream ended like a complete one"
    );
    // The next stream is refused with "not allowed" (SOCKS 2) and the reason is logged.
    let (code, _) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 2, "a stream was opened beyond the quota");
    let (_, users) = api(&h, "GET", "/v1/users", "").await;
    let alice = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "alice")
        .unwrap()
        .clone();
    assert!(
        alice["usage"]["quota_used"].as_u64().unwrap() >= 1_000_000,
        "{alice}"
    );
    assert_eq!(alice["usage"]["quota_limit"], 1_000_000);
    assert!(
        h.server.status()["limit_hits"]["transfer_quota"]
            .as_u64()
            .unwrap()
            >= 1
    );
    // mallory has no quota and is unaffected.
    assert_eq!(
        new_session(&h, &h.other_user_keys).await,
        HelloStatus::Accepted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_limits_expiry_and_allowed_destinations_are_enforced() {
    let h = start(Opts::default()).await;
    // Devices: one session at most.
    set_policy(&h, "mallory", r#"{"max_sessions": 1}"#).await;
    assert_eq!(
        new_session(&h, &h.other_user_keys).await,
        HelloStatus::Accepted
    );
    assert_eq!(
        new_session(&h, &h.other_user_keys).await,
        HelloStatus::UserSessionLimit
    );
    // Destinations: only 127.0.0.2 (the echo listens on 127.0.0.1).
    set_policy(&h, "alice", r#"{"allowed_destinations": ["127.0.0.2/32"]}"#).await;
    let target = echo_server().await;
    let (code, _) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 2, "a destination outside the user's list was reached");
    // Expiry: access that ended closes the live session within a second and refuses new.
    set_policy(&h, "alice", r#"{}"#).await;
    let (code, mut live) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    let past = halfpipe::control::wall_ms() - 1;
    set_policy(&h, "alice", &format!(r#"{{"expires_at_ms": {past}}}"#)).await;
    let mut b = [0u8; 1];
    let ended = tokio::time::timeout(Duration::from_secs(2), live.read(&mut b)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "the expired user's stream lives on"
    );
    assert_eq!(new_session(&h, &h.user_keys).await, HelloStatus::Refused);
    // A bad policy is refused precisely.
    let (st, body) = api(
        &h,
        "POST",
        "/v1/users/alice/policy",
        r#"{"max_sessions": 0}"#,
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    let (st, _) = api(&h, "POST", "/v1/users/nobody/policy", "{}").await;
    assert_eq!(st, StatusCode::CONFLICT);
}

/// A client like the harness's own, with its own view of the exit's key.
fn client(h: &Harness, server_public: [u8; 32], learned: Option<std::path::PathBuf>) -> Arc<Exit> {
    Exit::new(client_settings(h, server_public, learned))
}

fn client_settings(
    h: &Harness,
    server_public: [u8; 32],
    learned: Option<std::path::PathBuf>,
) -> halfpipe::client::ExitSettings {
    halfpipe::client::ExitSettings {
        uplink: vec![h.urls[0].clone()],
        downlink: vec![h.urls[1].clone()],
        hold_down: Duration::from_secs(60),
        transport: halfpipe::transport::DialSettings {
            tls: h.tls.clone(),
            ..Default::default()
        },
        keys: h.user_keys.clone(),
        server_public,
        learned_key_file: learned,
        dial_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        session: SessionConfig::default(),
        sessions: halfpipe::client::DEFAULT_SESSIONS,
        rekey_after: halfpipe::client::DEFAULT_REKEY_AFTER,
        rekey_after_bytes: halfpipe::client::DEFAULT_REKEY_AFTER_BYTES,
        double_encrypt: false,
    }
}

/// Waits (bounded) until `exit` dials `key`.
async fn until_key(exit: &Exit, key: [u8; 32], what: &str) {
    let start = Instant::now();
    while exit.server_key() != key {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connected_during_the_window_reconnects_after_it_with_the_new_key() {
    let h = start(Opts {
        keystore: true,
        ..Opts::default()
    })
    .await;
    let old_public = h.server_public;
    let target = echo_server().await;
    // Its legs re-key by themselves every 200 ms, as they do every hour by default: a
    // connected client meets the overlap window at its next re-key without being told.
    let mut settings = client_settings(&h, old_public, Some(h.dir.join("learned.pub")));
    settings.rekey_after = Duration::from_millis(200);
    let connected = Exit::new(settings);
    let (_, _, st) = connected.open(TargetAddr::Ip(target)).await.unwrap();
    assert_eq!(st, halfpipe_core::ConnectStatus::Succeeded);
    let (st, rotated) = api(&h, "POST", "/v1/keys/rotate", r#"{"overlap": "3s"}"#).await;
    assert_eq!(st, StatusCode::OK, "{rotated}");
    let new_public =
        halfpipe::keyfile::decode_public(rotated["public"].as_str().unwrap(), "key").unwrap();
    let until_ms = rotated["old_accepted_until_ms"].as_u64().unwrap();
    until_key(
        &connected,
        new_public,
        "the connected client never learned the new key",
    )
    .await;
    // Wait out the window (its end is the exit's own deadline), then past the exit's
    // once-a-second key upkeep.
    while now_ms() < until_ms + 1_500 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The window is over: the old key is refused with the verdict...
    let late = client(&h, old_public, None);
    assert!(
        matches!(
            late.open(TargetAddr::Ip(target)).await,
            Err(ClientError::Refused {
                status: HelloStatus::ServerKeyRetired,
                ..
            })
        ),
        "the old key is still accepted after the window"
    );
    // ...and the connected client, its session cut, reconnects with the new key.
    let old_session = connected.session_id().await.expect("a live session");
    let (st, killed) = api(&h, "POST", &format!("/v1/sessions/{old_session}/kill"), "").await;
    assert_eq!(st, StatusCode::OK, "{killed}");
    let start = Instant::now();
    loop {
        match connected.open(TargetAddr::Ip(target)).await {
            Ok((_, _, halfpipe_core::ConnectStatus::Succeeded)) => break,
            other => assert!(
                start.elapsed() < Duration::from_secs(10),
                "no reconnect after the window: {:?}",
                other.map(|o| o.2)
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(connected.server_key(), new_public);
    assert_ne!(
        connected.session_id().await,
        Some(old_session),
        "a new session, on the new key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_mid_transfer_loses_nothing_and_connected_clients_follow_it() {
    let h = start(Opts {
        keystore: true,
        ..Opts::default()
    })
    .await;
    let old_public = h.server_public;
    let learned = h.dir.join("learned.pub");
    let exit = client(&h, old_public, Some(learned.clone()));
    let target = echo_server().await;
    let (_, _, st) = exit.open(TargetAddr::Ip(target)).await.unwrap();
    assert_eq!(st, halfpipe_core::ConnectStatus::Succeeded);
    // A transfer through the harness client (same user) runs across the rotation.
    let (code, s) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    let transfer = tokio::spawn(echo_transfer(s, 64 * MIB, 8));
    let (st, rotated) = api(&h, "POST", "/v1/keys/rotate", r#"{"overlap": "60s"}"#).await;
    assert_eq!(st, StatusCode::OK, "{rotated}");
    let new_public =
        halfpipe::keyfile::decode_public(rotated["public"].as_str().unwrap(), "key").unwrap();
    assert_ne!(new_public, old_public);
    // Both legs of the harness client's session redial during the window: they learn the
    // new key from the old one, and the transfer goes on.
    for role in [LegRole::Up, LegRole::Down] {
        let (tunnel, ..) = h.exit.open(TargetAddr::Ip(target)).await.unwrap();
        tunnel.kill_leg(role);
    }
    let (sent, got, n) = tokio::time::timeout(Duration::from_secs(120), transfer)
        .await
        .expect("the transfer stalled across the rotation")
        .unwrap();
    assert_eq!(
        (n, sent),
        (64 * MIB, got),
        "bytes changed across the rotation"
    );
    let start = Instant::now();
    while h.exit.server_key() != new_public {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the client never learned the new key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The second client learns it too and saves it for its next start.
    let (tunnel, ..) = exit.open(TargetAddr::Ip(target)).await.unwrap();
    tunnel.kill_leg(LegRole::Up);
    let start = Instant::now();
    while exit.server_key() != new_public {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the second client never learned it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let saved = std::fs::read_to_string(&learned).unwrap();
    assert_eq!(
        halfpipe::keyfile::decode_public(saved.trim(), "k").unwrap(),
        new_public
    );
    // A restart of that client starts from the saved key, not the old configured one.
    let restarted = client(&h, old_public, Some(learned));
    assert_eq!(restarted.server_key(), new_public);
    assert_eq!(
        restarted.open(TargetAddr::Ip(target)).await.unwrap().2,
        halfpipe_core::ConnectStatus::Succeeded
    );
    let (_, keys) = api(&h, "GET", "/v1/keys", "").await;
    let states: Vec<String> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kind"] == "server-static")
        .map(|k| k["state"]["state"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(states, ["retiring", "active"], "{keys}");
    assert!(!keys.to_string().contains("secret"), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_slept_past_the_window_is_told_to_get_a_new_link() {
    let h = start(Opts {
        keystore: true,
        ..Opts::default()
    })
    .await;
    let old_public = h.server_public;
    // The window is over at once.
    let (st, body) = api(&h, "POST", "/v1/keys/rotate", r#"{"overlap": "0s"}"#).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let late = client(&h, old_public, None);
    let target = echo_server().await;
    let err = match late.open(TargetAddr::Ip(target)).await {
        Err(e) => e,
        Ok(_) => panic!("a retired key was accepted"),
    };
    assert!(
        matches!(
            err,
            ClientError::Refused {
                status: HelloStatus::ServerKeyRetired,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("server key changed; get a new link"),
        "{err}"
    );
    // Someone who is not a user gets silence on the retired key, not the verdict.
    let (stranger, _) = {
        let (k, p) = halfpipe_core::handshake::generate_keypair().unwrap();
        (
            halfpipe_core::handshake::HandshakeKeys {
                suite: halfpipe_core::record::CipherSuite::Aes256Gcm,
                private_key: k,
                psk: None,
            },
            p,
        )
    };
    let hello = ClientHello {
        role: LegRole::Up,
        session_id: SessionId::random(),
        epoch: 1,
        timestamp_ms: now_ms(),
        recv_next: 0,
        channel_binding: None,
    };
    let (_init, msg1) = Initiator::start(&stranger, &old_public, &hello).unwrap();
    assert!(
        send_message_one(&h, &msg1).await.is_empty(),
        "a stranger learned something"
    );
    // The audit log names the rotation.
    let (_, tail) = api(&h, "GET", "/v1/log/tail", "").await;
    assert!(tail.to_string().contains("rotated"), "{tail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_user_closes_their_sessions_within_a_second_and_refuses_them() {
    let h = start(Opts::default()).await;
    let target = echo_server().await;
    let (code, mut live) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
    let (st, body) = api(&h, "POST", "/v1/users/alice/disable", "").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let mut b = [0u8; 1];
    let ended = tokio::time::timeout(Duration::from_secs(1), live.read(&mut b)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "a disabled user's stream outlived a second"
    );
    // A disabled key is an unknown key: silence, like any stranger.
    let (_init, msg1) = message_one(&h, &h.user_keys, SessionId::random(), 1);
    assert!(send_message_one(&h, &msg1).await.is_empty());
    let (st, _) = api(&h, "POST", "/v1/users/alice/enable", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(new_session(&h, &h.user_keys).await, HelloStatus::Accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_rotation_happens_by_itself() {
    let h = start(Opts {
        keystore: true,
        rotate_every: Some(Duration::from_millis(1500)),
        ..Opts::default()
    })
    .await;
    let start = Instant::now();
    loop {
        let (_, keys) = api(&h, "GET", "/v1/keys", "").await;
        // The store also holds the token pepper: count the server's keys only.
        let server: Vec<&Value> = keys["keys"]
            .as_array()
            .map(|a| a.iter().filter(|k| k["kind"] == "server-static").collect())
            .unwrap_or_default();
        if server.len() >= 2 {
            let active: Vec<&&Value> = server
                .iter()
                .filter(|k| k["state"]["state"] == "active")
                .collect();
            assert_eq!(active.len(), 1, "{keys}");
            assert_ne!(active[0]["id"], "server-static-v1");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no scheduled rotation: {keys}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The harness client still connects: its key is retiring, inside the window.
    let target = echo_server().await;
    let (code, _) = socks_connect(h.socks, &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0);
}
