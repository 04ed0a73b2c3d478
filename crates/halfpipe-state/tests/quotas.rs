//! Transfer quotas: refusal at the limit, calendar rollover, persistence, the wall clock
//! moved backwards, the key cap and damaged rows.

mod common;

use std::sync::Arc;

use common::{open, TempDir};
use halfpipe_state::quota::{days_from_civil, DAY_MS};
use halfpipe_state::{
    ManualClock, Quota, QuotaExceeded, QuotaPeriod, StateDb, StateError, StateOptions,
};

/// Wall-clock ms at `y-m-d` 00:00:00 UTC plus `plus_ms`.
fn at(y: u64, m: u32, d: u32, plus_ms: u64) -> u64 {
    days_from_civil(y, m, d).expect("a real date") * DAY_MS + plus_ms
}

const LAST_MS: u64 = DAY_MS - 1;

fn daily(bytes: u64) -> Option<Quota> {
    Some(Quota {
        bytes,
        period: QuotaPeriod::Day,
    })
}

fn monthly(bytes: u64) -> Option<Quota> {
    Some(Quota {
        bytes,
        period: QuotaPeriod::Month,
    })
}

#[test]
fn refuses_at_the_limit_with_the_reset_time() {
    let dir = TempDir::new("quota-limit");
    let (db, _) = open(&dir.db());
    let q = db.quotas();
    let noon = at(2024, 5, 17, 12 * 3_600_000);
    let quota = daily(1_000);
    q.charge("alice", 600, noon, quota).unwrap();
    // Crossing the limit is allowed once...
    q.charge("alice", 600, noon, quota).unwrap();
    // ...and leaves the counter at or above it, so the next charge (even a check) is refused.
    let e = q.charge("alice", 1, noon, quota).unwrap_err();
    assert_eq!(
        e,
        QuotaExceeded {
            used: 1_200,
            limit: 1_000,
            period: QuotaPeriod::Day,
            resets_at_ms: at(2024, 5, 18, 0),
        }
    );
    assert!(q.charge("alice", 0, noon, quota).is_err());
    let msg = e.to_string();
    assert!(
        msg.contains("daily")
            && msg.contains("1200 of 1000")
            && msg.contains("2024-05-18T00:00:00Z"),
        "{msg}"
    );
    // The refusal added nothing; other users are independent.
    let u = q.usage("alice", noon, quota);
    assert_eq!(
        (u.used, u.limit, u.period_start_ms, u.resets_at_ms),
        (1_200, Some(1_000), at(2024, 5, 17, 0), at(2024, 5, 18, 0))
    );
    assert!(u.exhausted() && u.remaining() == Some(0));
    q.charge("bob", 1_000, noon, quota).unwrap();
    assert!(
        q.charge("bob", 1, noon, quota).is_err(),
        "exactly at the limit"
    );
    // Without a quota nothing is refused, and usage is still counted (the month).
    q.charge("carol", 5, noon, None).unwrap();
    let u = q.usage("carol", noon, None);
    assert_eq!((u.used, u.limit, u.period), (5, None, QuotaPeriod::Month));
    assert_eq!(u.resets_at_ms, at(2024, 6, 1, 0));
    // The month counter of alice holds both charges: a monthly quota sees them.
    assert_eq!(q.used("alice", noon, QuotaPeriod::Month), 1_200);
    let e = q.charge("alice", 1, noon, monthly(1_200)).unwrap_err();
    assert_eq!(e.resets_at_ms, at(2024, 6, 1, 0));
    assert!(e.to_string().contains("monthly"), "{e}");
}

