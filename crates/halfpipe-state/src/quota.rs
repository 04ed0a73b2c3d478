//! Transfer quotas: bytes per user per UTC calendar day and month, counted in memory and
//! persisted by [`StateDb::flush`](crate::StateDb::flush).
//!
//! # Counting
//!
//! Every user seen holds two counters, one for the current UTC **day** and one for the
//! current UTC **month**, and every [`Quotas::charge`] adds to both (whatever the user's
//! quota, or with none), so changing a quota's period keeps the usage of the new period,
//! and [`Quotas::usage`] reports usage even for users without a quota. A counter is keyed
//! by its period (the Unix day number, or `year · 12 + month − 1`): a charge in a later
//! period starts it again from zero.
//!
//! # Enforcement
//!
//! [`Quotas::charge`] refuses (and adds nothing) when the counter of the quota's period
//! is already at or above the quota. A charge that *crosses* the quota is allowed, and
//! leaves the counter at or above it, so the **next** charge is refused: a user may exceed
//! the quota by at most one charge (one chunk of data), never more. `charge(name, 0, ..)`
//! is a pure check: refused once the quota is used up, it records nothing.
//!
//! # The wall clock
//!
//! A quota per day or month is a calendar concept, so unlike bans and rate budgets (which
//! run on the [service clock](crate::clock)) it takes **wall-clock** time from the
//! caller: milliseconds since the Unix epoch, UTC. A wall clock moved **backwards** into an
//! earlier period resets nothing: a period earlier than the stored one counts as the stored
//! one, so nobody gets a fresh quota by moving the clock back. The other side of that rule:
//! a clock that jumped far *forwards* (and was then corrected) leaves the counters in that
//! future period until it comes; [`Quotas::reset`] clears a user's counters.
//!
//! # Memory and persistence
//!
//! One mutex over one hash map, holding at most [`Quotas::max_keys`] users (default
//! [`DEFAULT_MAX_QUOTA_KEYS`], far above any real number of users: only authenticated
//! users are charged). When it is full the **least recently charged** user is evicted,
//! which forgets its counters (it starts again from zero; most likely its periods have
//! ended anyway) and deletes its row at the next flush; finding it is one pass over the
//! map, paid only when a new user arrives at a full map.
//!
//! Counters changed since the last flush are written by
//! [`StateDb::flush`](crate::StateDb::flush), in the same commit as the service clock and
//! the rate limits (table `quotas`, key the user name, value
//! `{day, day_used, month, month_used}`), and reloaded at open, so they survive a restart.
//! A crash loses what was charged since the last flush: the server flushes every second,
//! so usage is **under-counted by at most about one second of traffic** per crash. A
//! stored counter that does not decode, or whose fields are inconsistent, refuses the open
//! ([`StateError::Corrupt`]).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::db::{Store, QUOTAS_NAME};
use crate::error::StateError;
use crate::policy::{Quota, QuotaPeriod};

/// Milliseconds in a day.
pub const DAY_MS: u64 = 86_400_000;

/// The default cap on users held by [`Quotas`].
pub const DEFAULT_MAX_QUOTA_KEYS: usize = 100_000;

/// Days from 0000-03-01 to 1970-01-01 in the proleptic Gregorian calendar.
const EPOCH_SHIFT: u128 = 719_468;
/// Days in 400 years.
const DAYS_PER_ERA: u128 = 146_097;

/// The UTC calendar date of Unix day `days` (days since 1970-01-01): `(year, month 1–12,
/// day 1–31)`, proleptic Gregorian. Defined for every `u64`.
///
/// Howard Hinnant's `civil_from_days`: shift the epoch to 0000-03-01 so that the leap day
/// ends each year, split into 400-year eras of 146 097 days, then year of era, day of
/// year and month (counted from March) from it. Unsigned: nothing before 1970 is needed.
pub fn civil_from_days(days: u64) -> (u64, u32, u32) {
    let z = u128::from(days) + EPOCH_SHIFT;
    let era = z / DAYS_PER_ERA;
    let doe = z - era * DAYS_PER_ERA; // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + u128::from(month <= 2);
    // year < 2^64 / 365 + 2; month and day are small.
    (
        u64::try_from(year).unwrap_or(u64::MAX),
        u32::try_from(month).unwrap_or(12),
        u32::try_from(day).unwrap_or(31),
    )
}

