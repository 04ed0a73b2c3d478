//! Test harness: an exit and a client in-process on loopback, with generated keys and a
//! development certificate, plus small local targets (echo, sink) and a SOCKS5 client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use halfpipe::client::{serve_inbound, Exit, ExitSettings, Inbound};
use halfpipe::control::settings::ControlSettings;
use halfpipe::egress::EgressPolicy;
use halfpipe::leg_url::LegUrl;
use halfpipe::server::{Server, ServerHandle, ServerLimits, ServerSettings, User};
use halfpipe::transport::{DialSettings, ListenSettings, TlsDialer};
use halfpipe_core::handshake::{generate_keypair, HandshakeKeys};
use halfpipe_core::record::CipherSuite;
use halfpipe_core::session::SessionConfig;
use halfpipe_core::TargetAddr;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Adjusts the control plane's settings before the exit starts.
pub type ControlTweak = Arc<dyn Fn(&mut ControlSettings) + Send + Sync>;

/// Options for [`start`].
#[derive(Clone)]
pub struct Opts {
    /// Schemes of the uplink and the downlink listeners (`tcp`, `tls`, `quic`).
    pub legs: [&'static str; 2],
    pub allow_loopback: bool,
    pub session: SessionConfig,
    pub limits: ServerLimits,
    /// Adjusts the control plane's settings before the exit starts.
    pub control: Option<ControlTweak>,
    /// The client's leg re-key interval.
    pub rekey_after: Duration,
    /// Keep the exit's keys in a sealed key store (rotation) instead of a key file.
    pub keystore: bool,
    /// With `keystore`: rotate by itself when the active key is this old.
    pub rotate_every: Option<Duration>,
    /// `double_encrypt` of the exit and of the client: either keeps the Noise AEAD on
    /// channel-bound legs too.
    pub double_encrypt: [bool; 2],
    /// Sessions the client spreads its streams over.
    pub sessions: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            legs: ["tls", "tls"],
            allow_loopback: true,
            session: SessionConfig::default(),
            limits: ServerLimits {
                handshake_timeout: Duration::from_secs(2),
                ..ServerLimits::default()
            },
            control: None,
            rekey_after: halfpipe::client::DEFAULT_REKEY_AFTER,
            keystore: false,
            rotate_every: None,
            double_encrypt: [false; 2],
            sessions: halfpipe::client::DEFAULT_SESSIONS,
        }
    }
}

pub struct Harness {
    pub dir: PathBuf,
    pub server: ServerHandle,
    pub urls: Vec<LegUrl>,
    pub server_public: [u8; 32],
    pub user_keys: HandshakeKeys,
    pub other_user_keys: HandshakeKeys,
    pub exit: Arc<Exit>,
    pub socks: SocketAddr,
    pub http: SocketAddr,
    pub tls: Option<TlsDialer>,
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "halfpipe-test-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn keys() -> (HandshakeKeys, [u8; 32]) {
    let (private_key, public) = generate_keypair().unwrap();
    (
        HandshakeKeys {
            suite: CipherSuite::Aes256Gcm,
            private_key,
            psk: None,
        },
        public,
    )
}

pub async fn start(opts: Opts) -> Harness {
    let _ = tracing_subscriber::fmt()
        // Captured per test and shown when it fails; RUST_LOG overrides.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,halfpipe=debug,halfpipe_core=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let dir = temp_dir("h");
    // wt:// verifies the URL's host (127.0.0.1), the others the server_name (localhost).
    let cert =
        halfpipe::cert::generate_self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("cert.key"));
    halfpipe::cert::write_dev_cert(&cert, &cert_path, &key_path).unwrap();
    let (server_keys, mut server_public) = keys();
    let mut store = None;
    let key_source = if opts.keystore {
        let ks = halfpipe::server::keys::KeystoreSettings {
            file: dir.join("keys.hpks"),
            sealer: format!("keyfile:{}", dir.join("keystore.key").display()),
            suite: CipherSuite::Aes256Gcm,
            psk: None,
            overlap: Duration::from_secs(60),
            rotate_every: opts.rotate_every,
        };
        let (created, public) = ks.create(halfpipe::control::wall_ms()).unwrap();
        server_public = public;
        store = Some(created);
        halfpipe::server::keys::KeySource::Store(ks)
    } else {
        halfpipe::server::keys::KeySource::File(server_keys)
    };
    let (user_keys, user_public) = keys();
    let (other_user_keys, other_public) = keys();
    let leg = |scheme: &str| LegUrl {
        scheme: match scheme {
            "tcp" => halfpipe::leg_url::Scheme::Tcp,
            "tls" => halfpipe::leg_url::Scheme::Tls,
            "quic" => halfpipe::leg_url::Scheme::Quic,
            "ws" => halfpipe::leg_url::Scheme::Ws,
            "wss" => halfpipe::leg_url::Scheme::Wss,
            "wt" => halfpipe::leg_url::Scheme::Wt,
            other => panic!("no scheme {other}"),
        },
        host: "127.0.0.1".into(),
        port: 0,
        path: if scheme.starts_with('w') {
            "/hp".into()
        } else {
            String::new()
        },
    };
    let listen = vec![leg(opts.legs[0]), leg(opts.legs[1])];
    let allow = if opts.allow_loopback {
        vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
    } else {
        vec![]
    };
    let mut control = ControlSettings::with_state_dir(&dir.join("state"));
    if let Some(f) = &opts.control {
        f(&mut control);
    }
    halfpipe::control::init::init(&control, store.as_mut()).unwrap();
    drop(store);
    let server = Server::bind(ServerSettings {
        control,
        config_file: None,
        links: halfpipe::links::LinkTemplate::default(),
        listen,
        transport: ListenSettings {
            tls: Some(halfpipe::tls::server_config(&cert_path, &key_path).unwrap()),
            ..ListenSettings::default()
        },
        keys: key_source,
        users: vec![
            User {
                name: "alice".into(),
                public_key: user_public,
            },
            User {
                name: "mallory".into(),
                public_key: other_public,
            },
        ],
        egress: EgressPolicy::new(allow, vec![]),
        connect_timeout: Duration::from_secs(5),
        limits: opts.limits.clone(),
        session: opts.session.clone(),
        double_encrypt: opts.double_encrypt[0],
    })
    .await
    .unwrap();
    let urls = server.urls();
    let handle = server.handle();
    tokio::spawn(server.run());
    let tls = Some(TlsDialer {
        config: halfpipe::tls::client_config(&halfpipe::tls::ServerTrust::CaFile(cert_path))
            .unwrap(),
        server_name: Some("localhost".into()),
    });
    let exit = Exit::new(ExitSettings {
        uplink: vec![urls[0].clone()],
        downlink: vec![urls[1].clone()],
        hold_down: Duration::from_secs(60),
        transport: DialSettings {
            tls: tls.clone(),
            ..DialSettings::default()
        },
        keys: user_keys.clone(),
        server_public,
        learned_key_file: None,
        dial_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(500),
        session: opts.session.clone(),
        sessions: opts.sessions,
        rekey_after: opts.rekey_after,
        rekey_after_bytes: halfpipe::client::DEFAULT_REKEY_AFTER_BYTES,
        double_encrypt: opts.double_encrypt[1],
    });
    let socks_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socks = socks_l.local_addr().unwrap();
    tokio::spawn(serve_inbound(
        socks_l,
        Inbound::Socks5(halfpipe::socks5::Socks5Auth::None),
        exit.clone(),
    ));
    let http_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = http_l.local_addr().unwrap();
    tokio::spawn(serve_inbound(
        http_l,
        Inbound::HttpConnect(None),
        exit.clone(),
    ));
    Harness {
        dir,
        server: handle,
        urls,
        server_public,
        user_keys,
        other_user_keys,
        exit,
        socks,
        http,
        tls,
    }
}

