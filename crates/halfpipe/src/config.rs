//! Configuration files (TOML), one per role, turned into the runtime settings.
//!
//! Every problem is reported with the file, the key and the reason, and all problems are
//! collected rather than stopping at the first (`halfpipe check-config` prints them all).
//! Secrets can come from the environment instead of files: `HALFPIPE_SERVER_PRIVATE_KEY`,
//! `HALFPIPE_CLIENT_PRIVATE_KEY`, `HALFPIPE_PSK` (base64). Key files that group or others
//! can read are refused. Relative paths are relative to the config file.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use halfpipe_core::handshake::HandshakeKeys;
use halfpipe_core::record::CipherSuite;
use halfpipe_core::session::SessionConfig;
use halfpipe_core::TargetAddr;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::client::{ExitSettings, Inbound};
use crate::egress::EgressPolicy;
use crate::keyfile::{decode_key, decode_public, encode_key, read_private_key};
use crate::leg_url::LegUrl;
use crate::server::{ServerLimits, ServerSettings, User};
use crate::socks5::Socks5Auth;
use crate::tls::{client_config_with, server_config_with, ServerTrust};
use crate::transport::{
    quic, Decoy, DecoyKind, DialSettings, ListenSettings, QuicOptions, TlsDialer, WsOptions,
};

mod client_store;
mod control;

pub use client_store::{open_client_store, save_link, SaveLinkError, SavedLink};

/// Environment variable overriding the server's private key file.
pub const ENV_SERVER_KEY: &str = "HALFPIPE_SERVER_PRIVATE_KEY";
/// Environment variable overriding the client's private key file.
pub const ENV_CLIENT_KEY: &str = "HALFPIPE_CLIENT_PRIVATE_KEY";
/// Environment variable overriding the PSK file.
pub const ENV_PSK: &str = "HALFPIPE_PSK";

/// The longest duration any setting accepts (timer arithmetic stays far from overflow).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The largest count limit a config may set (sessions, streams, connections): each sizes a
/// queue or a semaphore, and a larger one would only fail at the first session.
const MAX_COUNT_LIMIT: usize = 1_000_000;

const NOT_A_PUBLIC_KEY: &str =
    "not a public key (expected 44 characters of standard base64, as printed by 'halfpipe keys gen')";

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The key, as a path (`users[1].public_key`), or `(syntax)`.
    pub key: String,
    /// What is wrong and what to do.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
    }
}

/// All problems found in a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects problems while a file is checked.
struct Check<'a> {
    file: &'a Path,
    base: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
}

