//! Counters of the exit and their Prometheus text exposition.
//!
//! Counters are plain atomics (bytes, per transport and direction, are added on the data
//! path: one relaxed add per leg read or write) or small maps under a mutex for the rare
//! events (handshake failures by reason, limit hits, tripwire fires). Gauges (sessions,
//! streams, mode) are read from the server when the page is rendered.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::leg_url::Scheme;
use crate::locks::lock;

/// Bytes through server legs of one transport.
#[derive(Default, Debug)]
pub struct LegBytes {
    /// Read from legs (client → exit: the up direction).
    pub up: AtomicU64,
    /// Written to legs (exit → client: the down direction).
    pub down: AtomicU64,
}

/// Every counter the exit exports.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Per transport, in [`Scheme::ALL`] order.
    pub leg_bytes: [LegBytes; 6],
    /// Legs accepted per transport (after authentication).
    pub legs_attached: [AtomicU64; 6],
    /// Of those, legs whose records ride inside end-to-end TLS only (channel-bound).
    pub legs_channel_bound: [AtomicU64; 6],
    /// Sessions opened since start.
    pub sessions_opened: AtomicU64,
    /// Streams opened since start.
    pub streams_opened: AtomicU64,
    handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
    limit_hits: Mutex<BTreeMap<&'static str, u64>>,
    tripwire_fires: Mutex<BTreeMap<&'static str, u64>>,
}

/// Values read from the running server when the page is rendered.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Live sessions.
    pub sessions: usize,
    /// Live streams over all sessions.
    pub streams: usize,
    /// Current mode as a number (0 open, 1 restricted, 2 lockdown).
    pub mode: u8,
    /// Seconds since start.
    pub uptime_s: u64,
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
    *lock(map).entry(key).or_default() += 1;
}

fn snapshot(map: &Mutex<BTreeMap<&'static str, u64>>) -> BTreeMap<&'static str, u64> {
    lock(map).clone()
}

impl Metrics {
    /// The byte counters of one transport.
    pub fn leg_bytes(&self, scheme: Scheme) -> &LegBytes {
        &self.leg_bytes[scheme.index()]
    }

    /// Counts a refused handshake by its reason class (`auth`, `timeout`, `banned`, …).
    pub fn handshake_failed(&self, reason: &'static str) {
        bump(&self.handshake_failures, reason);
    }

    /// Counts a limit hit (`sessions`, `streams_rate`, `handshakes_per_source`, …).
    pub fn limit_hit(&self, limit: &'static str) {
        bump(&self.limit_hits, limit);
    }

    /// Counts a tripwire firing.
    pub fn tripwire_fired(&self, kind: &'static str) {
        bump(&self.tripwire_fires, kind);
    }

    /// Handshake failures by reason, for status.
    pub fn handshake_failures(&self) -> BTreeMap<&'static str, u64> {
        snapshot(&self.handshake_failures)
    }

    /// Limit hits by limit, for status.
    pub fn limit_hits(&self) -> BTreeMap<&'static str, u64> {
        snapshot(&self.limit_hits)
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(
                out,
                "# HELP halfpipe_{name} {help}\n# TYPE halfpipe_{name} {kind}"
            );
        };
        family("sessions", "gauge", "Live sessions.");
        family("streams", "gauge", "Live streams over all sessions.");
        family(
            "mode",
            "gauge",
            "Control-plane mode: 0 open, 1 restricted, 2 lockdown.",
        );
        family(
            "uptime_seconds",
            "gauge",
            "Seconds since the server started.",
        );
        family("sessions_opened_total", "counter", "Sessions opened.");
        family("streams_opened_total", "counter", "Streams opened.");
        family(
            "leg_bytes_total",
            "counter",
            "Bytes through legs by direction and transport.",
        );
        family(
            "legs_attached_total",
            "counter",
            "Legs attached by transport.",
        );
        family(
            "legs_channel_bound_total",
            "counter",
            "Legs attached whose records ride inside end-to-end TLS only, by transport.",
        );
        family(
            "handshake_failures_total",
            "counter",
            "Refused handshakes by reason.",
        );
        family("limit_hits_total", "counter", "Limit hits by limit.");
        family("tripwire_fires_total", "counter", "Tripwire fires by kind.");
        // The HELP/TYPE block above lists families; the samples follow in the same order.
        let mut s = String::new();
        let _ = writeln!(s, "halfpipe_sessions {}", g.sessions);
        let _ = writeln!(s, "halfpipe_streams {}", g.streams);
        let _ = writeln!(s, "halfpipe_mode {}", g.mode);
        let _ = writeln!(s, "halfpipe_uptime_seconds {}", g.uptime_s);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "halfpipe_sessions_opened_total {}",
            load(&self.sessions_opened)
        );
        let _ = writeln!(
            s,
            "halfpipe_streams_opened_total {}",
            load(&self.streams_opened)
        );
        for scheme in Scheme::ALL {
            let b = self.leg_bytes(scheme);
            let t = scheme.name();
            let _ = writeln!(
                s,
                "halfpipe_leg_bytes_total{{direction=\"up\",transport=\"{t}\"}} {}",
                load(&b.up)
            );
            let _ = writeln!(
                s,
                "halfpipe_leg_bytes_total{{direction=\"down\",transport=\"{t}\"}} {}",
                load(&b.down)
            );
            let _ = writeln!(
                s,
                "halfpipe_legs_attached_total{{transport=\"{t}\"}} {}",
                load(&self.legs_attached[scheme.index()])
            );
        }
        for scheme in Scheme::ALL {
            let _ = writeln!(
                s,
                "halfpipe_legs_channel_bound_total{{transport=\"{}\"}} {}",
                scheme.name(),
                load(&self.legs_channel_bound[scheme.index()])
            );
        }
        for (label, map) in [
            ("reason", &self.handshake_failures),
            ("limit", &self.limit_hits),
            ("kind", &self.tripwire_fires),
        ] {
            let name = match label {
                "reason" => "handshake_failures_total",
                "limit" => "limit_hits_total",
                _ => "tripwire_fires_total",
            };
            for (k, v) in snapshot(map) {
                let _ = writeln!(s, "halfpipe_{name}{{{label}=\"{k}\"}} {v}");
            }
        }
        out + &s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_family_and_counts() {
        let m = Metrics::default();
        m.leg_bytes(Scheme::Quic).up.fetch_add(7, Ordering::Relaxed);
        m.handshake_failed("auth");
        m.handshake_failed("auth");
        m.limit_hit("sessions");
        m.tripwire_fired("replayed_handshakes");
        let page = m.render(&Gauges {
            sessions: 3,
            streams: 5,
            mode: 2,
            uptime_s: 9,
        });
        for line in [
            "halfpipe_sessions 3",
            "halfpipe_streams 5",
            "halfpipe_mode 2",
            "halfpipe_leg_bytes_total{direction=\"up\",transport=\"quic\"} 7",
            "halfpipe_leg_bytes_total{direction=\"down\",transport=\"tls\"} 0",
            "halfpipe_handshake_failures_total{reason=\"auth\"} 2",
            "halfpipe_limit_hits_total{limit=\"sessions\"} 1",
            "halfpipe_tripwire_fires_total{kind=\"replayed_handshakes\"} 1",
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "missing {line:?} in\n{page}"
            );
        }
        // Every sample line belongs to a declared family.
        for l in page.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(
                page.contains(&format!("# TYPE {name} ")),
                "{name} undeclared"
            );
        }
    }
}
