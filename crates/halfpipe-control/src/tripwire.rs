//! Tripwires: counters over a sliding window that fire an [`Action`] once per episode, and the
//! clock-jump detector.
//!
//! # Counting
//!
//! Each [`TripwireKind`] counts events over a sliding window of `window_ms`: an event observed
//! at `t` is in the window at `now` while `now - t < window_ms`. The per-source and per-user
//! kinds ([`TripwireKind::is_keyed`]) count each key (source address, user name) separately;
//! the other kinds count all events together and ignore the key.
//!
//! # Episodes
//!
//! A tripwire fires when an event brings the count in the window up to `threshold`, i.e. when
//! the count just before the event (after dropping the events that left the window) was
//! exactly `threshold - 1`. Further events while the count stays at or above the threshold do
//! not fire again: they belong to the same episode. The episode ends as soon as the count in
//! the window is below the threshold again; the next event that brings it back up to the
//! threshold starts a new episode and fires. (So a steady stream at exactly the threshold rate
//! may fire about once per window; anything faster fires once.)
//!
//! # Memory
//!
//! Each (kind, key) keeps at most `threshold` timestamps: enough to tell whether the count is
//! at the threshold. Each kind tracks at most [`MAX_KEYS`] keys; when a new key arrives at the
//! cap the least recently observed key is forgotten (with its history). Keys longer than
//! [`MAX_KEY_LEN`] bytes are truncated. Thresholds are capped ([`MAX_KEYED_THRESHOLD`],
//! [`MAX_THRESHOLD`]), so a kind costs at most `MAX_KEYS × MAX_KEYED_THRESHOLD × 8` bytes of
//! timestamps, and only under that many events within one window.
//!
//! # Time
//!
//! `now_ms` is the caller's **monotonic** clock in milliseconds (e.g. since process start).
//! A `now_ms` lower than an earlier one is treated as equal to the latest one seen for that key,
//! so nothing panics and windows never run backwards.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::mode::{truncate, Mode};

/// The most keys a keyed kind tracks at once; the least recently observed is evicted beyond.
pub const MAX_KEYS: usize = 10_000;
/// Keys are truncated to this many bytes.
pub const MAX_KEY_LEN: usize = 128;
/// The highest threshold of a keyed kind (per-source, per-user).
pub const MAX_KEYED_THRESHOLD: u32 = 1_000;
/// The highest threshold of a kind that counts all events together.
pub const MAX_THRESHOLD: u32 = 100_000;
/// The longest window: one day.
pub const MAX_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;
/// The longest ban: thirty days.
pub const MAX_BAN_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// The default clock-jump threshold for [`ClockWatch`]: 30 s.
pub const DEFAULT_CLOCK_JUMP_THRESHOLD_MS: u64 = 30_000;

/// What a tripwire counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TripwireKind {
    /// Failed leg handshakes from one source address (keyed by source).
    HandshakeFailuresPerSource,
    /// Failed leg handshakes from all sources together.
    HandshakeFailuresTotal,
    /// Handshakes refused by the replay cache.
    ReplayedHandshakes,
    /// Connections refused by the egress policy, per user (keyed by user).
    EgressDenialsPerUser,
    /// The wall clock jumped against the monotonic clock (see [`ClockWatch`]).
    ClockJump,
    /// The audit log could not be written.
    AuditFailure,
    /// The key store failed.
    KeyStoreFailure,
}

impl TripwireKind {
    /// Every kind, in a fixed order.
    pub const ALL: [TripwireKind; 7] = [
        TripwireKind::HandshakeFailuresPerSource,
        TripwireKind::HandshakeFailuresTotal,
        TripwireKind::ReplayedHandshakes,
        TripwireKind::EgressDenialsPerUser,
        TripwireKind::ClockJump,
        TripwireKind::AuditFailure,
        TripwireKind::KeyStoreFailure,
    ];