impl<'a> Check<'a> {
    fn new(file: &'a Path, env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Self {
            file,
            base,
            env,
            errors: Vec::new(),
        }
    }

    fn err(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            key: key.into(),
            reason: reason.into(),
        });
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    fn duration(&mut self, key: &str, v: &Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if d > MAX_DURATION => {
                    self.err(key, "must be at most 365 days");
                    default
                }
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.err(key, "must be greater than zero");
                    default
                }
                Err(e) => {
                    self.err(
                        key,
                        format!("{s:?} is not a duration ({e}); write e.g. \"10s\" or \"500ms\""),
                    );
                    default
                }
            },
        }
    }

    fn positive(&mut self, key: &str, v: Option<usize>, default: usize) -> usize {
        match v {
            Some(0) => {
                self.err(key, "must be at least 1");
                default
            }
            Some(n) if n > MAX_COUNT_LIMIT => {
                self.err(
                    key,
                    format!("must be at most {MAX_COUNT_LIMIT} (it sizes queues and permits)"),
                );
                default
            }
            Some(n) => n,
            None => default,
        }
    }

    /// One or more leg URLs (at least one; each checked).
    fn leg_urls(&mut self, key: &str, v: &OneOrMany) -> Option<Vec<LegUrl>> {
        let v = v.as_slice();
        if v.is_empty() {
            self.err(key, "needs at least one URL");
            return None;
        }
        let urls: Vec<Option<LegUrl>> = v
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let k = if v.len() == 1 {
                    key.to_owned()
                } else {
                    format!("{key}[{i}]")
                };
                self.leg_url(&k, s)
            })
            .collect();
        urls.into_iter().collect()
    }

    fn leg_url(&mut self, key: &str, s: &str) -> Option<LegUrl> {
        s.parse()
            .map_err(|e: crate::leg_url::LegUrlError| self.err(key, e.to_string()))
            .ok()
    }

    /// A private key from the environment variable `env_var` or from `file`.
    fn private_key(
        &mut self,
        key: &str,
        file: &Option<String>,
        env_var: &str,
    ) -> Option<Zeroizing<[u8; 32]>> {
        if let Some(v) = (self.env)(env_var) {
            return decode_key(&v, env_var)
                .map_err(|e| self.err(key, e.to_string()))
                .ok();
        }
        let Some(f) = file else {
            self.err(
                key,
                format!("missing: name a key file made by 'halfpipe keys gen', or set {env_var}"),
            );
            return None;
        };
        read_private_key(&self.path(f))
            .map_err(|e| self.err(key, e.to_string()))
            .ok()
    }

    /// A `[keystore]` sealer, checked; a relative key-file path is relative to the config,
    /// like the rest.
    fn sealer(&mut self, spec: &str) -> String {
        let sealer = client_store::resolve_sealer(spec, &self.base);
        if let Err(e) = halfpipe_keystore::Sealer::from_spec(&sealer) {
            self.err("keystore.sealer", e.to_string());
        }
        sealer
    }

    /// The user key and pre-shared key from a client's sealed store.
    fn client_store(
        &mut self,
        k: &ClientKeystoreFile,
        f: &ClientFile,
    ) -> (
        Option<client_store::Secret32>,
        Option<client_store::Secret32>,
    ) {
        for (key, set) in [
            ("private_key_file", f.private_key_file.is_some()),
            ("psk_file", f.psk_file.is_some()),
        ] {
            if set {
                self.err(
                    key,
                    "with a [keystore] the client's keys live in the store: remove it",
                );
            }
        }
        let sealer = self.sealer(&k.sealer);
        let file = self.path(&k.file);
        match client_store::open_client_store(&file, &sealer) {
            Ok((key, psk)) => (Some(key), psk),
            Err(halfpipe_keystore::KeyStoreError::NoActiveKey { .. }) => {
                self.err(
                    "keystore.file",
                    format!(
                        "{} holds no client key (make one with 'halfpipe client --link LINK --save client.toml')",
                        file.display()
                    ),
                );
                (None, None)
            }
            Err(e) => {
                self.err("keystore", e.to_string());
                (None, None)
            }
        }
    }

    fn psk(&mut self, file: &Option<String>) -> Option<Zeroizing<[u8; 32]>> {
        if let Some(v) = (self.env)(ENV_PSK) {
            return decode_key(&v, ENV_PSK)
                .map_err(|e| self.err("psk_file", e.to_string()))
                .ok();
        }
        let f = file.as_ref()?;
        read_private_key(&self.path(f))
            .map_err(|e| self.err("psk_file", e.to_string()))
            .ok()
    }

    /// The `[quic]` section; `server` says which role's keys are allowed.
    fn quic(&mut self, f: &Option<QuicFile>, server: bool) -> QuicOptions {
        let d = QuicOptions::default();
        let Some(f) = f else { return d };
        let congestion = match &f.congestion {
            None => d.congestion,
            Some(v) => v.parse().unwrap_or_else(|e: String| {
                self.err("quic.congestion", e);
                d.congestion
            }),
        };
        if !server && f.retry_above.is_some() {
            self.err("quic.retry_above", "is a server setting");
        }
        let alpn = f.alpn.clone().unwrap_or(d.alpn);
        if alpn.is_empty() || alpn.len() > 255 {
            self.err("quic.alpn", "must be 1 to 255 bytes, e.g. \"h3\"");
        }
        let ack_every = f.ack_every.unwrap_or(d.ack_every);
        if !(1..=256).contains(&ack_every) {
            self.err("quic.ack_every", "must be between 1 and 256 packets");
        }
        let max_udp_payload = f.max_udp_payload.or(d.max_udp_payload);
        let payloads = quic::MIN_UDP_PAYLOAD..=quic::LOOPBACK_PAYLOAD;
        if max_udp_payload.is_some_and(|n| !payloads.contains(&n)) {
            self.err(
                "quic.max_udp_payload",
                "must be between 1200 and 65527 bytes (1452 fits Ethernet, 8952 jumbo frames)",
            );
        }
        QuicOptions {
            congestion,
            alpn,
            retry_above: f.retry_above.unwrap_or(d.retry_above),
            idle_timeout: self.duration("quic.idle_timeout", &f.idle_timeout, d.idle_timeout),
            keepalive: self.duration("quic.keepalive", &f.keepalive, d.keepalive),
            ack_every,
            max_udp_payload,
        }
    }

    /// The `[ws]` section.
    fn ws(&mut self, f: &Option<WsFile>, server: bool) -> WsOptions {
        let d = WsOptions::default();
        let Some(f) = f else { return d };
        if server && (f.host.is_some() || !f.headers.is_empty()) {
            self.err("ws.host", "host and headers are client settings");
        }
        let max_message = f.max_message.unwrap_or(d.max_message);
        if !(64 * 1024..=64 << 20).contains(&max_message) {
            self.err("ws.max_message", "must be between 65536 and 67108864 bytes");
        }
        WsOptions {
            host: f.host.clone(),
            headers: f.headers.clone().into_iter().collect(),
            max_message,
        }
    }

    /// The `[decoy]` section.
    fn decoy(&mut self, f: &Option<DecoyFile>) -> Decoy {
        let Some(f) = f else { return Decoy::default() };
        let fixed = f.status.is_some() || f.body.is_some() || f.content_type.is_some();
        let kind = match (&f.dir, &f.proxy, fixed) {
            (Some(dir), None, false) => {
                let dir = self.path(dir);
                if !dir.is_dir() {
                    self.err("decoy.dir", format!("{} is not a directory", dir.display()));
                }
                DecoyKind::Dir(dir)
            }
            (None, Some(up), false) => {
                let Some(hostport) = up.strip_prefix("http://").map(|r| r.trim_end_matches('/'))
                else {
                    self.err(
                        "decoy.proxy",
                        "must be http://host:port (the upstream of an ordinary reverse proxy)",
                    );
                    return Decoy::default();
                };
                DecoyKind::Proxy(hostport.to_owned())
            }
            (None, None, _) => {
                let DecoyKind::Fixed {
                    status,
                    content_type,
                    body,
                } = DecoyKind::default()
                else {
                    unreachable!("the default decoy is fixed")
                };
                let status = f.status.unwrap_or(status);
                if !(100..=599).contains(&status) || status == 101 {
                    self.err(
                        "decoy.status",
                        "must be an HTTP status from 100 to 599 (not 101)",
                    );
                }
                DecoyKind::Fixed {
                    status,
                    content_type: f.content_type.clone().unwrap_or(content_type),
                    body: f.body.clone().unwrap_or(body),
                }
            }
            _ => {
                self.err(
                    "decoy",
                    "choose one decoy: status/content_type/body, dir, or proxy",
                );
                DecoyKind::default()
            }
        };
        Decoy::new(kind)
    }

    fn cipher(&mut self, v: &Option<String>) -> CipherSuite {
        match v.as_deref() {
            None | Some("aes-256-gcm") => CipherSuite::Aes256Gcm,
            Some("chacha20-poly1305") => CipherSuite::ChaCha20Poly1305,
            Some(other) => {
                self.err(
                    "cipher",
                    format!(
                        "{other:?} is not a cipher: use \"aes-256-gcm\" or \"chacha20-poly1305\""
                    ),
                );
                CipherSuite::Aes256Gcm
            }
        }
    }

    fn finish<T>(self, value: Option<T>) -> Result<T, ConfigErrors> {
        match value {
            Some(v) if self.errors.is_empty() => Ok(v),
            _ => Err(ConfigErrors(self.errors)),
        }
    }
}

