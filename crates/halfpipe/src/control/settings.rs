//! What the control plane is configured with, and where its state lives on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use halfpipe_control::tripwire::{TripwireConfig, TripwireKind};
use halfpipe_state::ratelimit::RateSpec;
use ipnet::IpNet;

/// The files of one exit's state directory.
///
/// ```text
/// state_dir/            0700
///   mode.json           current mode (checksummed, fsync'd)
///   state.redb          rate limits, bans, tokens, runtime users
///   pepper              token HMAC key (0600)
///   admin.token         bootstrap admin token written by `server init` (0600)
///   admin/admin.sock    admin API socket (directory 0700, socket 0600)
///   audit/audit.log     the audit log, and audit.head (latest signed checkpoint)
///   keys/audit.key      the audit signing key: apart from the log directory
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatePaths {
    /// The state directory.
    pub dir: PathBuf,
    /// Persisted mode.
    pub mode_file: PathBuf,
    /// The redb database.
    pub db: PathBuf,
    /// The token pepper.
    pub pepper: PathBuf,
    /// Where `server init` writes the bootstrap admin token.
    pub bootstrap_token: PathBuf,
    /// The audit log.
    pub audit_log: PathBuf,
    /// The latest signed checkpoint, beside the log.
    pub audit_head: PathBuf,
    /// The audit signing key (never inside the audit directory).
    pub audit_key: PathBuf,
    /// The admin API socket.
    pub admin_socket: PathBuf,
}

impl StatePaths {
    /// The default layout under `dir`, with optional overrides for the audit directory,
    /// the audit key and the admin socket.
    pub fn new(
        dir: &Path,
        audit_dir: Option<PathBuf>,
        audit_key: Option<PathBuf>,
        admin_socket: Option<PathBuf>,
    ) -> Self {
        let audit_dir = audit_dir.unwrap_or_else(|| dir.join("audit"));
        Self {
            dir: dir.to_owned(),
            mode_file: dir.join("mode.json"),
            db: dir.join("state.redb"),
            pepper: dir.join("pepper"),
            bootstrap_token: dir.join("admin.token"),
            audit_log: audit_dir.join("audit.log"),
            audit_head: audit_dir.join("audit.head"),
            audit_key: audit_key.unwrap_or_else(|| dir.join("keys").join("audit.key")),
            admin_socket: admin_socket.unwrap_or_else(|| dir.join("admin").join("admin.sock")),
        }
    }
}

/// Rate limits (each `None` when switched off).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rates {
    /// Handshakes per source address.
    pub handshakes_per_source: Option<RateSpec>,
    /// Handshakes over all sources.
    pub handshakes_global: Option<RateSpec>,
    /// New streams per user.
    pub streams_per_user: Option<RateSpec>,
    /// Bytes per second up (client → exit) per user.
    pub bytes_up_per_user: Option<RateSpec>,
    /// Bytes per second down (exit → client) per user.
    pub bytes_down_per_user: Option<RateSpec>,
}

impl Rates {
    /// The defaults: handshakes limited per source and overall, streams per user; byte
    /// rates off.
    pub fn defaults() -> Self {
        Self {
            handshakes_per_source: Some(RateSpec {
                per_second: 20,
                burst: 100,
            }),
            handshakes_global: Some(RateSpec {
                per_second: 1000,
                burst: 2000,
            }),
            streams_per_user: Some(RateSpec {
                per_second: 5000,
                burst: 20000,
            }),
            bytes_up_per_user: None,
            bytes_down_per_user: None,
        }
    }
}

/// What RESTRICTED mode still lets through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restricted {
    /// Users that may open sessions.
    pub users: BTreeSet<String>,
    /// Destination ranges streams may reach (on top of the egress policy).
    pub destinations: Vec<IpNet>,
}

/// The optional TCP admin listener: loopback only, mutual TLS.
#[derive(Clone, Debug)]
pub struct AdminTls {
    /// Where to listen (a loopback address).
    pub listen: SocketAddr,
    /// Server certificate, with client certificates required.
    pub config: std::sync::Arc<rustls::ServerConfig>,
}

/// Everything the control plane is configured with.
#[derive(Clone, Debug)]
pub struct ControlSettings {
    /// Where its state lives.
    pub paths: StatePaths,
    /// The admin API on TCP as well (mutual TLS), besides the Unix socket.
    pub admin_tls: Option<AdminTls>,
    /// Copies of the audit records to a remote syslog over TLS.
    pub syslog: Option<super::syslog::SyslogSettings>,
    /// Prometheus metrics listener (loopback only).
    pub metrics: Option<SocketAddr>,
    /// A signed checkpoint after this many audit records.
    pub checkpoint_every_records: u64,
    /// And at least this often.
    pub checkpoint_every: Duration,
    /// Tripwires by kind.
    pub tripwires: BTreeMap<TripwireKind, TripwireConfig>,
    /// Rate limits.
    pub rates: Rates,
    /// RESTRICTED mode's lists.
    pub restricted: Restricted,
    /// A wall-clock jump against the monotonic clock beyond this trips the clock tripwire.
    pub clock_jump: Duration,
}

impl ControlSettings {
    /// Opens (or creates) the audit log of these paths, signed by `key`, with these
    /// checkpoint settings.
    pub fn open_audit_log(
        &self,
        key: halfpipe_audit::AuditKey,
    ) -> Result<halfpipe_audit::AuditLog, halfpipe_audit::AuditError> {
        let policy = halfpipe_audit::CheckpointPolicy {
            every_records: self.checkpoint_every_records,
            every: self.checkpoint_every,
        };
        halfpipe_audit::AuditLog::open(&self.paths.audit_log, &self.paths.audit_head, key, policy)
    }

    /// Defaults for a state directory (used by tests and as the config's defaults).
    pub fn with_state_dir(dir: &Path) -> Self {
        Self {
            paths: StatePaths::new(dir, None, None, None),
            admin_tls: None,
            syslog: None,
            metrics: None,
            checkpoint_every_records: 256,
            checkpoint_every: Duration::from_secs(30),
            tripwires: TripwireKind::ALL
                .into_iter()
                .map(|k| (k, TripwireConfig::default_for(k)))
                .collect(),
            rates: Rates::defaults(),
            restricted: Restricted::default(),
            clock_jump: Duration::from_secs(30),
        }
    }
}