#[test]
fn a_new_day_starts_a_fresh_counter() {
    let dir = TempDir::new("quota-day");
    let (db, _) = open(&dir.db());
    let q = db.quotas();
    let quota = daily(100);
    q.charge("alice", 100, at(2023, 6, 30, LAST_MS), quota)
        .unwrap();
    let e = q
        .charge("alice", 1, at(2023, 6, 30, LAST_MS), quota)
        .unwrap_err();
    assert_eq!(e.resets_at_ms, at(2023, 7, 1, 0));
    q.charge("alice", 60, at(2023, 7, 1, 0), quota).unwrap();
    assert_eq!(q.used("alice", at(2023, 7, 1, 0), QuotaPeriod::Day), 60);
    // Still the same month: the month counter kept going.
    assert_eq!(q.used("alice", at(2023, 7, 1, 0), QuotaPeriod::Month), 60);
    assert_eq!(
        q.used("alice", at(2023, 7, 2, 0), QuotaPeriod::Day),
        0,
        "usage looks ahead"
    );

    // Leap years: 2024-02-28 is followed by 02-29, 2023-02-28 by 03-01.
    let u = q.usage("bob", at(2024, 2, 28, 5), quota);
    assert_eq!(u.resets_at_ms, at(2024, 2, 29, 0));
    let u = q.usage("bob", at(2024, 2, 29, 5), quota);
    assert_eq!(
        (u.period_start_ms, u.resets_at_ms),
        (at(2024, 2, 29, 0), at(2024, 3, 1, 0))
    );
    let u = q.usage("bob", at(2023, 2, 28, 5), quota);
    assert_eq!(u.resets_at_ms, at(2023, 3, 1, 0));
    q.charge("bob", 100, at(2024, 2, 28, LAST_MS), quota)
        .unwrap();
    assert!(q.charge("bob", 1, at(2024, 2, 28, LAST_MS), quota).is_err());
    q.charge("bob", 100, at(2024, 2, 29, 0), quota).unwrap();
    assert!(q.charge("bob", 1, at(2024, 2, 29, LAST_MS), quota).is_err());
    q.charge("bob", 1, at(2024, 3, 1, 0), quota).unwrap();
}

#[test]
fn a_new_month_starts_a_fresh_counter() {
    let dir = TempDir::new("quota-month");
    let (db, _) = open(&dir.db());
    let q = db.quotas();
    let quota = monthly(1_000);

    // February of a leap year ends after the 29th.
    q.charge("alice", 1_000, at(2024, 2, 1, 0), quota).unwrap();
    let e = q
        .charge("alice", 1, at(2024, 2, 29, LAST_MS), quota)
        .unwrap_err();
    assert_eq!(e.resets_at_ms, at(2024, 3, 1, 0));
    q.charge("alice", 1, at(2024, 3, 1, 0), quota).unwrap();
    assert_eq!(q.used("alice", at(2024, 3, 1, 0), QuotaPeriod::Month), 1);

    // December to January: a new year.
    q.charge("bob", 1_000, at(2023, 12, 31, LAST_MS), quota)
        .unwrap();
    let e = q
        .charge("bob", 1, at(2023, 12, 31, LAST_MS), quota)
        .unwrap_err();
    assert_eq!(e.resets_at_ms, at(2024, 1, 1, 0));
    let u = q.usage("bob", at(2023, 12, 15, 0), quota);
    assert_eq!(u.period_start_ms, at(2023, 12, 1, 0));
    q.charge("bob", 999, at(2024, 1, 1, 0), quota).unwrap();
    let u = q.usage("bob", at(2024, 1, 1, 0), quota);
    assert_eq!(
        (u.used, u.period_start_ms, u.resets_at_ms),
        (999, at(2024, 1, 1, 0), at(2024, 2, 1, 0))
    );

    // The end of a 30-day month, and a month skipped entirely.
    q.charge("carol", 1_000, at(2023, 4, 30, LAST_MS), quota)
        .unwrap();
    assert!(q
        .charge("carol", 1, at(2023, 4, 30, LAST_MS), quota)
        .is_err());
    q.charge("carol", 1, at(2023, 6, 10, 0), quota).unwrap();
}