fn parse_toml<T: for<'de> Deserialize<'de>>(file: &Path, text: &str) -> Result<T, ConfigErrors> {
    toml::from_str(text).map_err(|e| {
        let key = match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].lines().count().max(1);
                format!("line {line}")
            }
            None => "(syntax)".into(),
        };
        ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            key,
            reason: e.message().to_owned(),
        }])
    })
}

fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        }])
    })
}

/// The process environment, for [`load_server`] and [`load_client`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

// ---- server --------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    listen: Vec<String>,
    private_key_file: Option<String>,
    psk_file: Option<String>,
    cipher: Option<String>,
    /// Keep the Noise AEAD on legs whose TLS is proven end to end.
    #[serde(default)]
    double_encrypt: bool,
    tls: Option<ServerTlsFile>,
    quic: Option<QuicFile>,
    ws: Option<WsFile>,
    decoy: Option<DecoyFile>,
    #[serde(default)]
    users: Vec<UserFile>,
    #[serde(default)]
    egress: EgressFile,
    #[serde(default)]
    limits: ServerLimitsFile,
    #[serde(default)]
    control: control::ControlFile,
    keystore: Option<KeystoreFile>,
    links: Option<LinksFile>,
}

/// `[links]`: what share links for new users carry (the exit's public side).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinksFile {
    uplink: OneOrMany,
    downlink: OneOrMany,
    server_name: Option<String>,
    pin: Option<String>,
}

/// `[keystore]`: the exit's static keys in a sealed store (rotation needs it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeystoreFile {
    file: String,
    sealer: String,
    rotation_overlap: Option<String>,
    rotate_every: Option<String>,
}

/// A client's `[keystore]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientKeystoreFile {
    file: String,
    sealer: String,
}

/// A leg URL, or several in order of preference.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// `[quic]`: QUIC tuning (both roles; `retry_above` is the server's).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct QuicFile {
    congestion: Option<String>,
    alpn: Option<String>,
    retry_above: Option<usize>,
    idle_timeout: Option<String>,
    keepalive: Option<String>,
    ack_every: Option<u32>,
    max_udp_payload: Option<u16>,
}

/// `[ws]`: WebSocket legs (`host` and `headers` are the client's).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WsFile {
    host: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    max_message: Option<usize>,
}