    /// The stable name used in configuration and status.
    pub fn name(self) -> &'static str {
        match self {
            TripwireKind::HandshakeFailuresPerSource => "handshake_failures_per_source",
            TripwireKind::HandshakeFailuresTotal => "handshake_failures_total",
            TripwireKind::ReplayedHandshakes => "replayed_handshakes",
            TripwireKind::EgressDenialsPerUser => "egress_denials_per_user",
            TripwireKind::ClockJump => "clock_jump",
            TripwireKind::AuditFailure => "audit_failure",
            TripwireKind::KeyStoreFailure => "key_store_failure",
        }
    }

    /// Whether events are counted per key (source address or user name).
    pub fn is_keyed(self) -> bool {
        matches!(
            self,
            TripwireKind::HandshakeFailuresPerSource | TripwireKind::EgressDenialsPerUser
        )
    }

    /// Whether the kind must lock the server down at its first event (audit and key-store
    /// failures: the server cannot vouch for itself any more).
    pub fn must_lockdown(self) -> bool {
        matches!(
            self,
            TripwireKind::AuditFailure | TripwireKind::KeyStoreFailure
        )
    }

    /// How a system-made mode change by this tripwire is recorded: `tripwire:<name>`.
    pub fn authority_source(self) -> String {
        format!("tripwire:{}", self.name())
    }
}

impl fmt::Display for TripwireKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tripwire name that is not one of [`TripwireKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tripwire {0:?} (known: handshake_failures_per_source, handshake_failures_total, replayed_handshakes, egress_denials_per_user, clock_jump, audit_failure, key_store_failure)")]
pub struct UnknownTripwire(pub String);

impl FromStr for TripwireKind {
    type Err = UnknownTripwire;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TripwireKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownTripwire(s.to_string()))
    }
}

/// What the server does when a tripwire fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Log a security alert; nothing else.
    Alert,
    /// Escalate to [`Mode::Restricted`] (and alert).
    Restricted,
    /// Escalate to [`Mode::Lockdown`] (and alert).
    Lockdown,
    /// Refuse the key (source address or user) for `ban_ms` (and alert). Keyed kinds only.
    #[serde(rename = "ban")]
    BanSource,
}

impl Action {
    /// Every action, in a fixed order.
    pub const ALL: [Action; 4] = [
        Action::Alert,
        Action::Restricted,
        Action::Lockdown,
        Action::BanSource,
    ];

    /// The name used in configuration and status: `alert`, `restricted`, `lockdown`, `ban`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::Restricted => "restricted",
            Action::Lockdown => "lockdown",
            Action::BanSource => "ban",
        }
    }

    /// The mode the action escalates to, if it does.
    pub fn mode(self) -> Option<Mode> {
        match self {
            Action::Restricted => Some(Mode::Restricted),
            Action::Lockdown => Some(Mode::Lockdown),
            Action::Alert | Action::BanSource => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An action name that is not one of [`Action::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tripwire action {0:?} (known: alert, restricted, lockdown, ban)")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| UnknownAction(s.to_string()))
    }
}

/// How one tripwire behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TripwireConfig {
    /// How many events within the window fire it (at least 1).
    pub threshold: u32,
    /// The sliding window, in milliseconds.
    pub window_ms: u64,
    /// What to do when it fires.
    pub action: Action,
    /// How long a [`Action::BanSource`] lasts, in milliseconds (ignored by other actions).
    pub ban_ms: u64,
}

impl TripwireConfig {
    /// The default for `kind`:
    ///
    /// | kind | threshold | window | action |
    /// | --- | --- | --- | --- |
    /// | `handshake_failures_per_source` | 20 | 60 s | ban the source for 10 min |
    /// | `handshake_failures_total` | 500 | 60 s | restricted |
    /// | `replayed_handshakes` | 5 | 60 s | alert |
    /// | `egress_denials_per_user` | 50 | 60 s | alert |
    /// | `clock_jump` | 1 | 60 s | alert (the server also freezes de-escalation) |
    /// | `audit_failure` | 1 | 60 s | lockdown (enforced) |
    /// | `key_store_failure` | 1 | 60 s | lockdown (enforced) |
    pub fn default_for(kind: TripwireKind) -> Self {
        const MINUTE: u64 = 60_000;
        let (threshold, action, ban_ms) = match kind {
            TripwireKind::HandshakeFailuresPerSource => (20, Action::BanSource, 10 * MINUTE),
            TripwireKind::HandshakeFailuresTotal => (500, Action::Restricted, 0),
            TripwireKind::ReplayedHandshakes => (5, Action::Alert, 0),
            TripwireKind::EgressDenialsPerUser => (50, Action::Alert, 0),
            TripwireKind::ClockJump => (1, Action::Alert, 0),
            TripwireKind::AuditFailure => (1, Action::Lockdown, 0),
            TripwireKind::KeyStoreFailure => (1, Action::Lockdown, 0),
        };
        TripwireConfig {
            threshold,
            window_ms: MINUTE,
            action,
            ban_ms,
        }
    }