/// The Unix day number of the UTC date `year-month-day`; `None` if the date does not exist
/// (month outside 1–12, day outside the month), is before 1970-01-01, or is beyond `u64`.
/// The inverse of [`civil_from_days`].
pub fn days_from_civil(year: u64, month: u32, day: u32) -> Option<u64> {
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let y = u128::from(year) - u128::from(month <= 2);
    let era = y / 400;
    let yoe = y - era * 400; // [0, 399]
    let m = u128::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March = 0
    let doy = (153 * mp + 2) / 5 + u128::from(day) - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    let days = (era * DAYS_PER_ERA + doe).checked_sub(EPOCH_SHIFT)?;
    u64::try_from(days).ok()
}

/// Whether `year` is a Gregorian leap year.
pub fn is_leap_year(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

/// Days in `month` (1–12) of `year`; 0 for a month outside 1–12.
pub fn days_in_month(year: u64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// `ms` (since the Unix epoch) as UTC `YYYY-MM-DDTHH:MM:SSZ`, for messages and listings.
pub fn format_utc_ms(ms: u64) -> String {
    let (y, m, d) = civil_from_days(ms / DAY_MS);
    let s = (ms % DAY_MS) / 1_000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3_600,
        s / 60 % 60,
        s % 60
    )
}

/// The month index of Unix day `day`: `year · 12 + month − 1`.
fn month_of_day(day: u64) -> u64 {
    let (y, m, _) = civil_from_days(day);
    y.saturating_mul(12).saturating_add(u64::from(m) - 1)
}

/// The first Unix day of month index `month`, saturating.
fn first_day_of_month(month: u64) -> u64 {
    let m = u32::try_from(month % 12).unwrap_or(0) + 1;
    days_from_civil(month / 12, m, 1).unwrap_or(u64::MAX)
}

impl QuotaPeriod {
    /// The index of the period containing `now_wall_ms`: the Unix day number, or
    /// `year · 12 + month − 1`. Later periods have larger indices.
    pub fn index(self, now_wall_ms: u64) -> u64 {
        let day = now_wall_ms / DAY_MS;
        match self {
            QuotaPeriod::Day => day,
            QuotaPeriod::Month => month_of_day(day),
        }
    }

    /// Where period `index` starts, in ms since the Unix epoch (saturating).
    pub fn start_ms(self, index: u64) -> u64 {
        match self {
            QuotaPeriod::Day => index.saturating_mul(DAY_MS),
            QuotaPeriod::Month => first_day_of_month(index).saturating_mul(DAY_MS),
        }
    }

    /// The period containing `now_wall_ms`: `(start_ms, end_ms)`, the end being the start
    /// of the next period (exclusive).
    pub fn bounds(self, now_wall_ms: u64) -> (u64, u64) {
        let i = self.index(now_wall_ms);
        (self.start_ms(i), self.start_ms(i.saturating_add(1)))
    }
}

/// A refused charge: the quota of the current period is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaExceeded {
    /// Bytes counted in the period (at least `limit`).
    pub used: u64,
    /// The quota, in bytes.
    pub limit: u64,
    /// The quota's period.
    pub period: QuotaPeriod,
    /// When the counter starts again from zero (ms since the Unix epoch, UTC): the start
    /// of the next period.
    pub resets_at_ms: u64,
}

impl fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let period = match self.period {
            QuotaPeriod::Day => "daily",
            QuotaPeriod::Month => "monthly",
        };
        write!(
            f,
            "{period} transfer quota used up: {} of {} bytes this {} (UTC); it resets at {}",
            self.used,
            self.limit,
            self.period,
            format_utc_ms(self.resets_at_ms)
        )
    }
}

impl std::error::Error for QuotaExceeded {}

/// A user's usage in one period, from [`Quotas::usage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes counted in the period.
    pub used: u64,
    /// The quota, if any.
    pub limit: Option<u64>,
    /// The period counted: the quota's, or [`QuotaPeriod::Month`] without a quota.
    pub period: QuotaPeriod,
    /// Where the period started (ms since the Unix epoch, UTC).
    pub period_start_ms: u64,
    /// Where it ends and the counter starts again from zero.
    pub resets_at_ms: u64,
}

impl Usage {
    /// Bytes left before the quota refuses (`None` without a quota).
    pub fn remaining(&self) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(self.used))
    }

    /// Whether the next charge would be refused.
    pub fn exhausted(&self) -> bool {
        self.limit.is_some_and(|l| self.used >= l)
    }
}

