//! The server's `[control]` section: state directory, admin socket, metrics, audit
//! checkpoints, RESTRICTED lists, rate limits and tripwires.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use halfpipe_control::tripwire::{Action, TripwireKind};
use halfpipe_state::ratelimit::RateSpec;
use serde::Deserialize;

use super::Check;
use crate::control::settings::{AdminTls, ControlSettings, StatePaths};
use crate::control::syslog::SyslogSettings;

/// `[control]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ControlFile {
    state_dir: Option<String>,
    audit_dir: Option<String>,
    audit_key_file: Option<String>,
    admin_socket: Option<String>,
    metrics: Option<String>,
    checkpoint_every_records: Option<u64>,
    checkpoint_every: Option<String>,
    clock_jump: Option<String>,
    admin_tls: Option<AdminTlsFile>,
    syslog: Option<SyslogFile>,
    #[serde(default)]
    restricted: RestrictedFile,
    #[serde(default)]
    rate: BTreeMap<String, RateFile>,
    #[serde(default)]
    tripwires: BTreeMap<String, TripwireFile>,
}

/// `[control.admin_tls]`: the admin API on a loopback TCP port with mutual TLS.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminTlsFile {
    listen: String,
    cert_file: String,
    key_file: String,
    client_ca_file: String,
}

/// `[control.syslog]`: forward audit records to a collector over TLS (RFC 5425).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyslogFile {
    address: String,
    server_name: Option<String>,
    ca_file: Option<String>,
    pin: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    hostname: Option<String>,
}