/// `[decoy]`: what HTTP-based listeners answer to non-legs: a fixed response
/// (`status`, `content_type`, `body`), a directory (`dir`) or an upstream (`proxy`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecoyFile {
    status: Option<u16>,
    content_type: Option<String>,
    body: Option<String>,
    dir: Option<String>,
    proxy: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerTlsFile {
    cert_file: String,
    key_file: String,
    /// Mutual TLS: clients must present a certificate from this PEM file.
    client_ca_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    name: String,
    public_key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EgressFile {
    #[serde(default)]
    allow: Vec<String>,
    connect_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerLimitsFile {
    max_sessions: Option<usize>,
    max_sessions_per_user: Option<usize>,
    max_streams_per_session: Option<usize>,
    max_handshakes_in_flight: Option<usize>,
    max_connections_per_listener: Option<usize>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    resume_window: Option<String>,
}

/// Loads and checks a server configuration.
pub fn load_server(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ServerSettings, ConfigErrors> {
    let text = read_file(path)?;
    server_from_str(path, &text, env)
}

/// Checks a server configuration given as text (`path` names it and anchors relative paths).
pub fn server_from_str(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ServerSettings, ConfigErrors> {
    let f: ServerFile = parse_toml(path, text)?;
    let mut c = Check::new(path, env);
    if f.listen.is_empty() {
        c.err(
            "listen",
            "needs at least one leg URL, e.g. [\"tls://0.0.0.0:8443\", \"tls://0.0.0.0:8444\"]",
        );
    }
    let listen: Vec<LegUrl> = f
        .listen
        .iter()
        .enumerate()
        .filter_map(|(i, s)| c.leg_url(&format!("listen[{i}]"), s))
        .collect();
    let suite = c.cipher(&f.cipher);
    let keystore = f.keystore.as_ref().map(|k| {
        if f.private_key_file.is_some() {
            c.err(
                "private_key_file",
                "with a [keystore] the server's keys live in the store: remove private_key_file",
            );
        }
        let sealer = c.sealer(&k.sealer);
        crate::server::keys::KeystoreSettings {
            file: c.path(&k.file),
            sealer,
            suite: CipherSuite::default(),
            psk: None,
            overlap: c.duration(
                "keystore.rotation_overlap",
                &k.rotation_overlap,
                Duration::from_secs(7 * 24 * 3600),
            ),
            rotate_every: k
                .rotate_every
                .as_ref()
                .map(|_| c.duration("keystore.rotate_every", &k.rotate_every, Duration::ZERO)),
        }
    });
    let private_key = match keystore {
        Some(_) => None,
        None => c.private_key("private_key_file", &f.private_key_file, ENV_SERVER_KEY),
    };
    let psk = c.psk(&f.psk_file);
    let needs_tls = listen.iter().any(|u| u.scheme.uses_tls());
    let quic = c.quic(&f.quic, true);
    let ws = c.ws(&f.ws, true);
    let decoy = c.decoy(&f.decoy);
    let tls = match (&f.tls, needs_tls) {
        (Some(t), _) => {
            let client_ca = t.client_ca_file.as_ref().map(|p| c.path(p));
            server_config_with(
                &c.path(&t.cert_file),
                &c.path(&t.key_file),
                client_ca.as_deref(),
            )
            .map_err(|e| c.err("tls", e.to_string()))
            .ok()
        }
        (None, true) => {
            c.err("tls", "a tls:// or quic:// listener needs a [tls] section with cert_file and key_file ('halfpipe cert gen' makes a development pair)");
            None
        }
        (None, false) => None,
    };
    let mut users = Vec::new();
    for (i, u) in f.users.iter().enumerate() {
        if u.name.trim().is_empty() {
            c.err(format!("users[{i}].name"), "must not be empty");
        }
        if f.users[..i].iter().any(|o| o.name == u.name) {
            c.err(
                format!("users[{i}].name"),
                format!("{:?} is listed twice", u.name),
            );
        }
        match decode_public(&u.public_key, "public key") {
            Ok(k) if users.iter().any(|x: &User| x.public_key == k) => c.err(
                format!("users[{i}].public_key"),
                "the same key is listed for another user",
            ),
            Ok(k) => users.push(User {
                name: u.name.clone(),
                public_key: k,
            }),
            Err(_) => c.err(format!("users[{i}].public_key"), NOT_A_PUBLIC_KEY),
        }
    }
    if f.users.is_empty() {
        c.err("users", "no [[users]]: nobody could connect; add one with a public key from 'halfpipe keys gen'");
    }
    let mut allow = Vec::new();
    for (i, a) in f.egress.allow.iter().enumerate() {
        match a.parse::<ipnet::IpNet>() {
            Ok(n) => allow.push(n),
            Err(_) => match a.parse::<IpAddr>() {
                Ok(ip) => allow.push(ipnet::IpNet::from(ip)),
                Err(_) => c.err(
                    format!("egress.allow[{i}]"),
                    format!("{a:?} is not a CIDR such as \"10.0.0.0/8\" or an IP address"),
                ),
            },
        }
    }
    let own: Vec<IpAddr> = listen
        .iter()
        .filter_map(|u| u.host.parse().ok())
        .filter(|ip: &IpAddr| !ip.is_unspecified())
        .collect();
    let connect_timeout = c.duration(
        "egress.connect_timeout",
        &f.egress.connect_timeout,
        Duration::from_secs(10),
    );
    let l = &f.limits;
    let defaults = ServerLimits::default();
    let session_defaults = SessionConfig::default();
    let limits = ServerLimits {
        max_sessions: c.positive("limits.max_sessions", l.max_sessions, defaults.max_sessions),
        max_sessions_per_user: c.positive(
            "limits.max_sessions_per_user",
            l.max_sessions_per_user,
            defaults.max_sessions_per_user,
        ),
        max_handshakes_in_flight: c.positive(
            "limits.max_handshakes_in_flight",
            l.max_handshakes_in_flight,
            defaults.max_handshakes_in_flight,
        ),
        max_connections_per_listener: c.positive(
            "limits.max_connections_per_listener",
            l.max_connections_per_listener,
            defaults.max_connections_per_listener,
        ),
        handshake_timeout: c.duration(
            "limits.handshake_timeout",
            &l.handshake_timeout,
            defaults.handshake_timeout,
        ),
        ..defaults
    };
    let session = SessionConfig {
        max_streams: c.positive(
            "limits.max_streams_per_session",
            l.max_streams_per_session,
            session_defaults.max_streams,
        ),
        idle_timeout: c.duration(
            "limits.idle_timeout",
            &l.idle_timeout,
            session_defaults.idle_timeout,
        ),
        resume_window: c.duration(
            "limits.resume_window",
            &l.resume_window,
            session_defaults.resume_window,
        ),
        ..session_defaults
    };
    let egress = match EgressPolicy::new(allow, own).with_interface_addresses() {
        Ok(p) => p,
        Err(e) => {
            // Fail closed: without the list of our own addresses the policy is incomplete.
            c.err(
                "egress",
                format!("cannot list this machine's interface addresses: {e}"),
            );
            EgressPolicy::default()
        }
    };
    let control = control::control(&mut c, &f.control);
    let links = links_template(&mut c, &f, &listen, suite);
    let keys = match (keystore, private_key) {
        (Some(mut ks), _) => {
            ks.suite = suite;
            ks.psk = psk.clone();
            Some(crate::server::keys::KeySource::Store(ks))
        }
        (None, Some(private_key)) => Some(crate::server::keys::KeySource::File(HandshakeKeys {
            suite,
            private_key,
            psk,
        })),
        (None, None) => None,
    };
    let settings = keys.map(|keys| ServerSettings {
        control,
        config_file: Some(path.to_owned()),
        links,
        listen,
        transport: ListenSettings {
            tls,
            quic,
            ws,
            decoy,
        },
        keys,
        users,
        egress,
        connect_timeout,
        limits,
        session,
        double_encrypt: f.double_encrypt,
    });
    c.finish(settings)
}

/// A client's settings from a share link alone: the link's legs, TLS name and pin, keys
/// and cipher, a SOCKS5 inbound on `socks`, and `state_dir` for what the client learns
/// (a rotated server key). The link's secrets reach the key parser in memory, as the
/// environment overrides would: nothing is written unsealed.
pub fn client_from_link(
    link: &halfpipe_core::link::ShareLink,
    socks: &str,
    state_dir: &Path,
) -> Result<ClientSettings, ConfigErrors> {
    let text = client_link_text(link, socks);
    let secret = Zeroizing::new(encode_key(&link.user_secret));
    let psk = link.psk.as_ref().map(|p| Zeroizing::new(encode_key(p)));
    let env = move |name: &str| match name {
        ENV_CLIENT_KEY => Some(secret.to_string()),
        ENV_PSK => psk.as_ref().map(|p| p.to_string()),
        _ => None,
    };
    client_from_str(&state_dir.join("link.toml"), &text, &env)
}

/// A client config for `link` without its secrets: the exit's key, the legs, the TLS
/// trust and the SOCKS5 listener.
fn client_link_text(link: &halfpipe_core::link::ShareLink, socks: &str) -> String {
    let quoted = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = format!(
        "server_public_key = {:?}\ncipher = {:?}\nuplink = [{}]\ndownlink = [{}]\n",
        encode_key(&link.server_public),
        link.cipher.name(),
        quoted(&link.uplinks),
        quoted(&link.downlinks),
    );
    let uses_tls = link
        .uplinks
        .iter()
        .chain(&link.downlinks)
        .any(|u| !u.starts_with("tcp://") && !u.starts_with("ws://"));
    if uses_tls {
        text.push_str("\n[tls]\n");
        if let Some(n) = &link.server_name {
            text.push_str(&format!("server_name = {n:?}\n"));
        }
        if let Some(p) = &link.pin {
            text.push_str(&format!("pin = {p:?}\n"));
        }
    }
    text.push_str(&format!("\n[socks5]\nlisten = {socks:?}\n"));
    text
}

/// The share-link template: `[links]`, else the listen URLs when their host is reachable
/// (not 0.0.0.0 / ::); the pin defaults to the TLS certificate's.
fn links_template(
    c: &mut Check,
    f: &ServerFile,
    listen: &[LegUrl],
    cipher: CipherSuite,
) -> crate::links::LinkTemplate {
    let default_pin = f
        .tls
        .as_ref()
        .and_then(|t| crate::tls::pin_of_cert_file(&c.path(&t.cert_file)).ok());
    match &f.links {
        Some(l) => {
            for (key, urls) in [("links.uplink", &l.uplink), ("links.downlink", &l.downlink)] {
                for u in urls.as_slice() {
                    c.leg_url(key, u);
                }
            }
            crate::links::LinkTemplate {
                uplinks: l.uplink.as_slice().to_vec(),
                downlinks: l.downlink.as_slice().to_vec(),
                server_name: l.server_name.clone(),
                pin: l.pin.clone().or(default_pin),
                cipher,
            }
        }
        None => {
            let reachable: Vec<String> = listen
                .iter()
                .filter(|u| !u.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()))
                .map(ToString::to_string)
                .collect();
            crate::links::LinkTemplate {
                uplinks: reachable.first().cloned().into_iter().collect(),
                downlinks: reachable
                    .get(1)
                    .or(reachable.first())
                    .cloned()
                    .into_iter()
                    .collect(),
                server_name: None,
                pin: default_pin,
                cipher,
            }
        }
    }
}

// ---- client --------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server_public_key: String,
    /// The sealed store holding the user key (and pre-shared key) instead of key files.
    keystore: Option<ClientKeystoreFile>,
    /// Where a key the exit announces during a rotation is saved and read back.
    learned_key_file: Option<String>,
    private_key_file: Option<String>,
    psk_file: Option<String>,
    cipher: Option<String>,
    /// Keep the Noise AEAD on legs whose TLS is proven end to end.
    #[serde(default)]
    double_encrypt: bool,
    uplink: OneOrMany,
    downlink: OneOrMany,
    tls: Option<ClientTlsFile>,
    quic: Option<QuicFile>,
    ws: Option<WsFile>,
    socks5: Option<ProxyInboundFile>,
    http: Option<ProxyInboundFile>,
    #[serde(default)]
    forward: Vec<ForwardFile>,
    #[serde(default)]
    limits: ClientLimitsFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientTlsFile {
    server_name: Option<String>,
    ca_file: Option<String>,
    pin: Option<String>,
    /// No certificate check at all (warned about at every start).
    #[serde(default)]
    insecure: bool,
    /// Client certificate for servers that require mutual TLS (with `key_file`).
    cert_file: Option<String>,
    key_file: Option<String>,
}

/// `[socks5]` and `[http]`: a local proxy listener with optional credentials.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyInboundFile {
    listen: String,
    username: Option<String>,
    password: Option<String>,
    #[serde(default)]
    allow_remote: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardFile {
    listen: String,
    target: String,
    #[serde(default)]
    allow_remote: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClientLimitsFile {
    /// Fresh handshake per leg after this long (forward secrecy in long sessions).
    rekey_after: Option<String>,
    /// ... or after this many bytes through the leg.
    rekey_after_bytes: Option<u64>,
    connect_timeout: Option<String>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    resume_window: Option<String>,
    hold_down: Option<String>,
    backoff_min: Option<String>,
    backoff_max: Option<String>,
    /// Sessions the client spreads its streams over (each with its own pair of legs).
    sessions: Option<usize>,
}

/// A client's checked settings: how to reach the exit and which local listeners to run.
pub struct ClientSettings {
    /// The exit.
    pub exit: ExitSettings,
    /// Local listeners.
    pub inbounds: Vec<(SocketAddr, Inbound)>,
}

/// Loads and checks a client configuration.
pub fn load_client(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClientSettings, ConfigErrors> {
    let text = read_file(path)?;
    client_from_str(path, &text, env)
}

fn local_listen(c: &mut Check, key: &str, s: &str, allow_remote: bool) -> Option<SocketAddr> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| {
            c.err(
                key,
                format!("{s:?} is not an address such as \"127.0.0.1:1080\""),
            )
        })
        .ok()?;
    if !addr.ip().is_loopback() && !allow_remote {
        c.err(key, format!("{addr} is reachable from other machines, which would make an open proxy; bind 127.0.0.1, or set allow_remote = true in this section (and require a password)"));
    }
    Some(addr)
}

fn credentials(
    c: &mut Check,
    section: &str,
    user: &Option<String>,
    pass: &Option<String>,
) -> Option<(String, String)> {
    match (user, pass) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        (None, None) => None,
        _ => {
            c.err(
                format!("{section}.username"),
                "username and password go together: set both or neither",
            );
            None
        }
    }
}

fn parse_target(s: &str) -> Option<TargetAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(TargetAddr::Ip(a));
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    (!host.is_empty() && host.len() <= 255).then(|| TargetAddr::Domain(host.to_owned(), port))
}

/// Checks a client configuration given as text.
pub fn client_from_str(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClientSettings, ConfigErrors> {
    let f: ClientFile = parse_toml(path, text)?;
    let mut c = Check::new(path, env);
    let server_public = decode_public(&f.server_public_key, "server_public_key")
        .map_err(|_| c.err("server_public_key", NOT_A_PUBLIC_KEY))
        .ok();
    let suite = c.cipher(&f.cipher);
    let (private_key, psk) = match &f.keystore {
        Some(k) => c.client_store(k, &f),
        None => (
            c.private_key("private_key_file", &f.private_key_file, ENV_CLIENT_KEY),
            c.psk(&f.psk_file),
        ),
    };
    let uplink = c.leg_urls("uplink", &f.uplink);
    let downlink = c.leg_urls("downlink", &f.downlink);
    let needs_tls = [&uplink, &downlink]
        .iter()
        .any(|u| u.iter().flatten().any(|u| u.scheme.uses_tls()));
    let quic = c.quic(&f.quic, false);
    let ws = c.ws(&f.ws, false);
    let tls = if needs_tls {
        let t = f.tls.as_ref();
        let insecure = t.is_some_and(|t| t.insecure);
        let trust = match (
            t.and_then(|t| t.ca_file.as_ref()),
            t.and_then(|t| t.pin.as_ref()),
            insecure,
        ) {
            (Some(_), Some(_), _) => {
                c.err("tls", "set ca_file or pin, not both");
                None
            }
            (Some(_), _, true) | (_, Some(_), true) => {
                c.err("tls.insecure", "insecure = true turns certificate checks off; it cannot be combined with ca_file or pin");
                None
            }
            (Some(ca), None, false) => Some(ServerTrust::CaFile(c.path(ca))),
            (None, Some(pin), false) => Some(ServerTrust::Pin(pin.clone())),
            (None, None, true) => Some(ServerTrust::Insecure),
            (None, None, false) => Some(ServerTrust::WebRoots),
        };
        let identity = match (
            t.and_then(|t| t.cert_file.as_ref()),
            t.and_then(|t| t.key_file.as_ref()),
        ) {
            (Some(cert), Some(key)) => Some((c.path(cert), c.path(key))),
            (None, None) => None,
            _ => {
                c.err(
                    "tls.cert_file",
                    "cert_file and key_file go together (the client certificate for mutual TLS)",
                );
                None
            }
        };
        let server_name = t.and_then(|t| t.server_name.clone());
        trust.and_then(|trust| {
            let ids = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
            client_config_with(&trust, ids)
                .map(|config| TlsDialer {
                    config,
                    server_name,
                })
                .map_err(|e| c.err("tls", e.to_string()))
                .ok()
        })
    } else {
        None
    };
    let mut inbounds = Vec::new();
    let proxies = [("socks5", &f.socks5), ("http", &f.http)];
    for (section, p) in proxies {
        let Some(p) = p else { continue };
        let creds = credentials(&mut c, section, &p.username, &p.password);
        let key = format!("{section}.listen");
        if let Some(a) = local_listen(&mut c, &key, &p.listen, p.allow_remote) {
            let inbound = if section == "socks5" {
                Inbound::Socks5(creds.map_or(Socks5Auth::None, |(username, password)| {
                    Socks5Auth::UserPass { username, password }
                }))
            } else {
                Inbound::HttpConnect(creds)
            };
            inbounds.push((a, inbound));
        }
    }
    for (i, fw) in f.forward.iter().enumerate() {
        let target = parse_target(&fw.target);
        if target.is_none() {
            c.err(
                format!("forward[{i}].target"),
                format!("{:?} is not host:port", fw.target),
            );
        }
        if let (Some(a), Some(t)) = (
            local_listen(
                &mut c,
                &format!("forward[{i}].listen"),
                &fw.listen,
                fw.allow_remote,
            ),
            target,
        ) {
            inbounds.push((a, Inbound::Forward(t)));
        }
    }
    if inbounds.is_empty() {
        c.err("socks5", "no inbound: add a [socks5] section (listen = \"127.0.0.1:1080\"), [http] or [[forward]]");
    }
    let l = &f.limits;
    let sd = SessionConfig::default();
    let connect_timeout = c.duration(
        "limits.connect_timeout",
        &l.connect_timeout,
        Duration::from_secs(10),
    );
    let dial_timeout = c.duration(
        "limits.handshake_timeout",
        &l.handshake_timeout,
        Duration::from_secs(10),
    );
    let idle_timeout = c.duration("limits.idle_timeout", &l.idle_timeout, sd.idle_timeout);
    let resume_window = c.duration("limits.resume_window", &l.resume_window, sd.resume_window);
    let backoff_min = c.duration(
        "limits.backoff_min",
        &l.backoff_min,
        Duration::from_millis(100),
    );
    let backoff_max = c.duration("limits.backoff_max", &l.backoff_max, Duration::from_secs(5));
    let hold_down = c.duration("limits.hold_down", &l.hold_down, Duration::from_secs(60));
    if backoff_min > backoff_max {
        c.err("limits.backoff_min", "must not exceed limits.backoff_max");
    }
    let sessions = match c.positive(
        "limits.sessions",
        l.sessions,
        crate::client::DEFAULT_SESSIONS,
    ) {
        n if n > crate::client::MAX_SESSIONS => {
            c.err(
                "limits.sessions",
                format!(
                    "must be at most {} (each session holds two connections to the exit)",
                    crate::client::MAX_SESSIONS
                ),
            );
            crate::client::DEFAULT_SESSIONS
        }
        n => n,
    };
    let rekey_after = c.duration(
        "limits.rekey_after",
        &f.limits.rekey_after,
        crate::client::DEFAULT_REKEY_AFTER,
    );
    let rekey_after_bytes = match f.limits.rekey_after_bytes {
        Some(n) if n < 1 << 20 => {
            c.err(
                "limits.rekey_after_bytes",
                "must be at least 1048576 (1 MiB)",
            );
            crate::client::DEFAULT_REKEY_AFTER_BYTES
        }
        Some(n) => n,
        None => crate::client::DEFAULT_REKEY_AFTER_BYTES,
    };
    let settings = match (server_public, private_key, uplink, downlink) {
        (Some(server_public), Some(private_key), Some(uplink), Some(downlink)) => {
            Some(ClientSettings {
                exit: ExitSettings {
                    uplink,
                    downlink,
                    hold_down,
                    transport: DialSettings { tls, quic, ws },
                    keys: HandshakeKeys {
                        suite,
                        private_key,
                        psk,
                    },
                    server_public,
                    learned_key_file: Some(
                        c.path(
                            f.learned_key_file
                                .as_deref()
                                .unwrap_or("server-key.learned"),
                        ),
                    ),
                    dial_timeout,
                    connect_timeout,
                    backoff_min,
                    backoff_max,
                    session: SessionConfig {
                        idle_timeout,
                        resume_window,
                        ..sd
                    },
                    sessions,
                    rekey_after,
                    rekey_after_bytes,
                    double_encrypt: f.double_encrypt,
                },
                inbounds,
            })
        }
        _ => None,
    };
    c.finish(settings)
}

/// Reads just enough of a file to tell its role: servers have `listen`.
pub fn is_server_config(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("listen"))
}

// ---- templates -----------------------------------------------------------------------

/// Values for [`server_toml`].
pub struct ServerTemplate<'a> {
    /// Leg listeners.
    pub listen: &'a [String],
    /// Users (name, base64 public key).
    pub users: &'a [(String, String)],
    /// CIDRs allowed despite the default deny, with the reason shown in a comment.
    pub allow: &'a [String],
    /// Why `allow` is there.
    pub allow_comment: &'a str,
}