/// One user's counters, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Counter {
    /// The Unix day counted in `day_used`.
    day: u64,
    day_used: u64,
    /// The month index counted in `month_used`.
    month: u64,
    month_used: u64,
}

impl Counter {
    fn fresh(now_wall_ms: u64) -> Self {
        let day = now_wall_ms / DAY_MS;
        Counter {
            day,
            day_used: 0,
            month: month_of_day(day),
            month_used: 0,
        }
    }

    /// Moves to the periods of `now_wall_ms` if they are later; an earlier one counts as
    /// the stored one. Returns whether anything changed.
    fn roll(&mut self, now_wall_ms: u64) -> bool {
        let day = now_wall_ms / DAY_MS;
        let mut changed = false;
        if day > self.day {
            self.day = day;
            self.day_used = 0;
            changed = true;
        }
        let month = month_of_day(day);
        if month > self.month {
            self.month = month;
            self.month_used = 0;
            changed = true;
        }
        changed
    }

    /// (period index, used) for `period`.
    fn get(&self, period: QuotaPeriod) -> (u64, u64) {
        match period {
            QuotaPeriod::Day => (self.day, self.day_used),
            QuotaPeriod::Month => (self.month, self.month_used),
        }
    }

    fn add(&mut self, bytes: u64) {
        self.day_used = self.day_used.saturating_add(bytes);
        self.month_used = self.month_used.saturating_add(bytes);
    }

    /// What every counter this crate writes satisfies: the month is the day's month (both
    /// move together), and a day's bytes are part of its month's.
    fn consistent(&self) -> bool {
        self.month == month_of_day(self.day) && self.day_used <= self.month_used
    }
}

