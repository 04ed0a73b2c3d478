//! Rate limits and byte budgets: GCRA over the [service clock](crate::clock), keyed by
//! strings such as `"src:1.2.3.4"`, `"user:alice:streams"`, `"user:alice:up"` or
//! `"global:handshakes"`.
//!
//! # The arithmetic
//!
//! Each key holds one number, its *theoretical arrival time* (TAT) in nanoseconds of served
//! time. For a [`RateSpec`] of `per_second` units (requests or bytes) and `burst` units, one
//! unit costs `T = 1e9 / per_second` ns and the bucket holds `tau = burst · T` ns of
//! credit. A request of `cost` units at `now`, with debt `d = max(0, TAT − now)`:
//!
//! - conforms if `d == 0` (the bucket is full), or if `cost ≤ burst` and `d + cost·T ≤ tau`;
//! - then `TAT ← max(TAT, now) + cost·T`; a refused request changes nothing.
//!
//! `cost·T` is rounded up and `tau` down (in integer nanoseconds, 128-bit intermediates,
//! saturating), so rounding only ever makes the limit stricter, by under 1 ns per request.
//! When `1e9` is a multiple of `per_second` there is no rounding at all, and the limiter
//! decides exactly like a continuous token bucket (property-tested against one).
//!
//! # Costs larger than the burst
//!
//! Such a request is **allowed when the bucket is full, and the excess is charged as debt**:
//! the key then waits until the debt is paid back at `per_second`. So a byte budget with a
//! small burst still makes progress on large chunks, and the long-run rate is still
//! `per_second` (over any window, at most `max(burst, largest cost) + per_second · window`
//! units pass). The [`RetryAfter`] for such a request is the time until the bucket is full.
//!
//! # Edge cases
//!
//! - `per_second == 0` allows nothing, ever: [`RetryAfter`] is `u64::MAX` ms (fail closed;
//!   a caller that wants no limit does not call [`Limiter::check`]).
//! - `burst == 0` lets one request through at a time, each charged as debt.
//! - `cost == 0` conforms unless the key is in debt beyond its burst; it changes nothing.
//!
//! # Memory and persistence
//!
//! At most [`Limiter::max_keys`] keys are held. A key whose TAT is in the past is exactly a
//! full bucket, so dropping it is harmless; when the table is full those go first, and if
//! every key is in debt the eighth closest to full is evicted (those lose the least). The
//! state is written to the database by [`StateDb::flush`](crate::StateDb::flush) (only the
//! keys changed since the last flush) and reloaded at open, so budgets survive a restart.
//! [`Limiter::check`] itself never touches the database: one mutex, one hash lookup.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const NS_PER_S: u128 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

/// How much may pass: `per_second` units (requests or bytes) per second, with bursts of up
/// to `burst` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateSpec {
    /// Sustained rate, in units per second. `0` allows nothing.
    pub per_second: u64,
    /// Bucket size, in units.
    pub burst: u64,
}

impl RateSpec {
    /// A spec of `per_second` units per second with bursts of `burst` units.
    pub const fn new(per_second: u64, burst: u64) -> Self {
        Self { per_second, burst }
    }
}

/// A refusal: the same request will conform after `ms` milliseconds of served time (if
/// nothing else is charged to the key meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: retry after {ms} ms")]
pub struct RetryAfter {
    /// Milliseconds to wait; at least 1. `u64::MAX` means never.
    pub ms: u64,
}

impl RetryAfter {
    /// The wait as a [`Duration`].
    pub fn duration(self) -> Duration {
        Duration::from_millis(self.ms)
    }
}

/// The GCRA step. `Ok(new_tat)` if the request conforms, `Err(wait_ns)` (> 0) if not.
pub(crate) fn gcra(tat_ns: u64, now_ns: u64, spec: RateSpec, cost: u64) -> Result<u64, u64> {
    if spec.per_second == 0 {
        return Err(u64::MAX);
    }
    let ps = u128::from(spec.per_second);
    let sat = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
    // cost·T rounded up, tau rounded down.
    let inc = sat((u128::from(cost) * NS_PER_S).div_ceil(ps));
    let tau = sat(u128::from(spec.burst) * NS_PER_S / ps);
    let debt = tat_ns.saturating_sub(now_ns);
    let conforms = debt == 0 || (cost <= spec.burst && debt.saturating_add(inc) <= tau);
    if conforms {
        Ok(tat_ns.max(now_ns).saturating_add(inc))
    } else if cost > spec.burst {
        // Oversized: wait until the bucket is full.
        Err(debt)
    } else {
        Err(debt.saturating_add(inc).saturating_sub(tau).max(1))
    }
}