    /// Checks the configuration for `kind`: a threshold of 1 up to [`MAX_KEYED_THRESHOLD`] or
    /// [`MAX_THRESHOLD`], a window of 1 ms up to [`MAX_WINDOW_MS`], `ban` only on keyed kinds
    /// and with a `ban_ms` of 1 ms up to [`MAX_BAN_MS`], and lockdown at the first event for
    /// the kinds that [must lock down](TripwireKind::must_lockdown).
    pub fn validate(&self, kind: TripwireKind) -> Result<(), TripwireConfigError> {
        let max = if kind.is_keyed() {
            MAX_KEYED_THRESHOLD
        } else {
            MAX_THRESHOLD
        };
        if self.threshold == 0 || self.threshold > max {
            return Err(TripwireConfigError::Threshold {
                kind,
                threshold: self.threshold,
                max,
            });
        }
        if self.window_ms == 0 || self.window_ms > MAX_WINDOW_MS {
            return Err(TripwireConfigError::Window {
                kind,
                window_ms: self.window_ms,
            });
        }
        if self.action == Action::BanSource {
            if !kind.is_keyed() {
                return Err(TripwireConfigError::BanNotKeyed { kind });
            }
            if self.ban_ms == 0 || self.ban_ms > MAX_BAN_MS {
                return Err(TripwireConfigError::BanDuration {
                    kind,
                    ban_ms: self.ban_ms,
                });
            }
        }
        if kind.must_lockdown() && (self.action != Action::Lockdown || self.threshold != 1) {
            return Err(TripwireConfigError::MustLockdown {
                kind,
                action: self.action,
                threshold: self.threshold,
            });
        }
        Ok(())
    }
}

/// A tripwire configuration that is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TripwireConfigError {
    /// Threshold zero or too high.
    #[error("tripwire {kind}: threshold {threshold} is out of range (1 to {max})")]
    Threshold {
        /// The tripwire.
        kind: TripwireKind,
        /// The threshold given.
        threshold: u32,
        /// The highest allowed for this kind.
        max: u32,
    },
    /// Window zero or too long.
    #[error(
        "tripwire {kind}: window of {window_ms} ms is out of range (1 ms to {MAX_WINDOW_MS} ms)"
    )]
    Window {
        /// The tripwire.
        kind: TripwireKind,
        /// The window given.
        window_ms: u64,
    },
    /// `ban` on a kind that has no key to ban.
    #[error("tripwire {kind}: action \"ban\" needs a per-source or per-user tripwire (use alert, restricted or lockdown)")]
    BanNotKeyed {
        /// The tripwire.
        kind: TripwireKind,
    },
    /// Ban duration zero or too long.
    #[error("tripwire {kind}: ban of {ban_ms} ms is out of range (1 ms to {MAX_BAN_MS} ms)")]
    BanDuration {
        /// The tripwire.
        kind: TripwireKind,
        /// The duration given.
        ban_ms: u64,
    },
    /// An audit or key-store failure tripwire configured below lockdown.
    #[error("tripwire {kind} must lock down at the first event (action lockdown, threshold 1), not {action} at {threshold}")]
    MustLockdown {
        /// The tripwire.
        kind: TripwireKind,
        /// The action given.
        action: Action,
        /// The threshold given.
        threshold: u32,
    },
}

/// A tripwire that fired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fire {
    /// Which tripwire.
    pub kind: TripwireKind,
    /// The key (source address, user) for keyed kinds; `None` otherwise.
    pub key: Option<String>,
    /// What to do.
    pub action: Action,
    /// Events in the window when it fired (the threshold).
    pub count: u32,
    /// The window, in milliseconds.
    pub window_ms: u64,
    /// For [`Action::BanSource`]: how long to ban, in milliseconds.
    pub ban_ms: u64,
}

/// One row of [`Tripwires::status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TripwireStatus {
    /// Which tripwire.
    pub kind: TripwireKind,
    /// The key, for keyed kinds.
    pub key: Option<String>,
    /// How many times it fired (since the key was first tracked).
    pub fires: u64,
    /// Whether the count in the window is at the threshold (the episode goes on).
    pub in_episode: bool,
    /// When it last fired (the caller's monotonic milliseconds).
    pub last_fired_ms: Option<u64>,
    /// Events in the window now; saturates at the threshold.
    pub count_in_window: u32,
}

#[derive(Debug)]
struct Bucket {
    /// The most recent events, oldest first, at most `threshold` of them, non-decreasing.
    events: VecDeque<u64>,
    fires: u64,
    last_fired_ms: Option<u64>,
    /// Position in the recency order.
    seq: u64,
}