/// A complete, commented server configuration.
pub fn server_toml(t: &ServerTemplate) -> String {
    let quoted = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "# halfpipe exit server configuration.\n\
         # Leg listeners: each accepts uplinks and downlinks; clients name one URL per leg.\n\
         listen = [{}]\n\
         # Static Noise key (mode 0600). {ENV_SERVER_KEY} (base64) overrides it.\n\
         private_key_file = \"server.key\"\n\
         cipher = \"aes-256-gcm\"\n\
         # A leg whose TLS provably runs end to end to the client (no proxy or CDN\n\
         # terminating it) skips the Noise record AEAD; true keeps both layers everywhere.\n\
         double_encrypt = false\n\n\
         [tls]\n\
         cert_file = \"cert.pem\"\n\
         key_file = \"cert.key\"\n\n",
        quoted(t.listen)
    );
    for (name, key) in t.users {
        out.push_str(&format!(
            "[[users]]\nname = {name:?}\npublic_key = {key:?}\n\n"
        ));
    }
    out.push_str(&format!(
        "[egress]\n\
         # Loopback, private, link-local, CGNAT, multicast and the server's own addresses are\n\
         # denied unless listed here.\n\
         # {}\n\
         allow = [{}]\n\
         connect_timeout = \"10s\"\n\n\
         [limits]\n\
         max_sessions = 1024\n\
         max_sessions_per_user = 16\n\
         max_streams_per_session = 1024\n\
         # Per listener: handshakes being processed, and connections open (legs included).\n\
         max_handshakes_in_flight = 64\n\
         max_connections_per_listener = 1024\n\
         handshake_timeout = \"10s\"\n\
         idle_timeout = \"300s\"\n\
         resume_window = \"60s\"\n\n\
         [control]\n\
         # Mode, rate limits, bans, tokens, audit log and admin socket live here ('halfpipe\n\
         # server init' creates it; 'halfpipe ctl --config THIS_FILE status' talks to it).\n\
         state_dir = \"state\"\n\
         # metrics = \"127.0.0.1:9464\"      # Prometheus page, loopback only\n\
         # audit_key_file = \"/etc/halfpipe/audit.key\"   # default state/keys/audit.key\n\
         checkpoint_every_records = 256\n\
         checkpoint_every = \"30s\"\n\n\
         [control.restricted]\n\
         # Who and where RESTRICTED mode still lets through.\n\
         users = []\n\
         destinations = []\n\n\
         [control.rate]\n\
         # {{ per_second = N, burst = M }} or \"off\"; survive restarts.\n\
         handshakes_per_source = {{ per_second = 20, burst = 100 }}\n\
         handshakes_global = {{ per_second = 1000, burst = 2000 }}\n\
         streams_per_user = {{ per_second = 5000, burst = 20000 }}\n\
         bytes_up_per_user = \"off\"\n\
         bytes_down_per_user = \"off\"\n\n\
         # Tripwires: threshold events within window trigger action (alert, restricted,\n\
         # lockdown, ban). Defaults shown for one; the others are listed in docs/CONTROL.md.\n\
         [control.tripwires.handshake_failures_per_source]\n\
         threshold = 20\n\
         window = \"60s\"\n\
         action = \"ban\"\n\
         ban = \"10m\"\n",
        t.allow_comment,
        quoted(t.allow)
    ));
    out
}