#[test]
fn counters_survive_a_restart() {
    let dir = TempDir::new("quota-restart");
    let noon = at(2024, 5, 17, 12 * 3_600_000);
    let quota = daily(10_000);
    let (db, _) = open(&dir.db());
    db.quotas().charge("alice", 4_000, noon, quota).unwrap();
    db.quotas().charge("bob", 10_000, noon, quota).unwrap();
    db.flush().unwrap();
    db.quotas().charge("alice", 1_000, noon, quota).unwrap();
    let before = db.quotas().usage("alice", noon, quota);
    db.close().unwrap(); // flushes the last charge too

    let (db, _) = open(&dir.db());
    assert_eq!(db.quotas().len(), 2);
    assert_eq!(db.quotas().usage("alice", noon, quota), before);
    assert_eq!(before.used, 5_000);
    assert_eq!(db.quotas().used("alice", noon, QuotaPeriod::Month), 5_000);
    let e = db.quotas().charge("bob", 1, noon, quota).unwrap_err();
    assert_eq!(e.used, 10_000);
    // An operator reset is persisted too.
    assert!(db.quotas().reset("bob"));
    assert!(!db.quotas().reset("nobody"));
    drop(db);
    let (db, _) = open(&dir.db());
    assert_eq!(db.quotas().len(), 1);
    db.quotas().charge("bob", 1, noon, quota).unwrap();
}

/// Moving the wall clock back into an earlier day or month gives nobody a fresh quota:
/// the earlier period counts as the stored one, also after a restart.
#[test]
fn a_wall_clock_moved_backwards_resets_nothing() {
    let dir = TempDir::new("quota-backwards");
    let (db, _) = open(&dir.db());
    let q = db.quotas();
    let today = at(2024, 3, 1, 10 * 3_600_000);
    let (day, month) = (daily(500), monthly(800));
    q.charge("alice", 500, today, day).unwrap();
    q.charge("bob", 800, today, month).unwrap();
    for back in [
        today - 3_600_000,
        at(2024, 2, 29, 23 * 3_600_000),
        at(2023, 3, 1, 0),
        0,
    ] {
        let e = q.charge("alice", 1, back, day).unwrap_err();
        assert_eq!((e.used, e.resets_at_ms), (500, at(2024, 3, 2, 0)), "{back}");
        let e = q.charge("bob", 1, back, month).unwrap_err();
        assert_eq!((e.used, e.resets_at_ms), (800, at(2024, 4, 1, 0)), "{back}");
        let u = q.usage("alice", back, day);
        assert_eq!((u.used, u.period_start_ms), (500, at(2024, 3, 1, 0)));
    }
    // Charges at an earlier time count in the stored period.
    q.charge("carol", 10, today, None).unwrap();
    q.charge("carol", 10, at(2024, 2, 3, 0), None).unwrap();
    assert_eq!(q.used("carol", today, QuotaPeriod::Day), 20);
    assert_eq!(q.used("carol", today, QuotaPeriod::Month), 20);
    db.close().unwrap();

    let (db, _) = open(&dir.db());
    let e = db.quotas().charge("alice", 1, 0, day).unwrap_err();
    assert_eq!(e.resets_at_ms, at(2024, 3, 2, 0));
    // Forwards again, the next day is fresh as usual.
    db.quotas()
        .charge("alice", 1, at(2024, 3, 2, 0), day)
        .unwrap();
}

#[test]
fn the_key_cap_evicts_the_least_recently_charged_and_holds_across_a_restart() {
    let dir = TempDir::new("quota-cap");
    let open_capped = |cap| {
        StateDb::open_with(
            dir.db(),
            StateOptions {
                max_quota_keys: cap,
                monotonic: Arc::new(ManualClock::new()),
                ..StateOptions::default()
            },
        )
        .unwrap()
    };
    let now = at(2024, 5, 17, 0);
    let db = open_capped(4);
    assert_eq!(db.quotas().max_keys(), 4);
    for name in ["a", "b", "c", "d"] {
        db.quotas().charge(name, 10, now, None).unwrap();
    }
    db.flush().unwrap();
    db.quotas().charge("a", 1, now, None).unwrap(); // b is now the least recent
    db.quotas().charge("e", 1, now, None).unwrap();
    assert_eq!(db.quotas().len(), 4);
    assert_eq!(
        db.quotas().used("b", now, QuotaPeriod::Day),
        0,
        "b was evicted"
    );
    assert_eq!(db.quotas().used("a", now, QuotaPeriod::Day), 11);
    for i in 0..500 {
        db.quotas().charge(&format!("u{i}"), 1, now, None).unwrap();
        assert!(db.quotas().len() <= 4);
    }
    db.flush().unwrap();
    drop(db);
    // The rows of evicted users were deleted: only the last four remain.
    let db = open_capped(1_000);
    assert_eq!(db.quotas().len(), 4);
    for i in 496..500 {
        assert_eq!(db.quotas().used(&format!("u{i}"), now, QuotaPeriod::Day), 1);
    }
    drop(db);
    // Reopened with a smaller cap: the latest periods are kept, the rest deleted.
    let db = open_capped(2);
    assert_eq!(db.quotas().len(), 2);
    db.flush().unwrap();
    drop(db);
    assert_eq!(open_capped(1_000).quotas().len(), 2);
}