/// An echo server on 127.0.0.1: every byte comes back.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

/// SOCKS5 CONNECT through `proxy`; returns the reply code and, on success, the stream.
pub async fn socks_connect(proxy: SocketAddr, target: &TargetAddr) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0]);
    let mut req = vec![5, 1, 0];
    match target {
        TargetAddr::Ip(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
        }
        TargetAddr::Ip(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
        }
        TargetAddr::Domain(d, _) => {
            req.push(3);
            req.push(d.len() as u8);
            req.extend_from_slice(d.as_bytes());
        }
    }
    req.extend_from_slice(&target.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.unwrap();
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        _ => panic!("unexpected bound address type {}", head[3]),
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip).await.unwrap();
    (head[1], s)
}

/// Deterministic pseudo-random bytes.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `total` bytes (pseudo-random by `seed`) and reads the echo concurrently, returning
/// (sha256 sent, sha256 received, bytes received). `between` runs once after `at` bytes.
pub async fn echo_transfer(
    stream: TcpStream,
    total: usize,
    seed: u64,
) -> ([u8; 32], [u8; 32], usize) {
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut sent = 0;
        let mut i = 0u64;
        while sent < total {
            let n = (total - sent).min(256 * 1024);
            let chunk = payload(n, seed.wrapping_add(i));
            h.update(&chunk);
            w.write_all(&chunk).await.unwrap();
            sent += n;
            i += 1;
        }
        w.shutdown().await.unwrap();
        h.finalize().into()
    });
    let mut h = Sha256::new();
    let mut got = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    (writer.await.unwrap(), h.finalize().into(), got)
}

/// The path of an external program the tests drive, installing it (through
/// `scripts/install-test-deps.sh`) when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let find = || {
        [
            "/usr/bin",
            "/usr/sbin",
            "/usr/local/bin",
            "/usr/local/sbin",
            "/bin",
            "/sbin",
        ]
        .iter()
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return p;
    }
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install-test-deps.sh");
    let status = std::process::Command::new("bash")
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .status();
    find().unwrap_or_else(|| {
        panic!("{name} is required by this test and {} could not install it ({status:?}); install {name} and rerun", script.display())
    })
}

/// Kills a child process when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A second client to the harness's exit with its own leg URLs (e.g. through a proxy);
/// returns it and its SOCKS5 address.
pub async fn client_via(
    h: &Harness,
    uplink: Vec<LegUrl>,
    downlink: Vec<LegUrl>,
    hold_down: Duration,
) -> (Arc<Exit>, SocketAddr) {
    let exit = Exit::new(ExitSettings {
        uplink,
        downlink,
        hold_down,
        transport: DialSettings {
            tls: h.tls.clone(),
            ..DialSettings::default()
        },
        keys: h.user_keys.clone(),
        server_public: h.server_public,
        learned_key_file: None,
        dial_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(500),
        session: SessionConfig::default(),
        sessions: halfpipe::client::DEFAULT_SESSIONS,
        rekey_after: halfpipe::client::DEFAULT_REKEY_AFTER,
        rekey_after_bytes: halfpipe::client::DEFAULT_REKEY_AFTER_BYTES,
        double_encrypt: false,
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socks = l.local_addr().unwrap();
    tokio::spawn(serve_inbound(
        l,
        Inbound::Socks5(halfpipe::socks5::Socks5Auth::None),
        exit.clone(),
    ));
    (exit, socks)
}