impl Bucket {
    fn count_at(&self, now_ms: u64, window_ms: u64) -> u32 {
        let n = self
            .events
            .iter()
            .filter(|&&t| now_ms.saturating_sub(t) < window_ms)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

#[derive(Debug)]
struct Wire {
    config: TripwireConfig,
    buckets: HashMap<Option<String>, Bucket>,
    /// seq → key, least recently observed first.
    recency: BTreeMap<u64, Option<String>>,
    next_seq: u64,
}

impl Wire {
    fn new(config: TripwireConfig) -> Self {
        Self {
            config,
            buckets: HashMap::new(),
            recency: BTreeMap::new(),
            next_seq: 0,
        }
    }
}

/// All the tripwires of a server.
#[derive(Debug)]
pub struct Tripwires {
    wires: BTreeMap<TripwireKind, Wire>,
}

impl Default for Tripwires {
    fn default() -> Self {
        Self::with_defaults()
    }
}

impl Tripwires {
    /// Tripwires with the given configurations; every kind not in `configs` gets
    /// [`TripwireConfig::default_for`]. Each configuration is
    /// [validated](TripwireConfig::validate).
    pub fn new(
        configs: BTreeMap<TripwireKind, TripwireConfig>,
    ) -> Result<Self, TripwireConfigError> {
        let mut wires = BTreeMap::new();
        for kind in TripwireKind::ALL {
            let config = configs
                .get(&kind)
                .copied()
                .unwrap_or_else(|| TripwireConfig::default_for(kind));
            config.validate(kind)?;
            wires.insert(kind, Wire::new(config));
        }
        Ok(Self { wires })
    }

    /// Tripwires with every default.
    pub fn with_defaults() -> Self {
        let wires = TripwireKind::ALL
            .into_iter()
            .map(|kind| (kind, Wire::new(TripwireConfig::default_for(kind))))
            .collect();
        Self { wires }
    }

    /// The configuration in force for `kind`.
    pub fn config(&self, kind: TripwireKind) -> TripwireConfig {
        self.wires
            .get(&kind)
            .map(|w| w.config)
            .unwrap_or_else(|| TripwireConfig::default_for(kind))
    }

    /// How many keys `kind` tracks now (at most [`MAX_KEYS`]).
    pub fn tracked_keys(&self, kind: TripwireKind) -> usize {
        self.wires.get(&kind).map_or(0, |w| w.buckets.len())
    }

    /// Records one event of `kind` at `now_ms` (monotonic). `key` is the source address or
    /// user for keyed kinds (events without one are counted together under no key) and is
    /// ignored by the other kinds. Returns the [`Fire`] when this event starts an episode.
    pub fn observe(&mut self, kind: TripwireKind, key: Option<&str>, now_ms: u64) -> Option<Fire> {
        let wire = self.wires.get_mut(&kind)?;
        let key = if kind.is_keyed() {
            key.map(|k| truncate(k, MAX_KEY_LEN).to_string())
        } else {
            None
        };
        let seq = wire.next_seq;
        wire.next_seq = wire.next_seq.wrapping_add(1);

        if let Some(bucket) = wire.buckets.get_mut(&key) {
            wire.recency.remove(&bucket.seq);
            bucket.seq = seq;
        } else {
            while wire.buckets.len() >= MAX_KEYS {
                let Some((_, oldest)) = wire.recency.pop_first() else {
                    break;
                };
                wire.buckets.remove(&oldest);
            }
            wire.buckets.insert(
                key.clone(),
                Bucket {
                    events: VecDeque::new(),
                    fires: 0,
                    last_fired_ms: None,
                    seq,
                },
            );
        }
        wire.recency.insert(seq, key.clone());
        let bucket = wire.buckets.get_mut(&key)?;

        let cfg = wire.config;
        let threshold = cfg.threshold.max(1) as usize;
        let t = bucket
            .events
            .back()
            .map_or(now_ms, |&last| now_ms.max(last));
        while bucket
            .events
            .front()
            .is_some_and(|&old| t - old >= cfg.window_ms)
        {
            bucket.events.pop_front();
        }
        let before = bucket.events.len();
        while bucket.events.len() >= threshold {
            bucket.events.pop_front();
        }
        bucket.events.push_back(t);

        if before + 1 == threshold {
            bucket.fires += 1;
            bucket.last_fired_ms = Some(t);
            Some(Fire {
                kind,
                key,
                action: cfg.action,
                count: cfg.threshold,
                window_ms: cfg.window_ms,
                ban_ms: if cfg.action == Action::BanSource {
                    cfg.ban_ms
                } else {
                    0
                },
            })
        } else {
            None
        }
    }

    /// The state of every tripwire at `now_ms`, for `ctl status`: one row per tracked
    /// (kind, key), ordered by kind then key, and a row with no key and zero counts for every
    /// kind that tracks nothing yet, so every kind appears.
    pub fn status(&self, now_ms: u64) -> Vec<TripwireStatus> {
        let mut out = Vec::new();
        for (&kind, wire) in &self.wires {
            if wire.buckets.is_empty() {
                out.push(TripwireStatus {
                    kind,
                    key: None,
                    fires: 0,
                    in_episode: false,
                    last_fired_ms: None,
                    count_in_window: 0,
                });
                continue;
            }
            let mut rows: Vec<_> = wire
                .buckets
                .iter()
                .map(|(key, b)| {
                    let count = b.count_at(now_ms, wire.config.window_ms);
                    TripwireStatus {
                        kind,
                        key: key.clone(),
                        fires: b.fires,
                        in_episode: count >= wire.config.threshold,
                        last_fired_ms: b.last_fired_ms,
                        count_in_window: count,
                    }
                })
                .collect();
            rows.sort_by(|a, b| a.key.cmp(&b.key));
            out.extend(rows);
        }
        out
    }
}

/// A jump of the wall clock against the monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockJump {
    /// How far the wall clock moved beyond the monotonic clock, in milliseconds: positive
    /// when it jumped forward, negative when it went back.
    pub delta_ms: i64,
}

/// Watches the wall clock against the monotonic clock.
///
/// Each [`check`](ClockWatch::check) compares how far the wall clock moved against how far the
/// monotonic clock moved since the reference point (the first check, then the last reported
/// jump). When they differ by more than `threshold_ms` in either direction, the jump is
/// reported once and the reference moves to the current readings. Since the comparison is
/// cumulative, a jump made of several steps, each below the threshold, is still caught.
#[derive(Clone, Debug)]
pub struct ClockWatch {
    threshold_ms: u64,
    reference: Option<(u64, u64)>,
}

impl Default for ClockWatch {
    fn default() -> Self {
        Self::new(DEFAULT_CLOCK_JUMP_THRESHOLD_MS)
    }
}

impl ClockWatch {
    /// A watch reporting differences larger than `threshold_ms`.
    pub fn new(threshold_ms: u64) -> Self {
        Self {
            threshold_ms,
            reference: None,
        }
    }