/// Values for [`client_toml`].
pub struct ClientTemplate<'a> {
    /// The exit's public key, base64.
    pub server_public_key: &'a str,
    /// Uplink URL.
    pub uplink: &'a str,
    /// Downlink URL.
    pub downlink: &'a str,
    /// TLS server name.
    pub server_name: &'a str,
    /// CA file path.
    pub ca_file: &'a str,
    /// SOCKS5 listen address.
    pub socks: &'a str,
    /// HTTP CONNECT listen address.
    pub http: &'a str,
}

/// A complete, commented client configuration.
pub fn client_toml(t: &ClientTemplate) -> String {
    format!(
        "# halfpipe client configuration.\n\
         server_public_key = {:?}\n\
         # Our static key: the user identity. {ENV_CLIENT_KEY} (base64) overrides it.\n\
         private_key_file = \"client.key\"\n\
         cipher = \"aes-256-gcm\"\n\
         # true: keep the Noise record AEAD even on legs whose TLS runs end to end to the exit.\n\
         double_encrypt = false\n\
         # What goes up and what comes down travel on separate legs, each on its own URL:\n\
         # tcp://, tls://, quic://, ws://host:port/path, wss://host:port/path. A list, such as\n\
         # [\"wss://cdn.example.com:443/api\", \"quic://exit.example.com:443\"], is tried in\n\
         # order; a failed URL is skipped for limits.hold_down (60 s) before it is preferred again.\n\
         uplink = {:?}\n\
         downlink = {:?}\n\n\
         [tls]\n\
         # Name checked against the certificate on both legs (default: each leg's own host).\n\
         server_name = {:?}\n\
         ca_file = {:?}\n\n\
         [socks5]\n\
         listen = {:?}\n\n\
         [http]\n\
         listen = {:?}\n\n\
         [limits]\n\
         # Streams are spread over up to this many sessions, each with its own pair of legs\n\
         # (a new one opens only when every live one carries a stream). 1 keeps one session.\n\
         sessions = {}\n\
         connect_timeout = \"10s\"\n\
         handshake_timeout = \"10s\"\n\
         idle_timeout = \"300s\"\n\
         resume_window = \"60s\"\n\
         backoff_min = \"100ms\"\n\
         backoff_max = \"5s\"\n",
        t.server_public_key, t.uplink, t.downlink, t.server_name, t.ca_file, t.socks, t.http,
        crate::client::DEFAULT_SESSIONS
    )
}

#[cfg(test)]
mod tests;