fn syslog(c: &mut Check, f: &SyslogFile) -> Option<SyslogSettings> {
    let key = "control.syslog";
    let host = f
        .address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']));
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        c.err(
            format!("{key}.address"),
            format!("{:?} is not host:port (RFC 5425's port is 6514)", f.address),
        );
        return None;
    };
    let name = f.server_name.clone().unwrap_or_else(|| host.to_string());
    let server_name = match rustls::pki_types::ServerName::try_from(name.clone()) {
        Ok(n) => n,
        Err(_) => {
            c.err(
                format!("{key}.server_name"),
                format!("{name:?} is not a DNS name or IP address"),
            );
            return None;
        }
    };
    let trust = match (&f.ca_file, &f.pin) {
        (Some(ca), None) => crate::tls::ServerTrust::CaFile(c.path(ca)),
        (None, Some(pin)) => crate::tls::ServerTrust::Pin(pin.clone()),
        (None, None) => crate::tls::ServerTrust::WebRoots,
        (Some(_), Some(_)) => {
            c.err(key, "give ca_file or pin, not both");
            return None;
        }
    };
    let identity = match (&f.cert_file, &f.key_file) {
        (Some(cert), Some(k)) => Some((c.path(cert), c.path(k))),
        (None, None) => None,
        _ => {
            c.err(key, "cert_file and key_file go together");
            return None;
        }
    };
    let ids = identity.as_ref().map(|(a, b)| (a.as_path(), b.as_path()));
    let tls = crate::tls::client_config_with(&trust, ids)
        .map_err(|e| c.err(key, e.to_string()))
        .ok()?;
    let hostname = f.hostname.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "halfpipe".into())
    });
    Some(SyslogSettings {
        address: f.address.clone(),
        server_name: server_name.to_owned(),
        tls,
        hostname,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestrictedFile {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    destinations: Vec<String>,
}

/// A rate: `{ per_second = 20, burst = 40 }`, or `"off"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RateFile {
    Off(String),
    Rate { per_second: u64, burst: u64 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TripwireFile {
    threshold: Option<u32>,
    window: Option<String>,
    action: Option<String>,
    ban: Option<String>,
}

const RATE_NAMES: &str = "handshakes_per_source, handshakes_global, streams_per_user, bytes_up_per_user, bytes_down_per_user";

pub(super) fn control(c: &mut Check, f: &ControlFile) -> ControlSettings {
    let dir = c.path(f.state_dir.as_deref().unwrap_or("state"));
    let paths = StatePaths::new(
        &dir,
        f.audit_dir.as_deref().map(|p| c.path(p)),
        f.audit_key_file.as_deref().map(|p| c.path(p)),
        f.admin_socket.as_deref().map(|p| c.path(p)),
    );
    if let Some(audit_dir) = paths.audit_log.parent() {
        if paths.audit_key.starts_with(audit_dir) {
            c.err(
                "control.audit_key_file",
                "must not be inside the audit directory: the signing key is kept apart from the log it signs",
            );
        }
    }
    let mut s = ControlSettings::with_state_dir(&dir);
    s.paths = paths;
    s.admin_tls = f.admin_tls.as_ref().and_then(|t| {
        let listen = match t.listen.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => Some(a),
            _ => {
                c.err(
                    "control.admin_tls.listen",
                    format!(
                        "{:?} must be a loopback address such as \"127.0.0.1:9443\"",
                        t.listen
                    ),
                );
                None
            }
        };
        let config = crate::tls::server_config_with(
            &c.path(&t.cert_file),
            &c.path(&t.key_file),
            Some(&c.path(&t.client_ca_file)),
        )
        .map_err(|e| c.err("control.admin_tls", e.to_string()))
        .ok();
        Some(AdminTls {
            listen: listen?,
            config: config?,
        })
    });
    s.syslog = f.syslog.as_ref().and_then(|f| syslog(c, f));
    s.metrics = f.metrics.as_deref().and_then(|m| match m.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_loopback() => Some(a),
        Ok(_) => {
            c.err("control.metrics", "must be a loopback address such as \"127.0.0.1:9464\" (metrics are not authenticated)");
            None
        }
        Err(_) => {
            c.err("control.metrics", format!("{m:?} is not an address such as \"127.0.0.1:9464\""));
            None
        }
    });
    if let Some(n) = f.checkpoint_every_records {
        if n == 0 {
            c.err("control.checkpoint_every_records", "must be at least 1");
        } else {
            s.checkpoint_every_records = n;
        }
    }
    s.checkpoint_every = c.duration(
        "control.checkpoint_every",
        &f.checkpoint_every,
        s.checkpoint_every,
    );
    s.clock_jump = c.duration("control.clock_jump", &f.clock_jump, s.clock_jump);
    s.restricted.users = f.restricted.users.iter().cloned().collect();
    for (i, d) in f.restricted.destinations.iter().enumerate() {
        match d
            .parse::<ipnet::IpNet>()
            .or_else(|_| d.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(n) => s.restricted.destinations.push(n),
            Err(_) => c.err(
                format!("control.restricted.destinations[{i}]"),
                format!("{d:?} is not a CIDR such as \"203.0.113.0/24\" or an IP address"),
            ),
        }
    }
    for (name, r) in &f.rate {
        let key = format!("control.rate.{name}");
        let spec = match r {
            RateFile::Off(o) if o == "off" => None,
            RateFile::Off(o) => {
                c.err(
                    &key,
                    format!("{o:?}: write {{ per_second = N, burst = M }} or \"off\""),
                );
                continue;
            }
            RateFile::Rate { per_second, burst } if *per_second == 0 || *burst == 0 => {
                c.err(
                    &key,
                    "per_second and burst must be at least 1 (or write \"off\")",
                );
                continue;
            }
            RateFile::Rate { per_second, burst } => Some(RateSpec {
                per_second: *per_second,
                burst: *burst,
            }),
        };
        let slot = match name.as_str() {
            "handshakes_per_source" => &mut s.rates.handshakes_per_source,
            "handshakes_global" => &mut s.rates.handshakes_global,
            "streams_per_user" => &mut s.rates.streams_per_user,
            "bytes_up_per_user" => &mut s.rates.bytes_up_per_user,
            "bytes_down_per_user" => &mut s.rates.bytes_down_per_user,
            _ => {
                c.err(&key, format!("unknown rate limit (known: {RATE_NAMES})"));
                continue;
            }
        };
        *slot = spec;
    }
    for (name, t) in &f.tripwires {
        let key = format!("control.tripwires.{name}");
        let Ok(kind) = name.parse::<TripwireKind>() else {
            let known: Vec<&str> = TripwireKind::ALL.iter().map(|k| k.name()).collect();
            c.err(
                &key,
                format!("unknown tripwire (known: {})", known.join(", ")),
            );
            continue;
        };
        let mut cfg = halfpipe_control::tripwire::TripwireConfig::default_for(kind);
        if let Some(n) = t.threshold {
            if n == 0 {
                c.err(format!("{key}.threshold"), "must be at least 1");
            } else {
                cfg.threshold = n;
            }
        }
        let window = Duration::from_millis(cfg.window_ms);
        cfg.window_ms = c
            .duration(&format!("{key}.window"), &t.window, window)
            .as_millis() as u64;
        let ban = Duration::from_millis(cfg.ban_ms);
        cfg.ban_ms = c.duration(&format!("{key}.ban"), &t.ban, ban).as_millis() as u64;
        if let Some(a) = &t.action {
            match a.parse::<Action>() {
                Ok(a) => cfg.action = a,
                Err(_) => c.err(
                    format!("{key}.action"),
                    format!("{a:?}: one of alert, restricted, lockdown, ban"),
                ),
            }
        }
        if matches!(
            kind,
            TripwireKind::AuditFailure | TripwireKind::KeyStoreFailure
        ) && cfg.action != Action::Lockdown
        {
            c.err(
                format!("{key}.action"),
                "must stay \"lockdown\": the exit does not serve without an audit trail or key store",
            );
        }
        if cfg.action == Action::BanSource && kind != TripwireKind::HandshakeFailuresPerSource {
            c.err(
                format!("{key}.action"),
                "\"ban\" bans a source address, so only handshake_failures_per_source can use it",
            );
        }
        if let Err(e) = cfg.validate(kind) {
            c.err(&key, e.to_string());
        }
        s.tripwires.insert(kind, cfg);
    }
    s
}
