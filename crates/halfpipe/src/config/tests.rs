use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::keyfile::{encode_key, write_private_key};

struct Fixture {
    dir: PathBuf,
    user_public: String,
    server_public: String,
}

fn fixture() -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "hp-config-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (sk, sp) = halfpipe_core::handshake::generate_keypair().unwrap();
    let (ck, cp) = halfpipe_core::handshake::generate_keypair().unwrap();
    write_private_key(&dir.join("server.key"), &sk).unwrap();
    write_private_key(&dir.join("client.key"), &ck).unwrap();
    let cert = crate::cert::generate_self_signed(&["localhost".into()]).unwrap();
    crate::cert::write_dev_cert(&cert, &dir.join("cert.pem"), &dir.join("cert.key")).unwrap();
    Fixture {
        dir,
        user_public: encode_key(&cp),
        server_public: encode_key(&sp),
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn server_text(f: &Fixture) -> String {
    server_toml(&ServerTemplate {
        listen: &["tls://127.0.0.1:8443".into(), "tls://127.0.0.1:8444".into()],
        users: &[("alice".into(), f.user_public.clone())],
        allow: &["127.0.0.0/8".into()],
        allow_comment: "test",
    })
}

fn client_text(f: &Fixture) -> String {
    client_toml(&ClientTemplate {
        server_public_key: &f.server_public,
        uplink: "tls://127.0.0.1:8443",
        downlink: "tls://127.0.0.1:8444",
        server_name: "localhost",
        ca_file: "cert.pem",
        socks: "127.0.0.1:1080",
        http: "127.0.0.1:8080",
    })
}

fn keys_of(e: ConfigErrors) -> Vec<String> {
    e.0.into_iter().map(|e| e.key).collect()
}

#[test]
fn templates_load_back() {
    let f = fixture();
    let s = server_from_str(&f.dir.join("server.toml"), &server_text(&f), &no_env).unwrap();
    assert_eq!(s.listen.len(), 2);
    assert_eq!(s.users[0].name, "alice");
    assert!(s.egress.check_ip("127.0.0.1".parse().unwrap()).is_ok());
    assert!(s.egress.check_ip("10.0.0.1".parse().unwrap()).is_err());
    let c = client_from_str(&f.dir.join("client.toml"), &client_text(&f), &no_env).unwrap();
    assert_eq!(c.inbounds.len(), 2);
    assert_eq!(c.exit.uplink[0].port, 8443);
    assert_eq!(c.exit.downlink[0].port, 8444);
    assert!(is_server_config(&server_text(&f)));
    assert!(!is_server_config(&client_text(&f)));
}

#[test]
fn every_error_names_its_key_and_all_are_reported() {
    let f = fixture();
    let text = server_text(&f)
        .replace("tls://127.0.0.1:8444", "udp://127.0.0.1:8444")
        .replace(&f.user_public, "not-base64")
        .replace("\"127.0.0.0/8\"", "\"127.0.0.0/99\"")
        .replace("max_sessions = 1024", "max_sessions = 0")
        .replace("idle_timeout = \"300s\"", "idle_timeout = \"soon\"")
        .replace(
            "resume_window = \"60s\"",
            "resume_window = \"9999999years\"",
        )
        .replace("aes-256-gcm", "rot13");
    let e = server_from_str(&f.dir.join("server.toml"), &text, &no_env)
        .err()
        .unwrap();
    let keys = keys_of(e.clone());
    for want in [
        "listen[1]",
        "users[0].public_key",
        "egress.allow[0]",
        "limits.max_sessions",
        "limits.idle_timeout",
        "limits.resume_window",
        "cipher",
    ] {
        assert!(
            keys.contains(&want.to_string()),
            "missing {want} in {keys:?}"
        );
    }
    let shown = e.to_string();
    assert!(
        shown.contains("server.toml: users[0].public_key: not a public key"),
        "{shown}"
    );
    // Unknown keys are caught with their line.
    let e = server_from_str(
        &f.dir.join("s.toml"),
        &format!("{}\nlisten_typo = 1\n", server_text(&f)),
        &no_env,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("unknown field"), "{e}");
    assert!(e.0[0].key.starts_with("line "), "{:?}", e.0[0].key);
}

#[test]
fn client_errors_open_proxy_and_half_credentials() {
    let f = fixture();
    let text = client_text(&f).replace(
        "listen = \"127.0.0.1:1080\"",
        "listen = \"0.0.0.0:1080\"\nusername = \"u\"",
    );
    let keys = keys_of(
        client_from_str(&f.dir.join("client.toml"), &text, &no_env)
            .err()
            .unwrap(),
    );
    assert!(keys.contains(&"socks5.listen".to_string()), "{keys:?}");
    assert!(keys.contains(&"socks5.username".to_string()), "{keys:?}");
}

#[test]
fn client_session_pool_size_is_bounded() {
    let f = fixture();
    let path = f.dir.join("client.toml");
    let default_line = format!("\nsessions = {}\n", crate::client::DEFAULT_SESSIONS);
    let with = |line: &str| client_text(&f).replace(&default_line, &format!("\n{line}\n"));
    assert!(
        client_text(&f).contains(&default_line),
        "the template names the default"
    );
    let c = client_from_str(&path, &client_text(&f), &no_env).unwrap();
    assert_eq!(c.exit.sessions, crate::client::DEFAULT_SESSIONS);
    let c = client_from_str(&path, &with("sessions = 1"), &no_env).unwrap();
    assert_eq!(c.exit.sessions, 1);
    for bad in ["sessions = 0", "sessions = 17"] {
        let e = client_from_str(&path, &with(bad), &no_env).err().unwrap();
        assert_eq!(keys_of(e), vec!["limits.sessions".to_string()], "{bad}");
    }
}

#[test]
fn environment_overrides_the_key_file_and_permissions_are_enforced() {
    let f = fixture();
    let key_path = f.dir.join("server.key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = server_from_str(&f.dir.join("server.toml"), &server_text(&f), &no_env)
        .err()
        .unwrap();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    let (k, _) = halfpipe_core::handshake::generate_keypair().unwrap();
    let env: HashMap<&str, String> = [(ENV_SERVER_KEY, encode_key(&k))].into();
    let lookup = |n: &str| env.get(n).cloned();
    let s = server_from_str(&f.dir.join("server.toml"), &server_text(&f), &lookup).unwrap();
    match &s.keys {
        crate::server::keys::KeySource::File(keys) => assert_eq!(*keys.private_key, *k),
        crate::server::keys::KeySource::Store(_) => panic!("no [keystore] was configured"),
    }
    let bad: HashMap<&str, String> = [(ENV_SERVER_KEY, "xx".to_string())].into();
    let lookup = |n: &str| bad.get(n).cloned();
    let e = server_from_str(&f.dir.join("server.toml"), &server_text(&f), &lookup)
        .err()
        .unwrap();
    assert!(e.to_string().contains(ENV_SERVER_KEY), "{e}");
}

#[test]
fn transport_sections_are_checked() {
    let f = fixture();
    let path = f.dir.join("server.toml");
    // Valid: QUIC, WebSocket and decoy settings on a server with quic:// and wss:// legs.
    let text = server_text(&f)
        .replace("tls://127.0.0.1:8443", "quic://127.0.0.1:8443")
        .replace("tls://127.0.0.1:8444", "wss://127.0.0.1:8444/api")
        + "\n[quic]\ncongestion = \"bbr\"\nretry_above = 4\nack_every = 4\nmax_udp_payload = 8952\n\n[ws]\nmax_message = 131072\n\n[decoy]\nstatus = 403\nbody = \"no\"\n";
    let s = server_from_str(&path, &text, &no_env).unwrap();
    assert_eq!(
        s.transport.quic.congestion,
        crate::transport::Congestion::Bbr
    );
    assert_eq!(s.transport.quic.retry_above, 4);
    assert_eq!(s.transport.quic.ack_every, 4);
    assert_eq!(s.transport.quic.max_udp_payload, Some(8952));
    assert_eq!(
        server_from_str(&path, &server_text(&f), &no_env)
            .unwrap()
            .transport
            .quic
            .max_udp_payload,
        None,
        "unset: chosen per leg (loopback or not)"
    );
    assert!(
        !s.double_encrypt,
        "one encryption layer where TLS is end to end, by default"
    );
    let doubled = format!(
        "double_encrypt = true\n{}",
        server_text(&f).replace("double_encrypt = false\n", "")
    );
    assert!(
        server_from_str(&path, &doubled, &no_env)
            .unwrap()
            .double_encrypt
    );
    assert_eq!(s.transport.ws.max_message, 131072);
    assert_eq!(s.listen[1].path, "/api");
    assert!(matches!(
        s.transport.decoy.kind(),
        DecoyKind::Fixed { status: 403, .. }
    ));

    // Each mistake is named by its key.
    let bad = server_text(&f)
        + "\n[quic]\ncongestion = \"reno\"\nack_every = 0\nmax_udp_payload = 1199\n\n[ws]\nhost = \"cdn\"\n\n[decoy]\ndir = \"/nonexistent-dir\"\nproxy = \"http://127.0.0.1:1\"\n";
    let keys = keys_of(server_from_str(&path, &bad, &no_env).err().unwrap());
    let too_large = server_text(&f) + "\n[quic]\nmax_udp_payload = 65528\n";
    let too_large_keys = keys_of(server_from_str(&path, &too_large, &no_env).err().unwrap());
    assert_eq!(too_large_keys, ["quic.max_udp_payload"]);
    for k in [
        "quic.congestion",
        "quic.ack_every",
        "quic.max_udp_payload",
        "ws.host",
        "decoy",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
    }

    let cpath = f.dir.join("client.toml");
    let insecure_and_pin =
        client_text(&f).replace("[tls]\n", "[tls]\ninsecure = true\npin = \"sha256/AAAA\"\n");
    let keys = keys_of(
        client_from_str(&cpath, &insecure_and_pin, &no_env)
            .err()
            .unwrap(),
    );
    assert!(keys.iter().any(|k| k.starts_with("tls")), "{keys:?}");
    let half_identity = client_text(&f).replace("[tls]\n", "[tls]\ncert_file = \"cert.pem\"\n");
    let keys = keys_of(
        client_from_str(&cpath, &half_identity, &no_env)
            .err()
            .unwrap(),
    );
    assert!(keys.iter().any(|k| k == "tls.cert_file"), "{keys:?}");
    let with_identity = client_text(&f).replace(
        "[tls]\n",
        "[tls]\ncert_file = \"cert.pem\"\nkey_file = \"cert.key\"\n",
    );
    assert!(client_from_str(&cpath, &with_identity, &no_env).is_ok());
    let two = client_text(&f).replace(
        "uplink = \"tls://127.0.0.1:8443\"",
        "uplink = [\"wss://127.0.0.1:8443/a\", \"quic://127.0.0.1:8443\"]",
    );
    let c = client_from_str(&cpath, &two, &no_env).unwrap();
    assert_eq!(c.exit.uplink.len(), 2);
    assert_eq!(c.exit.uplink[1].scheme, crate::leg_url::Scheme::Quic);
    let none = client_text(&f).replace("uplink = \"tls://127.0.0.1:8443\"", "uplink = []");
    let keys = keys_of(client_from_str(&cpath, &none, &no_env).err().unwrap());
    assert!(keys.iter().any(|k| k == "uplink"), "{keys:?}");
    let bad_second = client_text(&f).replace(
        "uplink = \"tls://127.0.0.1:8443\"",
        "uplink = [\"tls://127.0.0.1:8443\", \"ftp://x:1\"]",
    );
    let keys = keys_of(client_from_str(&cpath, &bad_second, &no_env).err().unwrap());
    assert!(keys.iter().any(|k| k == "uplink[1]"), "{keys:?}");
    let retry_on_client = client_text(&f) + "\n[quic]\nretry_above = 3\n";
    let keys = keys_of(
        client_from_str(&cpath, &retry_on_client, &no_env)
            .err()
            .unwrap(),
    );
    assert!(keys.iter().any(|k| k == "quic.retry_above"), "{keys:?}");
}

#[test]
fn a_keystore_replaces_the_key_file_and_its_sealer_is_checked() {
    let f = fixture();
    let text = server_text(&f).replace(
        "private_key_file = \"server.key\"",
        "[keystore]\nfile = \"keys.hpks\"\nsealer = \"keyfile:store.key\"\nrotation_overlap = \"2d\"\n",
    );
    // The [keystore] table must come after the top-level keys: move it to the end.
    let (head, rest) = text.split_once("[keystore]").unwrap();
    let (ks, tail) = rest.split_once("\n\n").unwrap_or((rest, ""));
    let text = format!("{head}{tail}\n[keystore]{ks}\n");
    let s = server_from_str(&f.dir.join("server.toml"), &text, &no_env).unwrap();
    match &s.keys {
        crate::server::keys::KeySource::Store(k) => {
            assert_eq!(k.file, f.dir.join("keys.hpks"));
            assert_eq!(
                k.sealer,
                format!("keyfile:{}", f.dir.join("store.key").display())
            );
            assert_eq!(k.overlap, std::time::Duration::from_secs(2 * 24 * 3600));
        }
        crate::server::keys::KeySource::File(_) => panic!("the key store was ignored"),
    }
    let bad = text.replace("keyfile:store.key", "magic:store.key");
    let e = server_from_str(&f.dir.join("server.toml"), &bad, &no_env)
        .err()
        .unwrap();
    assert!(e.to_string().contains("keystore.sealer"), "{e}");
    let both = format!("private_key_file = \"server.key\"\n{text}");
    let e = server_from_str(&f.dir.join("server.toml"), &both, &no_env)
        .err()
        .unwrap();
    assert!(e.to_string().contains("remove private_key_file"), "{e}");
}

fn link_for(f: &Fixture, psk: bool) -> halfpipe_core::link::ShareLink {
    let (secret, _) = halfpipe_core::handshake::generate_keypair().unwrap();
    let mut server_public = [0u8; 32];
    server_public.copy_from_slice(&decode_public(&f.server_public, "k").unwrap());
    halfpipe_core::link::ShareLink {
        server_public,
        uplinks: vec!["tcp://127.0.0.1:8443".into()],
        downlinks: vec!["tcp://127.0.0.1:8444".into()],
        user: "erin".into(),
        server_name: None,
        pin: None,
        cipher: CipherSuite::default(),
        user_secret: secret,
        psk: psk.then(|| Zeroizing::new([9u8; 32])),
    }
}

#[test]
fn a_saved_link_loads_from_its_sealed_store_and_the_config_holds_no_secret() {
    let f = fixture();
    let link = link_for(&f, true);
    let config = f.dir.join("erin.toml");
    let saved = save_link(&link, "127.0.0.1:1081", &config, None, 1).unwrap();
    assert_eq!(saved.store, f.dir.join("erin.hpks"));
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains(&encode_key(&link.user_secret)), "{text}");
    assert!(!text.contains(&encode_key(&[9u8; 32])), "{text}");
    let mode = std::fs::metadata(f.dir.join("erin-store.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the store key is private");
    let s = load_client(&config, &no_env).unwrap();
    assert_eq!(*s.exit.keys.private_key, *link.user_secret);
    assert_eq!(s.exit.keys.psk.as_deref(), Some(&[9u8; 32]));
    assert_eq!(s.exit.server_public, link.server_public);
    // Never over an existing config or store.
    assert!(matches!(
        save_link(&link, "127.0.0.1:1081", &config, None, 2),
        Err(SaveLinkError::Exists(_))
    ));
    // Key files beside a [keystore] are refused; so is a store that does not unseal.
    let both = format!("private_key_file = \"client.key\"\n{text}");
    let e = client_from_str(&config, &both, &no_env).err().unwrap();
    assert!(e.to_string().contains("live in the store"), "{e}");
    std::fs::write(f.dir.join("erin-store.key"), hex::encode([1u8; 32])).unwrap();
    let e = load_client(&config, &no_env).err().unwrap();
    assert!(
        keys_of(e).contains(&"keystore".to_string()),
        "a wrong store key is named"
    );
}

#[test]
fn a_client_store_without_a_client_key_says_how_to_make_one() {
    let f = fixture();
    let key = f.dir.join("k.key");
    halfpipe_keystore::create_key_file(&key).unwrap();
    let sealer = format!("keyfile:{}", key.display());
    halfpipe_keystore::KeyStore::create(
        f.dir.join("empty.hpks"),
        &halfpipe_keystore::Sealer::from_spec(&sealer).unwrap(),
        Default::default(),
        1,
    )
    .unwrap();
    let text = client_text(&f).replace("private_key_file = \"client.key\"", "")
        + &format!("\n[keystore]\nfile = \"empty.hpks\"\nsealer = {sealer:?}\n");
    let e = client_from_str(&f.dir.join("c.toml"), &text, &no_env)
        .err()
        .unwrap();
    assert!(e.to_string().contains("--save"), "{e}");
}

#[test]
fn count_limits_too_large_to_size_a_queue_are_refused_by_name() {
    let f = fixture();
    let text = server_text(&f)
        .replace(
            "max_streams_per_session = 1024",
            "max_streams_per_session = 2305843009213693952",
        )
        .replace(
            "max_handshakes_in_flight = 64",
            "max_handshakes_in_flight = 1000001",
        )
        .replace(
            "max_connections_per_listener = 1024",
            "max_connections_per_listener = 1000000",
        );
    let e = server_from_str(&f.dir.join("server.toml"), &text, &no_env)
        .err()
        .unwrap();
    let keys = keys_of(e.clone());
    assert_eq!(
        keys,
        vec![
            "limits.max_handshakes_in_flight".to_string(),
            "limits.max_streams_per_session".to_string()
        ],
        "{e}"
    );
    assert!(e.to_string().contains("must be at most 1000000"), "{e}");
}
