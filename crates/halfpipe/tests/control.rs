//! The control plane end to end, with real processes: `halfpipe server` and `halfpipe
//! client` started from quickstart-made configs on loopback, steered with `halfpipe ctl`.
//!
//! Readiness is explicit (the admin API answers, the SOCKS port accepts, a record shows up)
//! and every wait is bounded.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{echo_server, echo_transfer, socks_connect, temp_dir, KillOnDrop};
use halfpipe::quickstart::{prepare_with, Ports};
use halfpipe_core::TargetAddr;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_halfpipe")
}

/// A quickstart directory (keys, certificate, configs, initialized state) and its ports.
fn setup(tag: &str) -> (PathBuf, Ports) {
    let dir = temp_dir(tag);
    let ports = Ports::pick([0, 0, 0, 0]).unwrap();
    assert!(prepare_with(&dir, ports, ["tls", "tls"]).unwrap());
    (dir, ports)
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn spawn(dir: &Path, args: &[&str], log: &str) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(log))
        .unwrap();
    KillOnDrop(
        Command::new(bin())
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// `halfpipe ctl --config DIR/server.toml ARGS`: (exit code, stdout, stderr).
fn ctl_with(dir: &Path, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(bin());
    c.arg("ctl")
        .arg("--config")
        .arg(dir.join("server.toml"))
        .args(args)
        .stdin(Stdio::null());
    match token {
        Some(t) => c.env("HALFPIPE_TOKEN", t),
        None => c.env_remove("HALFPIPE_TOKEN"),
    };
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ctl(dir: &Path, args: &[&str]) -> (i32, String, String) {
    ctl_with(dir, None, args)
}

/// `ctl --json ARGS`, which must succeed.
fn ctl_json(dir: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (code, out, err) = ctl(dir, &a);
    assert_eq!(code, 0, "ctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out}"))
}

/// Polls `f` every 50 ms until it holds, for at most `limit`.
async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_server(dir: &Path) -> KillOnDrop {
    let child = spawn(dir, &["server", "--config", "server.toml"], "server.log");
    let d = dir.to_owned();
    wait_until("the admin API", Duration::from_secs(30), move || {
        ctl(&d, &["status"]).0 == 0
    })
    .await;
    child
}

/// Waits (bounded) until something listens on 127.0.0.1:`port`.
async fn wait_listening(port: u16, what: &str) {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_client(dir: &Path, config: &str, socks: u16) -> KillOnDrop {
    let child = spawn(dir, &["client", "--config", config], "client.log");
    wait_listening(socks, "the client").await;
    child
}

fn signal(child: &KillOnDrop, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    let rc = unsafe { libc::kill(child.0.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0);
}

/// Stops a server cleanly (SIGTERM) and waits for it.
fn stop(mut child: KillOnDrop) {
    signal(&child, libc::SIGTERM);
    let start = Instant::now();
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sessions(dir: &Path) -> Vec<Value> {
    ctl_json(dir, &["sessions", "list"])["sessions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A SOCKS stream through `socks` to `target` that echoes `n` bytes back (the tunnel works).
async fn echo_once(socks: u16, target: std::net::SocketAddr) -> tokio::net::TcpStream {
    let (code, mut s) =
        socks_connect(([127, 0, 0, 1], socks).into(), &TargetAddr::Ip(target)).await;
    assert_eq!(code, 0, "SOCKS connect refused");
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    s
}

/// A SOCKS stream to `target`, retried (bounded) while the client re-establishes its
/// session (after an exit restart its first request may meet the old, dead session).
async fn socks_retry(socks: u16, target: std::net::SocketAddr) -> tokio::net::TcpStream {
    let start = Instant::now();
    loop {
        let (code, s) =
            socks_connect(([127, 0, 0, 1], socks).into(), &TargetAddr::Ip(target)).await;
        if code == 0 {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no tunnel (SOCKS reply {code})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the stream ends (EOF or error) within `limit`.
async fn ends_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut b = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The share link `ctl users add` printed, as text and parsed.
fn printed_link(out: &str) -> (String, halfpipe_core::link::ShareLink) {
    let link = out
        .lines()
        .find(|l| l.starts_with("halfpipe://"))
        .expect("no link printed")
        .to_string();
    let parsed = halfpipe_core::link::ShareLink::parse(&link).unwrap();
    (link, parsed)
}

fn audit_kinds(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("state/audit/audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["kind"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockdown_closes_every_session_and_survives_kill_9() {
    let (dir, ports) = setup("lockdown");
    let target = echo_server().await;
    let server = start_server(&dir).await;
    let _client = start_client(&dir, "client.toml", ports.socks).await;
    let mut stream = echo_once(ports.socks, target).await;
    assert_eq!(sessions(&dir).len(), 1);

    let (code, _, err) = ctl(&dir, &["mode", "set", "lockdown", "--reason", "test"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        ends_within(&mut stream, Duration::from_secs(10)).await,
        "the live stream survived LOCKDOWN"
    );
    let d = dir.clone();
    wait_until("no sessions", Duration::from_secs(10), move || {
        sessions(&d).is_empty()
    })
    .await;
    // No new session: the SOCKS request is answered with a failure.
    let (code, _) = socks_connect(
        ([127, 0, 0, 1], ports.socks).into(),
        &TargetAddr::Ip(target),
    )
    .await;
    assert_ne!(code, 0, "a stream was opened in LOCKDOWN");

    // kill -9, restart: still LOCKDOWN.
    drop(server);
    let server = start_server(&dir).await;
    let m = ctl_json(&dir, &["mode", "get"]);
    assert_eq!(m["mode"], "lockdown", "{m}");

    // Leaving LOCKDOWN needs the confirmation, and is logged with the token's id.
    let (code, _, err) = ctl(&dir, &["mode", "set", "open"]);
    assert_eq!(code, 5, "left lockdown without confirmation: {err}");
    assert!(err.contains("--confirm-leave-lockdown"), "{err}");
    let (code, _, err) = ctl(&dir, &["mode", "set", "open", "--confirm-leave-lockdown"]);
    assert_eq!(code, 0, "{err}");
    let m = ctl_json(&dir, &["mode", "get"]);
    assert_eq!(m["mode"], "open");
    assert!(
        m["changed_by"].as_str().unwrap().starts_with("token:"),
        "{m}"
    );
    // And the tunnel works again (the client redials with backoff).
    let start = Instant::now();
    loop {
        let (code, _) = socks_connect(
            ([127, 0, 0, 1], ports.socks).into(),
            &TargetAddr::Ip(target),
        )
        .await;
        if code == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no tunnel after leaving lockdown"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(server);
    let kinds = audit_kinds(&dir);
    assert!(
        kinds.iter().filter(|k| *k == "mode_change").count() >= 2,
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_missing_mode_file_starts_in_lockdown() {
    let (dir, _) = setup("corrupt-mode");
    let mode = dir.join("state/mode.json");
    let mut bytes = std::fs::read(&mode).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&mode, &bytes).unwrap();
    let server = start_server(&dir).await;
    let m = ctl_json(&dir, &["mode", "get"]);
    assert_eq!(m["mode"], "lockdown", "{m}");
    let reason = m["reason"].as_str().unwrap();
    assert!(
        reason.contains("confirm-leave-lockdown"),
        "no recovery advice: {reason}"
    );
    drop(server);

    std::fs::remove_file(&mode).unwrap();
    let server = start_server(&dir).await;
    let m = ctl_json(&dir, &["mode", "get"]);
    assert_eq!(m["mode"], "lockdown", "{m}");
    assert!(m["reason"].as_str().unwrap().contains("missing"), "{m}");
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
    assert!(
        log.contains("starting in LOCKDOWN"),
        "no log line saying why"
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_drives_a_running_server() {
    let (dir, ports) = setup("ctl");
    let target = echo_server().await;
    let server = start_server(&dir).await;
    let _client = start_client(&dir, "client.toml", ports.socks).await;
    let _s = echo_once(ports.socks, target).await;

    // Human status.
    let (code, out, _) = ctl(&dir, &["status"]);
    assert_eq!(code, 0);
    for needle in [
        "mode:      open",
        "sessions:  1",
        "legs:      tls 2",
        "tripwires:",
    ] {
        assert!(
            out.contains(needle),
            "{needle:?} missing from status:\n{out}"
        );
    }

    // A live transfer is closed by `sessions kill`. The first stream is still open, so
    // the client's pool carries this one on a session of its own.
    let (code, stream) = socks_connect(
        ([127, 0, 0, 1], ports.socks).into(),
        &TargetAddr::Ip(target),
    )
    .await;
    assert_eq!(code, 0);
    let transfer = tokio::spawn(echo_transfer(stream, 1 << 30, 7));
    let busiest = |d: &Path| {
        sessions(d)
            .into_iter()
            .max_by_key(|s| s["bytes_up"].as_u64().unwrap_or(0))
            .unwrap_or_default()
    };
    let d = dir.clone();
    wait_until("bytes moving", Duration::from_secs(20), move || {
        busiest(&d)["bytes_up"].as_u64().unwrap_or(0) > (1 << 20)
    })
    .await;
    let id = busiest(&dir)["id"].as_str().unwrap().to_string();
    let (code, _, err) = ctl(&dir, &["sessions", "kill", &id[..8]]);
    assert_eq!(code, 0, "{err}");
    let outcome = tokio::time::timeout(Duration::from_secs(20), transfer).await;
    match outcome {
        Ok(Ok((_, _, got))) => assert!(got < 1 << 30, "the transfer finished despite the kill"),
        Ok(Err(_)) => {} // the echo task saw the connection die
        Err(_) => panic!("the killed transfer kept going"),
    }
    assert_eq!(ctl(&dir, &["sessions", "kill", "ffffffffffff"]).0, 4);

    // Tokens: a narrow token can read status but not change the mode; revoked is refused.
    let t = ctl_json(
        &dir,
        &["tokens", "create", "--name", "watcher", "--caps", "status"],
    );
    let secret = t["token"].as_str().unwrap().to_string();
    let id = t["id"].as_str().unwrap().to_string();
    assert_eq!(ctl_with(&dir, Some(&secret), &["status"]).0, 0);
    let (code, _, err) = ctl_with(&dir, Some(&secret), &["mode", "set", "lockdown"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("mode.set"), "{err}");
    let listed = ctl(&dir, &["--json", "tokens", "list"]).1;
    assert!(
        listed.contains(&id) && !listed.contains(&secret),
        "{listed}"
    );
    assert_eq!(ctl(&dir, &["tokens", "revoke", &id]).0, 0);
    let (code, _, err) = ctl_with(&dir, Some(&secret), &["status"]);
    assert_eq!(code, 3, "revoked token accepted: {err}");
    assert_eq!(ctl_with(&dir, Some("hpt_00_garbage"), &["status"]).0, 3);

    // Users.
    let users = ctl_json(&dir, &["users", "list"]);
    assert_eq!(users["users"][0]["name"], "quickstart");

    // The log: the server's own verification, tail, and the offline verifier.
    let (code, out, _) = ctl(&dir, &["log", "verify"]);
    assert_eq!(code, 0, "{out}");
    let tail = ctl_json(&dir, &["log", "tail", "-n", "50"]);
    let kinds: Vec<&str> = tail["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    for k in [
        "session_opened",
        "token_created",
        "token_revoked",
        "session_killed",
        "token_use",
    ] {
        assert!(kinds.contains(&k), "{k} not in {kinds:?}");
    }
    stop(server);
    let all = std::fs::read_to_string(dir.join("state/audit/audit.log")).unwrap();
    assert!(!all.contains(&secret), "a token is in the audit log");
    let bootstrap = std::fs::read_to_string(dir.join("state/admin.token")).unwrap();
    assert!(!all.contains(bootstrap.trim()));
    let server_log = std::fs::read_to_string(dir.join("server.log")).unwrap();
    assert!(!server_log.contains(&secret) && !server_log.contains(bootstrap.trim()));

    let verify = |args: &[&str]| {
        let out = Command::new(bin())
            .args(["log", "verify"])
            .arg(dir.join("state/audit/audit.log"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = verify(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK"), "{out}");
    let wrong_key = "00".repeat(32);
    let (code, out) = verify(&["--key", &wrong_key]);
    assert_eq!(code, 7, "a log signed by another key verified: {out}");
    // Edit one record: named.
    let log = dir.join("state/audit/audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let tampered = text.replacen("\"quickstart\"", "\"mallory\"", 1);
    assert_ne!(tampered, text);
    std::fs::write(&log, tampered).unwrap();
    let (code, out) = verify(&[]);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("edited"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_a_user_while_another_transfers() {
    let (dir, ports) = setup("reload");
    let target = echo_server().await;
    // bob: a second user, with his own key and client config.
    let out = Command::new(bin())
        .args(["keys", "gen", "--out"])
        .arg(dir.join("bob.key"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let bob_pub = std::fs::read_to_string(dir.join("bob.key.pub")).unwrap();
    let bob_ports = Ports::pick([0, 0, 0, 0]).unwrap();
    let client_cfg = std::fs::read_to_string(dir.join("client.toml")).unwrap();
    let bob_cfg = client_cfg
        .replace(
            "private_key_file = \"client.key\"",
            "private_key_file = \"bob.key\"",
        )
        .replace(
            &format!("127.0.0.1:{}\"", ports.socks),
            &format!("127.0.0.1:{}\"", bob_ports.socks),
        )
        .replace(
            &format!("127.0.0.1:{}\"", ports.http),
            &format!("127.0.0.1:{}\"", bob_ports.http),
        );
    std::fs::write(dir.join("bob.toml"), bob_cfg).unwrap();

    let server = start_server(&dir).await;
    let _alice = start_client(&dir, "client.toml", ports.socks).await;
    let (code, stream) = socks_connect(
        ([127, 0, 0, 1], ports.socks).into(),
        &TargetAddr::Ip(target),
    )
    .await;
    assert_eq!(code, 0);
    let alice = tokio::spawn(echo_transfer(stream, 48 << 20, 11));

    // Add bob to the config; SIGHUP.
    let user_block = format!(
        "[[users]]\nname = \"bob\"\npublic_key = {:?}\n\n[egress]",
        bob_pub.trim()
    );
    edit(&dir.join("server.toml"), "[egress]", &user_block);
    signal(&server, libc::SIGHUP);
    let d = dir.clone();
    wait_until("bob in the user list", Duration::from_secs(10), move || {
        ctl_json(&d, &["users", "list"])["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "bob")
    })
    .await;
    let _bob = start_client(&dir, "bob.toml", bob_ports.socks).await;
    let mut bob_stream = echo_once(bob_ports.socks, target).await;
    assert!(sessions(&dir).iter().any(|s| s["user"] == "bob"));

    // Remove bob again; `ctl reload`: his session is closed, alice's transfer runs on.
    edit(&dir.join("server.toml"), &user_block, "[egress]");
    let (code, out, err) = ctl(&dir, &["--json", "reload"]);
    assert_eq!(code, 0, "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["removed"][0], "bob", "{summary}");
    assert!(
        ends_within(&mut bob_stream, Duration::from_secs(10)).await,
        "bob's stream outlived his removal"
    );
    assert!(!sessions(&dir).iter().any(|s| s["user"] == "bob"));

    let (sent, got, n) = tokio::time::timeout(Duration::from_secs(300), alice)
        .await
        .expect("alice's transfer stalled")
        .unwrap();
    assert_eq!(n, 48 << 20);
    assert_eq!(sent, got, "alice's bytes changed across the reloads");
    assert!(
        audit_kinds(&dir)
            .iter()
            .filter(|k| *k == "config_reload")
            .count()
            >= 2
    );
    stop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_and_a_byte_budget_survive_a_restart() {
    let (dir, ports) = setup("persist");
    let target = echo_server().await;
    let cfg = dir.join("server.toml");
    // 2 kB/s down after a 1 MB burst: the burst refills only while the server runs
    // (service time), so a restart cannot hand a fresh budget out.
    edit(
        &cfg,
        "bytes_down_per_user = \"off\"",
        "bytes_down_per_user = { per_second = 2000, burst = 1000000 }",
    );
    let server = start_server(&dir).await;
    let client = start_client(&dir, "client.toml", ports.socks).await;
    let (code, stream) = socks_connect(
        ([127, 0, 0, 1], ports.socks).into(),
        &TargetAddr::Ip(target),
    )
    .await;
    assert_eq!(code, 0);
    let (a, b, n) = echo_transfer(stream, 1_000_000, 3).await;
    assert_eq!((a, n), (b, 1_000_000));
    stop(server);
    let server = start_server(&dir).await;
    let stream = socks_retry(ports.socks, target).await;
    let (a, b, n) = echo_transfer(stream, 16_000, 4).await;
    assert_eq!((a, n), (b, 16_000));
    let status = ctl_json(&dir, &["status"]);
    assert!(
        status["limit_hits"]["bytes_down_per_user"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the byte budget was fresh after the restart: {status}"
    );
    drop(client);

    // Three failed handshakes from 127.0.0.1 ban it; the ban outlives a restart.
    stop(server);
    edit(&cfg, "threshold = 20", "threshold = 3");
    let server = start_server(&dir).await;
    let leg = ("127.0.0.1", ports.uplink);
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(leg).await.unwrap();
        let _ = s
            .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
            .await;
        let _ = s.shutdown().await;
        let _ = ends_within(&mut s, Duration::from_secs(15)).await;
    }
    let d = dir.clone();
    wait_until("the ban", Duration::from_secs(10), move || {
        ctl_json(&d, &["status"])["bans"]
            .as_array()
            .is_some_and(|b| b.iter().any(|x| x["key"] == "src:127.0.0.1"))
    })
    .await;
    stop(server);
    let server = start_server(&dir).await;
    let status = ctl_json(&dir, &["status"]);
    assert!(
        status["bans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["key"] == "src:127.0.0.1"),
        "the ban did not survive the restart: {status}"
    );
    // A banned source is dropped at once, before any handshake.
    let mut s = tokio::net::TcpStream::connect(leg).await.unwrap();
    assert!(
        ends_within(&mut s, Duration::from_secs(5)).await,
        "banned source was served"
    );
    stop(server);
    assert!(audit_kinds(&dir).contains(&"ban".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_is_private_and_a_missing_audit_key_stops_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _) = setup("private");
    let server = start_server(&dir).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("state/admin")), 0o700);
    assert_eq!(mode(&dir.join("state/admin/admin.sock")), 0o600);
    assert_eq!(mode(&dir.join("state/admin.token")), 0o600);
    assert_eq!(mode(&dir.join("state/keys/audit.key")), 0o600);
    stop(server);
    // Without its signing key the server refuses to run rather than log unsigned.
    std::fs::rename(
        dir.join("state/keys/audit.key"),
        dir.join("audit.key.moved"),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["server", "--config"])
        .arg(dir.join("server.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("audit.key") && err.contains("server init"),
        "{err}"
    );
    // A second init refuses to overwrite the state.
    let out = Command::new(bin())
        .args(["server", "init", "--config"])
        .arg(dir.join("server.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already initialized"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_link_is_all_a_new_user_needs_and_a_bad_one_is_named() {
    let (dir, _) = setup("link");
    let target = echo_server().await;
    let server = start_server(&dir).await;
    // Human output: the link once, and a QR code.
    let (code, out, err) = ctl(&dir, &["users", "add", "carol"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("shown this once") && out.contains('█'),
        "{out}"
    );
    let (link, parsed) = printed_link(&out);
    assert_eq!(parsed.user, "carol");
    assert!(
        parsed.pin.is_some(),
        "the dev certificate's pin belongs in the link"
    );
    // The exit kept only the public key.
    let users = ctl_json(&dir, &["users", "list"]);
    assert!(users["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == "carol"));
    let secret_b64 = halfpipe::keyfile::encode_key(&parsed.user_secret);
    for f in ["state/state.redb", "state/audit/audit.log", "server.log"] {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&secret_b64),
            "{f} holds the user's private key"
        );
    }
    // `halfpipe client --link` and nothing else.
    let socks = Ports::pick([0, 0, 0, 0]).unwrap().socks;
    let state = dir.join("carol-state");
    let socks_arg = format!("127.0.0.1:{socks}");
    let child = spawn(
        &dir,
        &[
            "client",
            "--link",
            &link,
            "--socks",
            &socks_arg,
            "--state-dir",
            state.to_str().unwrap(),
        ],
        "carol.log",
    );
    wait_listening(socks, "the link client").await;
    let s = socks_retry(socks, target).await;
    let (a, b, n) = echo_transfer(s, 4 << 20, 9).await;
    assert_eq!((a, n), (b, 4 << 20));
    assert!(sessions(&dir).iter().any(|s| s["user"] == "carol"));
    drop(child);
    // A malformed link: a precise error, a failing exit code, no secret echoed.
    let broken = link.replacen("v1", "v9", 1);
    let out = Command::new(bin())
        .args(["client", "--link", &broken])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a valid halfpipe link") && err.contains("v9"),
        "{err}"
    );
    assert!(
        !err.contains(&link[link.find('#').unwrap() + 1..]),
        "the secret was echoed"
    );
    stop(server);
}

/// A quickstart directory whose exit keeps its keys in a sealed store, initialized by the
/// real `halfpipe server init`.
fn setup_with_keystore(tag: &str) -> (PathBuf, Ports) {
    let (dir, ports) = setup(tag);
    std::fs::remove_dir_all(dir.join("state")).unwrap();
    let config = dir.join("server.toml");
    edit(&config, "private_key_file = \"server.key\"\n", "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[keystore]\nfile = \"keys.hpks\"\nsealer = \"keyfile:store.key\"\n");
    std::fs::write(&config, text).unwrap();
    let said = run_ok(&dir, &["server", "init", "--config", "server.toml"]);
    assert!(said.contains("key store:"), "{said}");
    (dir, ports)
}

/// Runs `halfpipe ARGS` in `dir`, which must succeed; its standard output.
fn run_ok(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "halfpipe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The audit records of one kind, as JSON.
fn audit_records(dir: &Path, kind: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join("state/audit/audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == kind)
        .collect()
}

fn server_refuses(dir: &Path) -> String {
    let out = Command::new(bin())
        .args(["server", "--config"])
        .arg(dir.join("server.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the server started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_store_holds_the_pepper_and_issued_keys_and_a_client_seals_its_own() {
    let (dir, _) = setup_with_keystore("ks");
    let target = echo_server().await;
    // The token pepper is in the store, not in a file; init's key events open the log.
    assert!(!dir.join("state/pepper").exists());
    let events: Vec<String> = audit_records(&dir, "key_event")
        .iter()
        .map(|r| format!("{} {}", r["fields"]["event"], r["fields"]["key"]))
        .collect();
    for want in [
        r#""created" "server-static-v1""#,
        r#""created" "token-pepper-v1""#,
        r#""referenced" "audit-signing""#,
    ] {
        assert!(events.iter().any(|e| e == want), "{want} not in {events:?}");
    }
    let server = start_server(&dir).await; // the bootstrap token verifies under the store's pepper
                                           // A user the exit issues: their key is sealed in the store, and only there.
    let (code, out, err) = ctl(&dir, &["users", "add", "dave"]);
    assert_eq!(code, 0, "{err}");
    let (link, parsed) = printed_link(&out);
    let keys = ctl_json(&dir, &["keys", "list"]);
    let dave_key = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "user-static" && k["label"] == "dave")
        .unwrap_or_else(|| panic!("no issued key for dave: {keys}"))
        .clone();
    assert_eq!(dave_key["state"]["state"], "active");
    let secret_forms = [
        halfpipe::keyfile::encode_key(&parsed.user_secret),
        hex::encode(parsed.user_secret),
    ];
    // The client seals the link into its own store; its config holds no secret.
    let socks = Ports::pick([0, 0, 0, 0]).unwrap().socks;
    let socks_arg = format!("127.0.0.1:{socks}");
    let said = run_ok(
        &dir,
        &[
            "client",
            "--link",
            &link,
            "--save",
            "dave.toml",
            "--socks",
            &socks_arg,
        ],
    );
    assert!(said.contains("dave.hpks"), "{said}");
    for f in [
        "dave.toml",
        "dave.hpks",
        "keys.hpks",
        "state/audit/audit.log",
        "server.log",
    ] {
        let text = String::from_utf8_lossy(&std::fs::read(dir.join(f)).unwrap()).into_owned();
        for s in &secret_forms {
            assert!(!text.contains(s.as_str()), "{f} holds dave's private key");
        }
    }
    assert!(std::fs::read_to_string(dir.join("dave.toml"))
        .unwrap()
        .contains("[keystore]"));
    let client = start_client(&dir, "dave.toml", socks).await;
    let s = socks_retry(socks, target).await;
    let (a, b, n) = echo_transfer(s, 1 << 20, 3).await;
    assert_eq!((a, n), (b, 1 << 20));
    assert!(sessions(&dir).iter().any(|s| s["user"] == "dave"));
    drop(client);
    // Removing dave revokes (wipes) the key the store issued him.
    let (code, _, err) = ctl(&dir, &["users", "remove", "dave"]);
    assert_eq!(code, 0, "{err}");
    let keys = ctl_json(&dir, &["keys", "list"]);
    let state = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == dave_key["id"])
        .map(|k| k["state"]["state"].clone());
    assert_eq!(state, Some(Value::from("revoked")), "{keys}");
    stop(server);
    // An audit key swapped behind the store's back stops the start.
    let audit_key = dir.join("state/keys/audit.key");
    let original = std::fs::read(&audit_key).unwrap();
    std::fs::remove_file(&audit_key).unwrap();
    halfpipe_audit::AuditKey::generate()
        .write_new(&audit_key)
        .unwrap();
    let err = server_refuses(&dir);
    assert!(err.contains("not the one the key store recorded"), "{err}");
    std::fs::remove_file(&audit_key).unwrap();
    std::fs::write(&audit_key, original).unwrap();
    // A wrong store key: a precise error, and the failure is on the record.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&audit_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let store_key = dir.join("store.key");
    std::fs::write(&store_key, hex::encode([0x42u8; 32])).unwrap();
    let err = server_refuses(&dir);
    assert!(err.contains("keys.hpks"), "{err}");
    let last = audit_records(&dir, "key_event").pop().unwrap();
    assert_eq!(last["fields"]["event"], "unseal_failure", "{last}");
    assert_eq!(last["fields"]["code"], "wrong_key_or_tampered", "{last}");
}