fn ns_to_retry(wait_ns: u64) -> RetryAfter {
    let ms = if wait_ns == u64::MAX {
        // Never (a zero rate, or debt saturated at the end of time).
        u64::MAX
    } else {
        wait_ns.div_ceil(NS_PER_MS).max(1)
    };
    RetryAfter { ms }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    tat_ns: u64,
    /// Changed since the last flush.
    dirty: bool,
    /// May have a row in the database (so dropping it must delete the row).
    persisted: bool,
}

#[derive(Debug, Default)]
struct State {
    map: HashMap<String, Entry>,
    /// Keys dropped from `map` whose database rows must be deleted at the next flush.
    /// Always disjoint from `map`'s keys, so never larger than the table.
    removed: HashSet<String>,
}

/// What a flush must write: rows to upsert (key, TAT in ns) and rows to delete.
#[derive(Debug, Default)]
pub(crate) struct LimiterChanges {
    pub(crate) upserts: Vec<(String, u64)>,
    pub(crate) removes: Vec<String>,
}

/// GCRA rate limiter over many keys; see the [module documentation](self).
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    max_keys: usize,
}

/// The default cap on keys held by a [`Limiter`].
pub const DEFAULT_MAX_KEYS: usize = 100_000;

impl Limiter {
    /// An empty limiter holding at most `max_keys` keys (at least 1). Not persisted by
    /// itself; the one inside [`StateDb`](crate::StateDb) is.
    pub fn new(max_keys: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_keys: max_keys.max(1),
        }
    }

    /// Charges `cost` units to `key` at `now_ms` (service clock) under `spec`, or says how
    /// long to wait. A refused request charges nothing.
    pub fn check(
        &self,
        key: &str,
        spec: RateSpec,
        cost: u64,
        now_ms: u64,
    ) -> Result<(), RetryAfter> {
        let now_ns = now_ms.saturating_mul(NS_PER_MS);
        let mut st = self.lock();
        if let Some(e) = st.map.get_mut(key) {
            let tat = gcra(e.tat_ns, now_ns, spec, cost).map_err(ns_to_retry)?;
            if tat != e.tat_ns {
                e.tat_ns = tat;
                e.dirty = true;
            }
            return Ok(());
        }
        // Unknown key: a full bucket.
        let tat = gcra(0, now_ns, spec, cost).map_err(ns_to_retry)?;
        if tat <= now_ns {
            // Still a full bucket: nothing to remember.
            return Ok(());
        }
        if st.map.len() >= self.max_keys {
            evict(&mut st, now_ns, self.max_keys);
        }
        let persisted = st.removed.remove(key);
        st.map.insert(
            key.to_owned(),
            Entry {
                tat_ns: tat,
                dirty: true,
                persisted,
            },
        );
        Ok(())
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys held at once.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Forgets `key` (its bucket becomes full). Persisted at the next flush.
    pub fn reset(&self, key: &str) {
        let mut st = self.lock();
        if let Some(e) = st.map.remove(key) {
            if e.persisted {
                st.removed.insert(key.to_owned());
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain numbers; a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A limiter holding rows loaded from the database (key, TAT in ns). If there are more
    /// than `max_keys`, those closest to full are dropped (and deleted at the next flush).
    pub(crate) fn load(max_keys: usize, mut rows: Vec<(String, u64)>) -> Self {
        let limiter = Self::new(max_keys);
        {
            let mut st = limiter.lock();
            rows.sort_unstable_by_key(|r| std::cmp::Reverse(r.1));
            for (i, (key, tat_ns)) in rows.into_iter().enumerate() {
                if i < limiter.max_keys {
                    let e = Entry {
                        tat_ns,
                        dirty: false,
                        persisted: true,
                    };
                    st.map.insert(key, e);
                } else {
                    st.removed.insert(key);
                }
            }
        }
        limiter
    }

    /// Takes what changed since the last call, dropping keys that are full buckets at
    /// `now_ms` (their rows are deleted). Marks the rows taken as persisted.
    pub(crate) fn take_changes(&self, now_ms: u64) -> LimiterChanges {
        let now_ns = now_ms.saturating_mul(NS_PER_MS);
        let mut st = self.lock();
        let st = &mut *st;
        let mut changes = LimiterChanges::default();
        st.map.retain(|key, e| {
            if e.tat_ns <= now_ns {
                if e.persisted {
                    st.removed.insert(key.clone());
                }
                return false;
            }
            if e.dirty {
                changes.upserts.push((key.clone(), e.tat_ns));
                e.dirty = false;
                e.persisted = true;
            }
            true
        });
        changes.removes = st.removed.drain().collect();
        changes
    }

    /// Puts back changes whose flush failed, so the next flush writes them.
    pub(crate) fn restore_changes(&self, changes: LimiterChanges) {
        let mut st = self.lock();
        for (key, _) in changes.upserts {
            if let Some(e) = st.map.get_mut(&key) {
                e.dirty = true;
            }
        }
        for key in changes.removes {
            if !st.map.contains_key(&key) {
                st.removed.insert(key);
            }
        }
    }
}

/// Makes room for one key: drops full buckets, and if that frees nothing, the eighth of the
/// keys closest to full (one O(n) pass frees n/8 slots, so inserts stay O(1) amortised).
fn evict(st: &mut State, now_ns: u64, max_keys: usize) {
    let State { map, removed } = st;
    map.retain(|key, e| {
        let keep = e.tat_ns > now_ns;
        if !keep && e.persisted {
            removed.insert(key.clone());
        }
        keep
    });
    if map.len() < max_keys {
        return;
    }
    let n = (max_keys / 8).max(1);
    let mut by_tat: Vec<(u64, &String)> = map.iter().map(|(k, e)| (e.tat_ns, k)).collect();
    let n = n.min(by_tat.len());
    if n < by_tat.len() {
        by_tat.select_nth_unstable(n - 1);
    }
    let victims: Vec<String> = by_tat[..n].iter().map(|(_, k)| (*k).clone()).collect();
    for key in victims {
        if let Some(e) = map.remove(&key) {
            if e.persisted {
                removed.insert(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn burst_then_throttle_with_the_right_retry_after() {
        let l = Limiter::new(16);
        let spec = RateSpec::new(10, 5); // one every 100 ms, five at once
        for _ in 0..5 {
            l.check("src:1.2.3.4", spec, 1, 1_000).unwrap();
        }
        assert_eq!(
            l.check("src:1.2.3.4", spec, 1, 1_000),
            Err(RetryAfter { ms: 100 })
        );
        assert_eq!(
            l.check("src:1.2.3.4", spec, 1, 1_099),
            Err(RetryAfter { ms: 1 })
        );
        l.check("src:1.2.3.4", spec, 1, 1_100).unwrap();
        assert_eq!(
            l.check("src:1.2.3.4", spec, 1, 1_100),
            Err(RetryAfter { ms: 100 })
        );
        // Other keys are independent.
        l.check("src:5.6.7.8", spec, 5, 1_100).unwrap();
        // A cost of 3 needs 3 units: after 1 s of idling the bucket is full again.
        l.check("src:1.2.3.4", spec, 3, 2_100).unwrap();
        l.check("src:1.2.3.4", spec, 2, 2_100).unwrap();
        assert_eq!(
            l.check("src:1.2.3.4", spec, 3, 2_100),
            Err(RetryAfter { ms: 300 })
        );
    }

    #[test]
    fn byte_budget_retry_after_is_exactly_enough() {
        let l = Limiter::new(16);
        let spec = RateSpec::new(1 << 20, 256 << 10); // 1 MiB/s, 256 KiB burst
        for _ in 0..4 {
            l.check("user:alice:up", spec, 64 << 10, 0).unwrap();
        }
        let RetryAfter { ms } = l.check("user:alice:up", spec, 64 << 10, 0).unwrap_err();
        // 64 KiB at 1 MiB/s is 62.5 ms: rounded up.
        assert_eq!(ms, 63);
        assert!(l.check("user:alice:up", spec, 64 << 10, ms - 1).is_err());
        l.check("user:alice:up", spec, 64 << 10, ms).unwrap();
    }

    #[test]
    fn a_cost_above_the_burst_passes_on_a_full_bucket_and_is_charged_as_debt() {
        let l = Limiter::new(16);
        let spec = RateSpec::new(1_000, 100); // 1 unit per ms
        l.check("k", spec, 500, 0).unwrap();
        // 500 units charged: the bucket is full again at 500 ms.
        assert_eq!(l.check("k", spec, 1, 0), Err(RetryAfter { ms: 401 }));
        assert_eq!(l.check("k", spec, 500, 0), Err(RetryAfter { ms: 500 }));
        assert_eq!(l.check("k", spec, 500, 499), Err(RetryAfter { ms: 1 }));
        l.check("k", spec, 500, 500).unwrap();
        // burst 0: one at a time.
        let zero = RateSpec::new(1_000, 0);
        l.check("z", zero, 10, 0).unwrap();
        assert_eq!(l.check("z", zero, 10, 5), Err(RetryAfter { ms: 5 }));
        l.check("z", zero, 10, 10).unwrap();
    }

    #[test]
    fn zero_rate_allows_nothing() {
        let l = Limiter::new(16);
        assert_eq!(
            l.check("k", RateSpec::new(0, 1_000), 1, 0),
            Err(RetryAfter { ms: u64::MAX })
        );
    }

    #[test]
    fn hostile_numbers_saturate() {
        let l = Limiter::new(16);
        let huge = RateSpec::new(u64::MAX, u64::MAX);
        l.check("a", huge, u64::MAX, u64::MAX).unwrap();
        l.check("b", RateSpec::new(1, 0), u64::MAX, 0).unwrap();
        // Debt saturated at the end of time: refused, for ever.
        let r = l.check("b", RateSpec::new(1, 0), 1, 0).unwrap_err();
        assert_eq!(r.ms, u64::MAX);
        let r = l
            .check("b", RateSpec::new(1, 0), 1, u64::MAX / NS_PER_MS)
            .unwrap_err();
        assert!(r.ms > 0 && r.ms < u64::MAX);
        l.check("c", RateSpec::new(1, u64::MAX), u64::MAX, 0)
            .unwrap();
    }

    #[test]
    fn the_key_cap_holds_and_full_buckets_go_first() {
        let l = Limiter::new(8);
        let spec = RateSpec::new(1, 1); // 1 s per unit
                                        // Eight keys in debt at different depths.
        for i in 0..8u64 {
            l.check(&format!("src:{i}"), spec, 1 + i, 0).unwrap();
        }
        assert_eq!(l.len(), 8);
        // A ninth evicts one key (8 / 8): the one closest to full, src:0.
        l.check("src:new", spec, 1, 0).unwrap();
        assert_eq!(l.len(), 8);
        assert!(l.check("src:0", spec, 1, 0).is_ok(), "src:0 was evicted");
        assert!(l.check("src:7", spec, 1, 0).is_err(), "src:7 is still held");
        // Past their TATs, keys are full buckets and are dropped before any other.
        for i in 0..100 {
            l.check(&format!("late:{i}"), spec, 1, 20_000 + i).unwrap();
            assert!(l.len() <= 8);
        }
    }

    #[test]
    fn flush_bookkeeping_writes_changes_once_and_deletes_dropped_rows() {
        let l = Limiter::new(4);
        let spec = RateSpec::new(1, 1);
        l.check("a", spec, 1, 0).unwrap();
        l.check("b", spec, 1, 0).unwrap();
        let c = l.take_changes(0);
        assert_eq!(c.upserts.len(), 2);
        assert!(c.removes.is_empty());
        assert!(l.take_changes(0).upserts.is_empty(), "nothing changed");
        // At 1 s both are full buckets: dropped, rows deleted.
        let c = l.take_changes(1_000);
        let mut removes = c.removes.clone();
        removes.sort();
        assert_eq!(removes, ["a", "b"]);
        assert!(l.is_empty());
        // A failed flush is put back.
        l.check("c", spec, 1, 2_000).unwrap();
        let c = l.take_changes(2_000);
        assert_eq!(c.upserts.len(), 1);
        l.restore_changes(c);
        assert_eq!(l.take_changes(2_000).upserts.len(), 1);
    }

    /// The continuous token bucket, in exact integer nano-units.
    struct Bucket {
        level: i128,
        last_ns: u128,
    }

    impl Bucket {
        fn check(&mut self, spec: RateSpec, cost: u64, now_ms: u64) -> Result<(), u64> {
            let cap = i128::from(spec.burst) * 1_000_000_000;
            let now = u128::from(now_ms) * 1_000_000;
            let refill = (now - self.last_ns) * u128::from(spec.per_second);
            self.level = (self.level + refill as i128).min(cap);
            self.last_ns = now;
            let need = i128::from(cost) * 1_000_000_000;
            let ok = if cost <= spec.burst {
                self.level >= need
            } else {
                self.level == cap
            };
            if ok {
                self.level -= need;
                return Ok(());
            }
            let target = if cost <= spec.burst { need } else { cap };
            let wait_ns = (target - self.level) as u128;
            let ps = u128::from(spec.per_second);
            Err(wait_ns.div_ceil(ps).div_ceil(1_000_000) as u64)
        }
    }

    /// Rates that divide 1e9, mostly small ones (where boundaries are hit often).
    fn divisor_of_1e9() -> impl Strategy<Value = u64> {
        prop_oneof![(0u32..=4, 0u32..=4), (0u32..=9, 0u32..=9)]
            .prop_map(|(a, b)| 2u64.pow(a) * 5u64.pow(b))
    }

    proptest! {
        /// Where one unit is a whole number of nanoseconds, GCRA *is* the token bucket:
        /// the same decisions and the same waits.
        #[test]
        fn matches_a_token_bucket(
            per_second in divisor_of_1e9(),
            burst in prop_oneof![0u64..16, 0u64..2_000],
            reqs in prop::collection::vec(
                (prop_oneof![0u64..20, 0u64..3_000], prop_oneof![0u64..8, 0u64..3_000]),
                1..60,
            ),
        ) {
            let spec = RateSpec::new(per_second, burst);
            let l = Limiter::new(4);
            let mut model = Bucket { level: i128::from(burst) * 1_000_000_000, last_ns: 0 };
            let mut now = 0u64;
            for (dt, cost) in reqs {
                now += dt;
                let got = l.check("k", spec, cost, now).map_err(|r| r.ms);
                let want = model.check(spec, cost, now);
                prop_assert_eq!(got, want, "at {} ms, cost {}", now, cost);
            }
        }

        /// For any rate: over any window, what passes is at most the bucket (or the
        /// largest single cost) plus the rate times the window, and a refused request
        /// passes after exactly its RetryAfter.
        #[test]
        fn never_exceeds_the_rate_and_retry_after_is_honest(
            per_second in 1u64..5_000_000,
            burst in 0u64..100_000,
            reqs in prop::collection::vec((0u64..500, 0u64..200_000), 1..80),
        ) {
            let spec = RateSpec::new(per_second, burst);
            let mut accepted: Vec<(u64, u64)> = Vec::new();
            let mut now = 0u64;
            let l = Limiter::new(4);
            for (dt, cost) in reqs {
                now += dt;
                match l.check("k", spec, cost, now) {
                    Ok(()) => accepted.push((now, cost)),
                    Err(RetryAfter { ms }) => {
                        prop_assert!(ms >= 1);
                        // A throwaway copy of the state shows the retry would pass, and
                        // not a millisecond earlier when the wait is the limiter's own.
                        let probe = Limiter::new(4);
                        let tat = l.lock().map.get("k").map_or(0, |e| e.tat_ns);
                        probe.lock().map.insert("k".into(), Entry { tat_ns: tat, dirty: false, persisted: false });
                        prop_assert!(probe.check("k", spec, cost, now + ms - 1).is_err());
                        prop_assert!(probe.check("k", spec, cost, now + ms).is_ok());
                    }
                }
            }
            for i in 0..accepted.len() {
                let mut sum = 0u128;
                let mut cmax = 0u64;
                for &(t, c) in &accepted[i..] {
                    sum += u128::from(c);
                    cmax = cmax.max(c);
                    let window_ns = u128::from(t - accepted[i].0) * 1_000_000;
                    let bound = window_ns * u128::from(per_second)
                        + u128::from(burst.max(cmax)) * NS_PER_S
                        + u128::from(per_second);
                    prop_assert!(sum * NS_PER_S <= bound, "{} units in {} ns", sum, window_ns);
                }
            }
        }

        /// Hostile numbers never panic, and a refusal always says how long.
        #[test]
        fn any_numbers_are_safe(
            tat in any::<u64>(), now in any::<u64>(), ps in any::<u64>(),
            burst in any::<u64>(), cost in any::<u64>(),
        ) {
            match gcra(tat, now, RateSpec::new(ps, burst), cost) {
                Ok(new) => prop_assert!(new >= tat.max(now)),
                Err(w) => prop_assert!(w > 0),
            }
        }
    }
}
