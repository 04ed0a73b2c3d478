//! The database: creation, reopening, the service clock, budgets and bans across
//! restarts, and refusal of damaged files.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{open, open_capped, TempDir};
use halfpipe_state::{RateSpec, RetryAfter, StateDb, StateError};

#[test]
fn creates_the_file_0600_and_reopens_it() {
    let dir = TempDir::new("create");
    let (db, _) = open(&dir.db());
    assert_eq!(db.path(), dir.db());
    let mode = std::fs::metadata(dir.db()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(db);
    // A loose mode on an existing file is tightened.
    std::fs::set_permissions(dir.db(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (db, _) = open(&dir.db());
    let mode = std::fs::metadata(dir.db()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(db.now_ms(), 0);
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let dir = TempDir::new("nodir");
    let path = dir.path().join("missing/state.redb");
    let e = StateDb::open(&path).unwrap_err();
    assert!(matches!(e, StateError::Io { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("missing/state.redb") && msg.contains("directory"),
        "{msg}"
    );
}

#[test]
fn a_second_open_of_the_same_file_is_refused() {
    let dir = TempDir::new("twice");
    let (_db, _) = open(&dir.db());
    let e = StateDb::open(dir.db()).unwrap_err();
    assert!(matches!(e, StateError::AlreadyOpen { .. }), "{e:?}");
}

#[test]
fn the_service_clock_continues_after_reopen_and_downtime_does_not_count() {
    let dir = TempDir::new("clock");
    let (db, clock) = open(&dir.db());
    clock.advance(5_000);
    assert_eq!(db.now_ms(), 5_000);
    db.flush().unwrap();
    clock.advance(1_500);
    db.close().unwrap();

    // A new process: its monotonic time starts again at 0, however long the server was
    // down; the service clock resumes where it was stored.
    let (db, clock) = open(&dir.db());
    assert_eq!(db.now_ms(), 6_500);
    assert_eq!(db.clock().base_ms(), 6_500);
    clock.advance(500);
    assert_eq!(db.now_ms(), 7_000);
}

#[test]
fn dropping_the_last_handle_flushes() {
    let dir = TempDir::new("dropflush");
    let (db, clock) = open(&dir.db());
    let spec = RateSpec::new(1, 1);
    clock.advance(2_000);
    db.limiter()
        .check("user:alice:streams", spec, 1, db.now_ms())
        .unwrap();
    let clone = db.clone();
    drop(db);
    drop(clone);
    let (db, _) = open(&dir.db());
    assert_eq!(db.now_ms(), 2_000);
    assert!(db
        .limiter()
        .check("user:alice:streams", spec, 1, db.now_ms())
        .is_err());
}

#[test]
fn budgets_survive_a_restart() {
    let dir = TempDir::new("budgets");
    let spec = RateSpec::new(10, 5);
    let (db, clock) = open(&dir.db());
    clock.advance(1_000);
    let now = db.now_ms();
    for _ in 0..5 {
        db.limiter().check("src:192.0.2.1", spec, 1, now).unwrap();
    }
    let up = RateSpec::new(1 << 20, 1 << 20);
    db.limiter()
        .check("user:alice:up", up, 1 << 20, now)
        .unwrap();
    assert_eq!(
        db.limiter().check("src:192.0.2.1", spec, 1, now),
        Err(RetryAfter { ms: 100 })
    );
    db.flush().unwrap();
    drop(db);

    let (db, clock) = open(&dir.db());
    let now = db.now_ms();
    assert_eq!(now, 1_000);
    assert_eq!(db.limiter().len(), 2);
    assert_eq!(
        db.limiter().check("src:192.0.2.1", spec, 1, now),
        Err(RetryAfter { ms: 100 })
    );
    assert_eq!(
        db.limiter().check("user:alice:up", up, 64 << 10, now),
        Err(RetryAfter { ms: 63 })
    );
    clock.advance(100);
    db.limiter()
        .check("src:192.0.2.1", spec, 1, db.now_ms())
        .unwrap();
}

#[test]
fn full_buckets_are_deleted_at_flush() {
    let dir = TempDir::new("purge");
    let (db, clock) = open(&dir.db());
    db.limiter().check("a", RateSpec::new(1, 1), 1, 0).unwrap();
    db.limiter()
        .check("b", RateSpec::new(1, 10), 10, 0)
        .unwrap();
    db.flush().unwrap();
    clock.advance(1_000); // a is full again, b is not
    db.flush().unwrap();
    assert_eq!(db.limiter().len(), 1);
    drop(db);
    let (db, _) = open(&dir.db());
    assert_eq!(db.limiter().len(), 1);
    assert!(db
        .limiter()
        .check("b", RateSpec::new(1, 10), 10, 1_000)
        .is_err());
}

#[test]
fn the_key_cap_holds_across_a_restart_with_a_smaller_cap() {
    let dir = TempDir::new("cap");
    let spec = RateSpec::new(1, 1);
    let (db, _) = open_capped(&dir.db(), 64);
    for i in 0..1_000u64 {
        db.limiter()
            .check(&format!("src:{i}"), spec, 1 + i % 50, 0)
            .unwrap();
        assert!(db.limiter().len() <= 64);
    }
    assert!(db.limiter().len() > 32);
    db.flush().unwrap();
    drop(db);
    let (db, _) = open_capped(&dir.db(), 8);
    assert_eq!(db.limiter().len(), 8);
    assert_eq!(db.limiter().max_keys(), 8);
    db.flush().unwrap();
    drop(db);
    let (db, _) = open_capped(&dir.db(), 1_000);
    assert_eq!(db.limiter().len(), 8, "rows beyond the cap were deleted");
}

#[test]
fn bans_survive_a_restart_without_a_flush() {
    let dir = TempDir::new("bans");
    let (db, clock) = open(&dir.db());
    clock.advance(1_000);
    let ban = db
        .bans()
        .ban("src:198.51.100.9", 60_000, "auth failures", db.now_ms())
        .unwrap();
    assert_eq!(ban.until_ms, 61_000);
    drop(db);
    let (db, _) = open(&dir.db());
    let b = db.bans().banned("src:198.51.100.9", db.now_ms()).unwrap();
    assert_eq!(b.until_ms, 61_000);
    assert_eq!(b.reason, "auth failures");
    assert!(db.bans().banned("src:198.51.100.10", db.now_ms()).is_none());
}

/// Nothing about a ban depends on the wall clock: no function here takes wall time, and
/// the expiry is served time. A restart (the wall clock may have jumped by a day
/// meanwhile, and the new process's monotonic time starts at 0) leaves exactly the same
/// time to serve.
#[test]
fn a_wall_clock_jump_cannot_shorten_a_ban() {
    let dir = TempDir::new("walljump");
    let (db, clock) = open(&dir.db());
    clock.advance(10_000);
    db.bans()
        .ban("user:mallory", 60_000, "abuse", db.now_ms())
        .unwrap();
    clock.advance(10_000); // 50 s left
    db.close().unwrap();

    let (db, clock) = open(&dir.db());
    let b = db.bans().banned("user:mallory", db.now_ms()).unwrap();
    assert_eq!(b.until_ms - db.now_ms(), 50_000);
    clock.advance(49_999);
    assert!(db.bans().banned("user:mallory", db.now_ms()).is_some());
    clock.advance(1);
    assert!(db.bans().banned("user:mallory", db.now_ms()).is_none());
}

#[test]
fn a_ban_only_ever_extends_until_unbanned() {
    let dir = TempDir::new("extend");
    let (db, _) = open(&dir.db());
    let bans = db.bans();
    assert_eq!(bans.ban("k", 10_000, "first", 0).unwrap().until_ms, 10_000);
    // Shorter: the longer ban stands, with its reason.
    let b = bans.ban("k", 5_000, "second", 1_000).unwrap();
    assert_eq!((b.until_ms, b.reason.as_str()), (10_000, "first"));
    // Longer: extended.
    let b = bans.ban("k", 20_000, "third", 1_000).unwrap();
    assert_eq!((b.until_ms, b.reason.as_str()), (21_000, "third"));
    assert_eq!(bans.banned("k", 20_999).unwrap().until_ms, 21_000);
    assert!(bans.banned("k", 21_000).is_none());
    // Saturating, not overflowing.
    assert_eq!(
        bans.ban("max", u64::MAX, "forever", 5).unwrap().until_ms,
        u64::MAX
    );
    assert_eq!(bans.list(0).len(), 2);
    // Unban shortens, and is committed.
    assert_eq!(bans.unban("k").unwrap().unwrap().until_ms, 21_000);
    assert!(bans.banned("k", 0).is_none());
    assert!(bans.unban("k").unwrap().is_none());
    assert!(bans.ban("k", 0, "nothing", 0).is_err());
    assert!(bans.ban("", 1, "no key", 0).is_err());
    drop(db);
    let (db, _) = open(&dir.db());
    assert!(db.bans().banned("k", 0).is_none());
    assert!(db.bans().banned("max", 0).is_some());
}

#[test]
fn expired_bans_are_ignored_at_once_and_deleted_at_flush() {
    let dir = TempDir::new("expire");
    let (db, clock) = open(&dir.db());
    db.bans().ban("a", 1_000, "short", 0).unwrap();
    db.bans().ban("b", 5_000, "long", 0).unwrap();
    clock.advance(2_000);
    let now = db.now_ms();
    assert!(db.bans().banned("a", now).is_none());
    let listed: Vec<String> = db.bans().list(now).into_iter().map(|(k, _)| k).collect();
    assert_eq!(listed, ["b"]);
    db.flush().unwrap();
    drop(db);
    let (db, _) = open(&dir.db());
    // The row is gone (unban would report a stored ban otherwise).
    assert!(db.bans().unban("a").unwrap().is_none());
    assert!(db.bans().unban("b").unwrap().is_some());
}

#[test]
fn a_garbage_file_is_refused() {
    let dir = TempDir::new("garbage");
    std::fs::write(dir.db(), b"this is not a database, just text".repeat(500)).unwrap();
    let e = StateDb::open(dir.db()).unwrap_err();
    assert!(matches!(e, StateError::CorruptFile { .. }), "{e:?}");
    assert!(e.to_string().contains("fail closed"), "{e}");
}

#[test]
fn garbage_written_over_a_real_database_is_refused() {
    let dir = TempDir::new("overwrite");
    let (db, _) = open(&dir.db());
    for i in 0..200 {
        db.bans()
            .ban(&format!("src:{i}"), 1_000_000, "x", 0)
            .unwrap();
    }
    drop(db);
    let len = std::fs::metadata(dir.db()).unwrap().len() as usize;
    let mut bytes = std::fs::read(dir.db()).unwrap();
    // Keep redb's header (so it is recognised as a database), trash everything else.
    let mut x: u32 = 0x9e37_79b9;
    for b in &mut bytes[4096..len] {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(dir.db(), &bytes).unwrap();
    let e = StateDb::open(dir.db()).unwrap_err();
    assert!(
        matches!(
            e,
            StateError::CorruptFile { .. } | StateError::Corrupt { .. }
        ),
        "{e:?}"
    );
    // Trashing the whole file, header included, is refused too.
    std::fs::write(dir.db(), vec![0xa5; len]).unwrap();
    let e = StateDb::open(dir.db()).unwrap_err();
    assert!(matches!(e, StateError::CorruptFile { .. }), "{e:?}");
}

/// One flipped byte inside a stored value fails redb's checksums: refused, not rolled
/// back to an older commit (which could resurrect a revoked token or lift a ban).
#[test]
fn a_single_flipped_byte_in_a_value_is_refused() {
    let dir = TempDir::new("flip");
    let (db, _) = open(&dir.db());
    db.bans()
        .ban("src:192.0.2.99", 1_000_000, "needle-reason", 0)
        .unwrap();
    drop(db);
    let mut bytes = std::fs::read(dir.db()).unwrap();
    let needle = b"needle-reason";
    let at = bytes
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("the value is in the file");
    bytes[at] ^= 0x20;
    std::fs::write(dir.db(), &bytes).unwrap();
    let e = StateDb::open(dir.db()).unwrap_err();
    assert!(matches!(e, StateError::CorruptFile { .. }), "{e:?}");
}

/// A value that does not decode refuses the open, naming the table and key.
#[test]
fn an_undecodable_value_is_refused_with_its_table_and_key() {
    let dir = TempDir::new("badvalue");
    drop(open(&dir.db()));
    {
        let db = redb::Database::open(dir.db()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("bans");
            let mut t = txn.open_table(def).unwrap();
            t.insert(b"src:203.0.113.5".as_slice(), b"{not json".as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let e = StateDb::open(dir.db()).unwrap_err();
    match &e {
        StateError::Corrupt { table, key, .. } => {
            assert_eq!((*table, key.as_str()), ("bans", "src:203.0.113.5"));
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("state.redb") && msg.contains("fail closed"),
        "{msg}"
    );
}

#[test]
fn another_schema_is_refused() {
    let dir = TempDir::new("schema");
    drop(open(&dir.db()));
    {
        let db = redb::Database::open(dir.db()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("meta");
            let mut t = txn.open_table(def).unwrap();
            t.insert(b"schema".as_slice(), 99u64.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let e = StateDb::open(dir.db()).unwrap_err();
    assert!(
        matches!(
            e,
            StateError::Schema {
                found: 99,
                supported: halfpipe_state::db::SCHEMA,
                ..
            }
        ),
        "{e:?}"
    );
}

/// A schema 1 file (before policies and quotas) is upgraded in place, keeping its
/// contents; a build that knows only schema 1 would then refuse it.
#[test]
fn a_schema_1_file_is_upgraded() {
    let dir = TempDir::new("upgrade");
    {
        let (db, _) = open(&dir.db());
        db.bans().ban("src:192.0.2.1", 60_000, "kept", 0).unwrap();
    }
    let meta: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("meta");
    let schema = || {
        let db = redb::Database::open(dir.db()).unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(meta).unwrap();
        let v = t.get(b"schema".as_slice()).unwrap().unwrap();
        u64::from_le_bytes(v.value().try_into().unwrap())
    };
    assert_eq!(schema(), 2);
    {
        // Make it look like a schema 1 file: no policy or quota tables, schema 1.
        let db = redb::Database::open(dir.db()).unwrap();
        let txn = db.begin_write().unwrap();
        for name in ["user_policies", "quotas"] {
            let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new(name);
            assert!(txn.delete_table(def).unwrap());
        }
        {
            let mut t = txn.open_table(meta).unwrap();
            t.insert(b"schema".as_slice(), 1u64.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    assert_eq!(schema(), 1);
    {
        let (db, _) = open(&dir.db());
        assert_eq!(db.bans().banned("src:192.0.2.1", 0).unwrap().reason, "kept");
        assert!(db.users().policy("alice").is_unlimited());
    }
    assert_eq!(schema(), 2);
}

/// Many threads charging the same keys while flushes run: exactly the burst passes.
#[test]
fn concurrent_checks_and_flushes_neither_lose_nor_double_count() {
    let dir = TempDir::new("threads");
    let (db, _) = open(&dir.db());
    let spec = RateSpec::new(1, 100);
    let allowed = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (db, allowed) = (&db, &allowed);
            s.spawn(move || {
                for i in 0..500 {
                    if db.limiter().check("global:handshakes", spec, 1, 0).is_ok() {
                        allowed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if i % 100 == 0 {
                        db.flush().unwrap();
                        db.bans().ban(&format!("src:{t}"), 1_000, "t", 0).unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(allowed.into_inner(), 100);
    assert_eq!(db.bans().list(0).len(), 4);
    db.close().unwrap();
    let (db, _) = open(&dir.db());
    assert!(db.limiter().check("global:handshakes", spec, 1, 0).is_err());
    assert_eq!(db.bans().list(0).len(), 4);
}