    /// The threshold, in milliseconds.
    pub fn threshold_ms(&self) -> u64 {
        self.threshold_ms
    }

    /// Compares the readings (`wall_ms` since the Unix epoch, `mono_ms` from any fixed start)
    /// with the reference point; the first call only sets it.
    pub fn check(&mut self, wall_ms: u64, mono_ms: u64) -> Option<ClockJump> {
        let Some((ref_wall, ref_mono)) = self.reference else {
            self.reference = Some((wall_ms, mono_ms));
            return None;
        };
        let wall = i128::from(wall_ms) - i128::from(ref_wall);
        let mono = i128::from(mono_ms) - i128::from(ref_mono);
        let delta = wall - mono;
        if delta.unsigned_abs() > u128::from(self.threshold_ms) {
            self.reference = Some((wall_ms, mono_ms));
            let delta_ms =
                i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
            Some(ClockJump { delta_ms })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threshold: u32, window_ms: u64, action: Action) -> TripwireConfig {
        TripwireConfig {
            threshold,
            window_ms,
            action,
            ban_ms: if action == Action::BanSource {
                1_000
            } else {
                0
            },
        }
    }

    fn wires(kind: TripwireKind, c: TripwireConfig) -> Tripwires {
        Tripwires::new(BTreeMap::from([(kind, c)])).unwrap()
    }

    #[test]
    fn names_round_trip() {
        for k in TripwireKind::ALL {
            assert_eq!(k.name().parse::<TripwireKind>().unwrap(), k);
            assert_eq!(k.to_string(), k.name());
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        for a in Action::ALL {
            assert_eq!(a.name().parse::<Action>().unwrap(), a);
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{a}\""));
        }
        assert_eq!(Action::BanSource.name(), "ban");
        assert!("ban_source".parse::<Action>().is_err());
        assert!("clockjump".parse::<TripwireKind>().is_err());
        assert_eq!(Action::Lockdown.mode(), Some(Mode::Lockdown));
        assert_eq!(Action::Restricted.mode(), Some(Mode::Restricted));
        assert_eq!(Action::Alert.mode(), None);
        assert_eq!(
            TripwireKind::HandshakeFailuresTotal.authority_source(),
            "tripwire:handshake_failures_total"
        );
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        for k in TripwireKind::ALL {
            TripwireConfig::default_for(k).validate(k).unwrap();
        }
        let d = TripwireConfig::default_for(TripwireKind::HandshakeFailuresPerSource);
        assert_eq!(
            (d.threshold, d.window_ms, d.action, d.ban_ms),
            (20, 60_000, Action::BanSource, 600_000)
        );
        let d = TripwireConfig::default_for(TripwireKind::HandshakeFailuresTotal);
        assert_eq!((d.threshold, d.action), (500, Action::Restricted));
        let d = TripwireConfig::default_for(TripwireKind::ReplayedHandshakes);
        assert_eq!((d.threshold, d.action), (5, Action::Alert));
        for k in [TripwireKind::AuditFailure, TripwireKind::KeyStoreFailure] {
            let d = TripwireConfig::default_for(k);
            assert_eq!((d.threshold, d.action), (1, Action::Lockdown));
        }
        let t = Tripwires::with_defaults();
        for k in TripwireKind::ALL {
            assert_eq!(t.config(k), TripwireConfig::default_for(k));
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        let k = TripwireKind::ReplayedHandshakes;
        let bad =
            |c: TripwireConfig, kind| Tripwires::new(BTreeMap::from([(kind, c)])).unwrap_err();
        assert!(matches!(
            bad(cfg(0, 1_000, Action::Alert), k),
            TripwireConfigError::Threshold { .. }
        ));
        assert!(matches!(
            bad(cfg(MAX_THRESHOLD + 1, 1_000, Action::Alert), k),
            TripwireConfigError::Threshold { .. }
        ));
        assert!(matches!(
            bad(
                cfg(MAX_KEYED_THRESHOLD + 1, 1_000, Action::Alert),
                TripwireKind::HandshakeFailuresPerSource
            ),
            TripwireConfigError::Threshold { .. }
        ));
        assert!(matches!(
            bad(cfg(1, 0, Action::Alert), k),
            TripwireConfigError::Window { .. }
        ));
        assert!(matches!(
            bad(cfg(1, MAX_WINDOW_MS + 1, Action::Alert), k),
            TripwireConfigError::Window { .. }
        ));
        assert!(matches!(
            bad(cfg(1, 1_000, Action::BanSource), k),
            TripwireConfigError::BanNotKeyed { .. }
        ));
        let mut c = cfg(1, 1_000, Action::BanSource);
        c.ban_ms = 0;
        assert!(matches!(
            bad(c, TripwireKind::EgressDenialsPerUser),
            TripwireConfigError::BanDuration { .. }
        ));
        for kind in [TripwireKind::AuditFailure, TripwireKind::KeyStoreFailure] {
            let e = bad(cfg(1, 1_000, Action::Alert), kind);
            assert!(matches!(e, TripwireConfigError::MustLockdown { .. }));
            assert!(e.to_string().contains("must lock down"));
            assert!(matches!(
                bad(cfg(2, 1_000, Action::Lockdown), kind),
                TripwireConfigError::MustLockdown { .. }
            ));
        }
        // Valid overrides are taken.
        let t = wires(k, cfg(3, 5_000, Action::Lockdown));
        assert_eq!(t.config(k), cfg(3, 5_000, Action::Lockdown));
    }

    #[test]
    fn fires_when_count_in_window_reaches_threshold() {
        let k = TripwireKind::ReplayedHandshakes;
        let mut t = wires(k, cfg(3, 1_000, Action::Restricted));
        assert_eq!(t.observe(k, None, 0), None);
        assert_eq!(t.observe(k, None, 100), None);
        let fire = t.observe(k, None, 200).unwrap();
        assert_eq!(
            fire,
            Fire {
                kind: k,
                key: None,
                action: Action::Restricted,
                count: 3,
                window_ms: 1_000,
                ban_ms: 0
            }
        );
    }

    #[test]
    fn events_outside_the_window_do_not_count() {
        let k = TripwireKind::ReplayedHandshakes;
        let mut t = wires(k, cfg(3, 1_000, Action::Alert));
        assert_eq!(t.observe(k, None, 0), None);
        assert_eq!(t.observe(k, None, 500), None);
        // At 1000 the event at 0 has left the window (1000 - 0 is not < 1000).
        assert_eq!(t.observe(k, None, 1_000), None);
        assert!(t.observe(k, None, 1_499).is_some());
    }

    #[test]
    fn fires_once_per_episode_and_again_after_it_ends() {
        let k = TripwireKind::HandshakeFailuresTotal;
        let mut t = wires(k, cfg(3, 1_000, Action::Restricted));
        let fires: Vec<u64> = (0..100u64)
            .filter(|i| t.observe(k, None, i * 10).is_some())
            .collect();
        assert_eq!(fires, vec![2], "a burst fires once");
        let st = &t.status(990)[..];
        let row = st.iter().find(|r| r.kind == k).unwrap();
        assert!(row.in_episode);
        assert_eq!(row.fires, 1);
        assert_eq!(row.last_fired_ms, Some(20));
        assert_eq!(row.count_in_window, 3);
        // Still in the episode while at least 3 events are within the window.
        assert_eq!(t.observe(k, None, 1_500), None);
        // Quiet: by 2_400 only the event at 1_500 is left; the episode has ended.
        let row = t.status(2_400).into_iter().find(|r| r.kind == k).unwrap();
        assert!(!row.in_episode);
        assert_eq!(row.count_in_window, 1);
        assert_eq!(t.observe(k, None, 2_400), None);
        let fire = t.observe(k, None, 2_410).unwrap();
        assert_eq!(fire.count, 3);
        let row = t.status(2_410).into_iter().find(|r| r.kind == k).unwrap();
        assert_eq!(row.fires, 2);
        assert_eq!(row.last_fired_ms, Some(2_410));
    }

    #[test]
    fn episode_ends_exactly_when_count_drops_below_threshold() {
        let k = TripwireKind::ReplayedHandshakes;
        let mut t = wires(k, cfg(2, 100, Action::Alert));
        assert_eq!(t.observe(k, None, 0), None);
        assert!(t.observe(k, None, 50).is_some());
        // At 99 both events are in the window: same episode.
        assert_eq!(t.observe(k, None, 99), None);
        // At 149, events 50 and 99 are in the window (2 >= 2): same episode.
        assert_eq!(t.observe(k, None, 149), None);
        // At 248 only 149 is left before this event (1 < 2): the episode ended, this fires.
        assert!(t.observe(k, None, 248).is_some());
    }

    #[test]
    fn threshold_one_fires_on_first_event() {
        let k = TripwireKind::AuditFailure;
        let mut t = Tripwires::with_defaults();
        let f = t.observe(k, Some("ignored"), 10).unwrap();
        assert_eq!(f.action, Action::Lockdown);
        assert_eq!(f.key, None, "unkeyed kinds ignore the key");
        assert_eq!(t.observe(k, None, 20), None);
        assert!(t.observe(k, None, 20 + 60_000).is_some());
    }

    #[test]
    fn keyed_kinds_count_each_key_apart() {
        let k = TripwireKind::HandshakeFailuresPerSource;
        let mut t = wires(k, cfg(2, 1_000, Action::BanSource));
        assert_eq!(t.observe(k, Some("198.51.100.1"), 0), None);
        assert_eq!(t.observe(k, Some("198.51.100.2"), 1), None);
        assert_eq!(t.observe(k, None, 1), None);
        let f = t.observe(k, Some("198.51.100.1"), 2).unwrap();
        assert_eq!(f.key.as_deref(), Some("198.51.100.1"));
        assert_eq!(f.action, Action::BanSource);
        assert_eq!(f.ban_ms, 1_000);
        assert!(t.observe(k, None, 3).unwrap().key.is_none());
        let st: Vec<_> = t.status(3).into_iter().filter(|r| r.kind == k).collect();
        assert_eq!(st.len(), 3);
        assert_eq!(st[0].key, None);
        assert_eq!(st[1].key.as_deref(), Some("198.51.100.1"));
        assert!(st[1].in_episode);
        assert_eq!(st[2].count_in_window, 1);
        assert!(!st[2].in_episode);
        // Other kinds appear with zero rows.
        let all = t.status(3);
        for kind in TripwireKind::ALL {
            assert!(all.iter().any(|r| r.kind == kind));
        }
        let r = all
            .iter()
            .find(|r| r.kind == TripwireKind::ClockJump)
            .unwrap();
        assert_eq!((r.fires, r.count_in_window, r.in_episode), (0, 0, false));
    }

    #[test]
    fn key_tracking_is_capped_and_evicts_least_recently_seen() {
        let k = TripwireKind::EgressDenialsPerUser;
        let mut t = wires(k, cfg(2, 1_000_000, Action::Alert));
        t.observe(k, Some("keep"), 0);
        for i in 0..MAX_KEYS + 500 {
            // Touch "keep" now and then so it stays recent.
            if i % 1_000 == 0 {
                let _ = t.observe(k, Some("keep"), 1);
            }
            t.observe(k, Some(&format!("user{i}")), 1);
            assert!(t.tracked_keys(k) <= MAX_KEYS);
        }
        assert_eq!(t.tracked_keys(k), MAX_KEYS);
        let st = t.status(1);
        assert!(st.iter().any(|r| r.key.as_deref() == Some("keep")));
        // The first users were evicted, the last ones are kept.
        assert!(!st.iter().any(|r| r.key.as_deref() == Some("user0")));
        let last = format!("user{}", MAX_KEYS + 499);
        assert!(st.iter().any(|r| r.key.as_deref() == Some(last.as_str())));
        // An evicted key starts from scratch.
        assert_eq!(t.observe(k, Some("user0"), 2), None);
        assert!(t.observe(k, Some("user0"), 3).is_some());
    }

    #[test]
    fn per_key_storage_is_bounded_by_threshold() {
        let k = TripwireKind::HandshakeFailuresTotal;
        let mut t = wires(k, cfg(5, 1_000_000, Action::Alert));
        for i in 0..10_000 {
            t.observe(k, None, i);
        }
        let wire = &t.wires[&k];
        assert!(wire.buckets.values().all(|b| b.events.len() <= 5));
        let row = t.status(10_000).into_iter().find(|r| r.kind == k).unwrap();
        assert_eq!(row.count_in_window, 5);
        assert_eq!(row.fires, 1);
    }

    #[test]
    fn long_keys_are_truncated_and_time_going_back_is_harmless() {
        let k = TripwireKind::HandshakeFailuresPerSource;
        let mut t = wires(k, cfg(2, 1_000, Action::Alert));
        let long = "é".repeat(MAX_KEY_LEN);
        t.observe(k, Some(&long), 5_000);
        let f = t.observe(k, Some(&long), 0).unwrap();
        assert!(f.key.unwrap().len() <= MAX_KEY_LEN);
        assert_eq!(t.observe(k, Some(&long), u64::MAX), None);
        t.status(0);
        t.status(u64::MAX);
    }

    #[test]
    fn clock_watch_reports_jumps_both_ways_once() {
        let mut w = ClockWatch::new(1_000);
        assert_eq!(w.threshold_ms(), 1_000);
        let wall0 = 1_700_000_000_000;
        assert_eq!(w.check(wall0, 0), None);
        assert_eq!(w.check(wall0 + 5_000, 5_000), None, "in step");
        assert_eq!(w.check(wall0 + 5_900, 5_000), None, "within threshold");
        let j = w.check(wall0 + 3_605_000, 10_000).unwrap();
        assert_eq!(j.delta_ms, 3_595_000);
        assert_eq!(w.check(wall0 + 3_606_000, 11_000), None, "reported once");
        let j = w.check(wall0 + 6_000, 12_000).unwrap();
        assert_eq!(j.delta_ms, -3_601_000);
        assert_eq!(w.check(wall0 + 7_000, 13_000), None);
    }

    #[test]
    fn clock_watch_catches_jumps_made_of_small_steps() {
        let mut w = ClockWatch::new(30_000);
        let mut fired = Vec::new();
        w.check(1_000_000, 0);
        for i in 1..=20u64 {
            if let Some(j) = w.check(1_000_000 + i * 1_000 + i * 2_000, i * 1_000) {
                fired.push((i, j.delta_ms));
            }
        }
        assert_eq!(fired, vec![(16, 32_000)]);
    }

    #[test]
    fn clock_watch_survives_extremes() {
        let mut w = ClockWatch::new(0);
        w.check(u64::MAX, 0);
        assert_eq!(w.check(0, u64::MAX).unwrap().delta_ms, i64::MIN);
        assert_eq!(w.check(u64::MAX, 0).unwrap().delta_ms, i64::MAX);
        let mut w = ClockWatch::default();
        assert_eq!(w.threshold_ms(), DEFAULT_CLOCK_JUMP_THRESHOLD_MS);
        w.check(10, 10);
        assert_eq!(w.check(5, 20), None, "mono ahead by 15 ms is below 30 s");
    }
}