fn exceeded(quota: Quota, index: u64, used: u64) -> QuotaExceeded {
    QuotaExceeded {
        used,
        limit: quota.bytes,
        period: quota.period,
        resets_at_ms: quota.period.start_ms(index.saturating_add(1)),
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    counter: Counter,
    /// When it was last charged, in charges (for eviction).
    last: u64,
    /// Changed since the last flush.
    dirty: bool,
    /// May have a row in the database (so dropping it must delete the row).
    persisted: bool,
}

#[derive(Debug, Default)]
struct State {
    map: HashMap<String, Entry>,
    /// Names dropped from `map` whose rows must be deleted at the next flush; disjoint
    /// from `map`'s keys.
    removed: HashSet<String>,
    /// Charges so far: the clock of [`Entry::last`].
    ticks: u64,
}

/// What a flush must write.
#[derive(Debug, Default)]
pub(crate) struct QuotaChanges {
    pub(crate) upserts: Vec<(String, Counter)>,
    pub(crate) removes: Vec<String>,
}

/// Transfer counters per user; see the [module documentation](self).
#[derive(Debug)]
pub struct Quotas {
    state: Mutex<State>,
    max_keys: usize,
}

impl Quotas {
    /// Empty counters for at most `max_keys` users (at least 1). Not persisted by itself;
    /// the one inside [`StateDb`](crate::StateDb) ([`StateDb::quotas`](crate::StateDb::quotas))
    /// is.
    pub fn new(max_keys: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_keys: max_keys.max(1),
        }
    }

    /// Adds `bytes` to `name`'s counters for the day and month containing `now_wall_ms`
    /// (wall clock, ms since the Unix epoch), starting them again from zero if their period
    /// has ended. With a `quota`, refuses, adding nothing, if the counter of its period is
    /// already at or above `quota.bytes`; a charge that crosses it is allowed (so the next
    /// one is refused). Memory only: one lock, one lookup.
    pub fn charge(
        &self,
        name: &str,
        bytes: u64,
        now_wall_ms: u64,
        quota: Option<Quota>,
    ) -> Result<(), QuotaExceeded> {
        let mut st = self.lock();
        st.ticks = st.ticks.wrapping_add(1);
        let tick = st.ticks;
        if let Some(e) = st.map.get_mut(name) {
            if e.counter.roll(now_wall_ms) {
                e.dirty = true;
            }
            if let Some(q) = quota {
                let (index, used) = e.counter.get(q.period);
                if used >= q.bytes {
                    return Err(exceeded(q, index, used));
                }
            }
            if bytes > 0 {
                e.counter.add(bytes);
                e.dirty = true;
                e.last = tick;
            }
            return Ok(());
        }
        if let Some(q) = quota {
            if q.bytes == 0 {
                return Err(exceeded(q, q.period.index(now_wall_ms), 0));
            }
        }
        if bytes == 0 {
            // A fresh counter at zero: nothing to remember.
            return Ok(());
        }
        if st.map.len() >= self.max_keys {
            evict_lru(&mut st);
        }
        let mut counter = Counter::fresh(now_wall_ms);
        counter.add(bytes);
        let persisted = st.removed.remove(name);
        st.map.insert(
            name.to_owned(),
            Entry {
                counter,
                last: tick,
                dirty: true,
                persisted,
            },
        );
        Ok(())
    }

    /// `name`'s usage in the period of `quota` containing `now_wall_ms` (the calendar
    /// month without a quota). As for [`Quotas::charge`], a `now_wall_ms` in a period
    /// earlier than the stored one reports the stored one. Changes nothing.
    pub fn usage(&self, name: &str, now_wall_ms: u64, quota: Option<Quota>) -> Usage {
        let period = quota.map_or(QuotaPeriod::Month, |q| q.period);
        let (index, used) = self.counted(name, now_wall_ms, period);
        Usage {
            used,
            limit: quota.map(|q| q.bytes),
            period,
            period_start_ms: period.start_ms(index),
            resets_at_ms: period.start_ms(index.saturating_add(1)),
        }
    }

    /// Bytes `name` used in the `period` containing `now_wall_ms` (see [`Quotas::usage`]).
    pub fn used(&self, name: &str, now_wall_ms: u64, period: QuotaPeriod) -> u64 {
        self.counted(name, now_wall_ms, period).1
    }

    /// Forgets `name`'s counters (it starts again from zero), for an operator; persisted
    /// at the next flush. Returns whether there were any.
    pub fn reset(&self, name: &str) -> bool {
        let mut st = self.lock();
        match st.map.remove(name) {
            Some(e) => {
                if e.persisted {
                    st.removed.insert(name.to_owned());
                }
                true
            }
            None => false,
        }
    }

    /// How many users are held.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no user is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most users held at once.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// (period index, used) of `name` at `now_wall_ms`, without rolling the counter.
    fn counted(&self, name: &str, now_wall_ms: u64, period: QuotaPeriod) -> (u64, u64) {
        let now_index = period.index(now_wall_ms);
        match self.lock().map.get(name) {
            Some(e) => {
                let (index, used) = e.counter.get(period);
                if now_index > index {
                    (now_index, 0)
                } else {
                    (index, used)
                }
            }
            None => (now_index, 0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain numbers: a panic elsewhere cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decodes and checks stored rows.
    pub(crate) fn decode_rows(
        store: &Store,
        rows: crate::db::Rows,
    ) -> Result<Vec<(String, Counter)>, StateError> {
        rows.into_iter()
            .map(|(k, v)| {
                let name = store.key_str(QUOTAS_NAME, &k)?;
                let c: Counter = store.decode(QUOTAS_NAME, &k, &v)?;
                if name.is_empty() || !c.consistent() {
                    return Err(store.corrupt(QUOTAS_NAME, &k));
                }
                Ok((name, c))
            })
            .collect()
    }

    /// Counters loaded from the database. If there are more than `max_keys`, those of the
    /// latest periods are kept and the rest deleted at the next flush.
    pub(crate) fn load(max_keys: usize, mut rows: Vec<(String, Counter)>) -> Self {
        let q = Self::new(max_keys);
        {
            let mut st = q.lock();
            // Latest first; ties by name, so that the choice is deterministic.
            rows.sort_unstable_by(|a, b| {
                (b.1.month, b.1.day)
                    .cmp(&(a.1.month, a.1.day))
                    .then_with(|| a.0.cmp(&b.0))
            });
            let n = rows.len() as u64;
            for (i, (name, counter)) in rows.into_iter().enumerate() {
                if i < q.max_keys {
                    let e = Entry {
                        counter,
                        // The latest gets the highest tick (most recently charged).
                        last: n - i as u64,
                        dirty: false,
                        persisted: true,
                    };
                    st.map.insert(name, e);
                } else {
                    st.removed.insert(name);
                }
            }
            st.ticks = n;
        }
        q
    }

    /// Takes what changed since the last call; marks the rows taken as persisted.
    pub(crate) fn take_changes(&self) -> QuotaChanges {
        let mut st = self.lock();
        let st = &mut *st;
        let mut changes = QuotaChanges::default();
        for (name, e) in st.map.iter_mut() {
            if e.dirty {
                changes.upserts.push((name.clone(), e.counter));
                e.dirty = false;
                e.persisted = true;
            }
        }
        changes.removes = st.removed.drain().collect();
        changes
    }

    /// Puts back changes whose flush failed, so the next flush writes them.
    pub(crate) fn restore_changes(&self, changes: QuotaChanges) {
        let mut st = self.lock();
        for (name, _) in changes.upserts {
            if let Some(e) = st.map.get_mut(&name) {
                e.dirty = true;
            }
        }
        for name in changes.removes {
            if !st.map.contains_key(&name) {
                st.removed.insert(name);
            }
        }
    }
}

/// Drops the least recently charged user (one pass).
fn evict_lru(st: &mut State) {
    let victim = st
        .map
        .iter()
        .min_by_key(|(_, e)| e.last)
        .map(|(k, _)| k.clone());
    if let Some(name) = victim {
        if let Some(e) = st.map.remove(&name) {
            if e.persisted {
                st.removed.insert(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The naive reference: the next calendar date.
    fn next_date((y, m, d): (u64, u32, u32)) -> (u64, u32, u32) {
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let len = [
            31,
            if leap { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        if d < len[(m - 1) as usize] {
            (y, m, d + 1)
        } else if m < 12 {
            (y, m + 1, 1)
        } else {
            (y + 1, 1, 1)
        }
    }

    /// Every day from 1970 to beyond 2400 (2000 is a leap year, 2100, 2200 and 2300 are
    /// not, 2400 is), against day-by-day iteration, both ways.
    #[test]
    fn civil_from_days_matches_day_by_day_iteration() {
        let mut date = (1970, 1, 1);
        for day in 0..=days_from_civil(2401, 12, 31).unwrap() {
            assert_eq!(civil_from_days(day), date, "day {day}");
            assert_eq!(
                days_from_civil(date.0, date.1, date.2),
                Some(day),
                "{date:?}"
            );
            date = next_date(date);
        }
        assert_eq!(date, (2402, 1, 1));
    }

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2000-02-29 and 2024-02-29 exist; 2100-02-29 and 2023-02-29 do not.
        assert_eq!(days_from_civil(2000, 2, 29), Some(11_016));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(days_from_civil(2024, 2, 29), Some(19_782));
        assert_eq!(days_from_civil(2024, 3, 1), Some(19_783));
        assert_eq!(days_from_civil(2100, 2, 29), None);
        assert_eq!(days_from_civil(2023, 2, 29), None);
        assert_eq!(days_from_civil(2023, 4, 31), None);
        assert_eq!(days_from_civil(2023, 13, 1), None);
        assert_eq!(days_from_civil(2023, 0, 1), None);
        assert_eq!(days_from_civil(2023, 1, 0), None);
        assert_eq!(days_from_civil(1969, 12, 31), None);
        assert_eq!(format_utc_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_utc_ms(1_709_251_199_999),
            "2024-02-29T23:59:59Z",
            "the last millisecond of February 2024"
        );
        assert_eq!(format_utc_ms(1_709_251_200_000), "2024-03-01T00:00:00Z");
        // The end of u64: no panic.
        let (y, m, d) = civil_from_days(u64::MAX);
        assert!(y > 1 << 50 && (1..=12).contains(&m) && (1..=31).contains(&d));
        assert_eq!(days_from_civil(y, m, d), Some(u64::MAX));
        assert!(format_utc_ms(u64::MAX).ends_with('Z'));
        assert_eq!(QuotaPeriod::Month.bounds(u64::MAX).1, u64::MAX, "saturates");
    }

    #[test]
    fn period_bounds() {
        let ms = |y, m, d| days_from_civil(y, m, d).unwrap() * DAY_MS;
        let t = ms(2024, 2, 29) + 5 * 3_600_000;
        assert_eq!(
            QuotaPeriod::Day.bounds(t),
            (ms(2024, 2, 29), ms(2024, 3, 1))
        );
        assert_eq!(
            QuotaPeriod::Month.bounds(t),
            (ms(2024, 2, 1), ms(2024, 3, 1))
        );
        let t = ms(2023, 12, 31) + DAY_MS - 1;
        assert_eq!(
            QuotaPeriod::Month.bounds(t),
            (ms(2023, 12, 1), ms(2024, 1, 1))
        );
        assert_eq!(
            QuotaPeriod::Month.index(t) + 1,
            QuotaPeriod::Month.index(t + 1)
        );
    }

    proptest! {
        /// From any day (up to the year ~500 000 000), stepping day by day agrees with
        /// converting the later day directly, and the conversion round-trips.
        #[test]
        fn stepping_agrees_with_converting(start in 0u64..(u64::MAX / DAY_MS), steps in 0u64..3_000) {
            let mut date = civil_from_days(start);
            prop_assert_eq!(days_from_civil(date.0, date.1, date.2), Some(start));
            for _ in 0..steps {
                date = next_date(date);
            }
            prop_assert_eq!(civil_from_days(start + steps), date);
        }

        /// The month index is monotone and moves by one exactly on the 1st.
        #[test]
        fn month_index_steps_on_the_first(day in 0u64..(u64::MAX / DAY_MS - 1)) {
            let (_, _, d) = civil_from_days(day + 1);
            let step = month_of_day(day + 1) - month_of_day(day);
            prop_assert_eq!(step, u64::from(d == 1));
        }
    }

    #[test]
    fn evicts_the_least_recently_charged() {
        let q = Quotas::new(3);
        q.charge("a", 1, 0, None).unwrap();
        q.charge("b", 2, 0, None).unwrap();
        q.charge("c", 3, 0, None).unwrap();
        q.charge("a", 1, 0, None).unwrap(); // a is now more recent than b
        q.charge("d", 4, 0, None).unwrap();
        assert_eq!(q.len(), 3);
        assert_eq!(q.used("b", 0, QuotaPeriod::Day), 0, "b was evicted");
        assert_eq!(q.used("a", 0, QuotaPeriod::Day), 2);
        assert_eq!(q.used("c", 0, QuotaPeriod::Day), 3);
        assert_eq!(q.used("d", 0, QuotaPeriod::Day), 4);
        // A refused charge or a check does not make a user recent.
        let quota = Some(Quota {
            bytes: 3,
            period: QuotaPeriod::Day,
        });
        assert!(q.charge("c", 1, 0, quota).is_err());
        q.charge("e", 1, 0, None).unwrap();
        assert_eq!(
            q.used("c", 0, QuotaPeriod::Day),
            0,
            "c was the oldest charge"
        );
        for i in 0..1_000 {
            q.charge(&format!("u{i}"), 1, 0, None).unwrap();
            assert!(q.len() <= 3);
        }
        assert_eq!(Quotas::new(0).max_keys(), 1);
    }

    #[test]
    fn loading_more_rows_than_the_cap_keeps_the_latest() {
        let c = |day: u64| {
            let mut c = Counter::fresh(day * DAY_MS);
            c.add(day + 1);
            c
        };
        let rows = vec![
            ("old".to_owned(), c(1)),
            ("new".to_owned(), c(40)),
            ("mid".to_owned(), c(20)),
        ];
        let q = Quotas::load(2, rows);
        assert_eq!(q.len(), 2);
        assert_eq!(q.used("new", 40 * DAY_MS, QuotaPeriod::Day), 41);
        assert_eq!(q.used("mid", 20 * DAY_MS, QuotaPeriod::Day), 21);
        assert_eq!(q.used("old", DAY_MS, QuotaPeriod::Day), 0);
        let changes = q.take_changes();
        assert!(changes.upserts.is_empty());
        assert_eq!(changes.removes, ["old"]);
        // The next user evicts the least recent of the loaded ones: mid.
        q.charge("x", 1, 40 * DAY_MS, None).unwrap();
        assert_eq!(q.used("mid", 20 * DAY_MS, QuotaPeriod::Day), 0);
        assert_eq!(q.used("new", 40 * DAY_MS, QuotaPeriod::Day), 41);
    }

    #[test]
    fn inconsistent_counters_are_detected() {
        let good = Counter::fresh(0);
        assert!(good.consistent());
        let wrong_month = Counter { month: 5, ..good };
        assert!(!wrong_month.consistent());
        let day_over_month = Counter {
            day_used: 2,
            month_used: 1,
            ..good
        };
        assert!(!day_over_month.consistent());
    }

    #[test]
    fn a_zero_quota_refuses_even_a_fresh_user() {
        let q = Quotas::new(4);
        let zero = Some(Quota {
            bytes: 0,
            period: QuotaPeriod::Day,
        });
        let e = q.charge("a", 1, 0, zero).unwrap_err();
        assert_eq!((e.used, e.limit, e.resets_at_ms), (0, 0, DAY_MS));
        assert!(q.is_empty());
    }
}