/// Many threads charging one user under one quota while flushes run: exactly the quota
/// passes (the check and the charge are one step).
#[test]
fn concurrent_charges_never_pass_more_than_the_quota() {
    let dir = TempDir::new("quota-threads");
    let (db, _) = open(&dir.db());
    let now = at(2024, 5, 17, 0);
    let quota = daily(10_000);
    let passed = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            let (db, passed) = (&db, &passed);
            s.spawn(move || {
                for i in 0..1_000 {
                    if db.quotas().charge("alice", 10, now, quota).is_ok() {
                        passed.fetch_add(10, std::sync::atomic::Ordering::Relaxed);
                    }
                    if i % 200 == 0 {
                        db.flush().unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(passed.into_inner(), 10_000);
    db.close().unwrap();
    let (db, _) = open(&dir.db());
    assert_eq!(db.quotas().used("alice", now, QuotaPeriod::Day), 10_000);
}

#[test]
fn a_damaged_counter_refuses_the_open() {
    let day = days_from_civil(2024, 5, 17).unwrap();
    let month = 2024 * 12 + 4;
    let good = format!(r#"{{"day":{day},"day_used":5,"month":{month},"month_used":9}}"#);
    for value in [
        "{not json".to_owned(),
        format!(r#"{{"day":{day},"day_used":5,"month":{month},"month_used":9,"extra":1}}"#),
        format!(
            r#"{{"day":{day},"day_used":5,"month":{},"month_used":9}}"#,
            month + 1
        ),
        format!(r#"{{"day":{day},"day_used":10,"month":{month},"month_used":9}}"#),
        format!(r#"{{"day":{day},"day_used":-1,"month":{month},"month_used":9}}"#),
        format!(r#"{{"day":{day},"month":{month},"month_used":9}}"#),
    ] {
        let dir = TempDir::new("quota-corrupt");
        drop(open(&dir.db()));
        {
            let db = redb::Database::open(dir.db()).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("quotas");
                let mut t = txn.open_table(def).unwrap();
                t.insert(b"alice".as_slice(), value.as_bytes()).unwrap();
                t.insert(b"bob".as_slice(), good.as_bytes()).unwrap();
            }
            txn.commit().unwrap();
        }
        let e = StateDb::open(dir.db()).unwrap_err();
        match &e {
            StateError::Corrupt { table, key, .. } => {
                assert_eq!((*table, key.as_str()), ("quotas", "alice"), "{value}");
            }
            other => panic!("{value}: {other:?}"),
        }
    }
    // The good row alone loads.
    let dir = TempDir::new("quota-good");
    drop(open(&dir.db()));
    {
        let db = redb::Database::open(dir.db()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("quotas");
            let mut t = txn.open_table(def).unwrap();
            t.insert(b"bob".as_slice(), good.as_bytes()).unwrap();
        }
        txn.commit().unwrap();
    }
    let (db, _) = open(&dir.db());
    assert_eq!(db.quotas().used("bob", day * DAY_MS, QuotaPeriod::Day), 5);
    assert_eq!(db.quotas().used("bob", day * DAY_MS, QuotaPeriod::Month), 9);
}
