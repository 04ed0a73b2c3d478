//! Per-user policies: stored by name, validated, mirrored in memory, refused when damaged.

mod common;

use common::{open, TempDir};
use halfpipe_state::{Quota, QuotaPeriod, StateDb, StateError, UserPolicy};

fn full_policy() -> UserPolicy {
    UserPolicy {
        expires_at_ms: Some(1_767_225_600_000),
        max_sessions: Some(2),
        up_bytes_per_sec: Some(1 << 20),
        down_bytes_per_sec: Some(8 << 20),
        quota: Some(Quota {
            bytes: 50 << 30,
            period: QuotaPeriod::Month,
        }),
        allowed_destinations: vec![
            "10.0.0.0/8".into(),
            "2001:db8::/32".into(),
            "192.0.2.7".into(),
        ],
    }
}

#[test]
fn set_get_clear_and_survive_a_restart() {
    let dir = TempDir::new("policy");
    let (db, _) = open(&dir.db());
    let users = db.users();
    assert!(users.policy("alice").is_unlimited(), "no policy: unlimited");
    users.add("bob", [2; 32], 0).unwrap();
    // alice is a user of the configuration file: no runtime record needed.
    users.set_policy("alice", full_policy()).unwrap();
    let bob = UserPolicy {
        max_sessions: Some(1),
        ..UserPolicy::default()
    };
    users.set_policy("bob", bob.clone()).unwrap();
    users.set_policy("carol", bob.clone()).unwrap();
    users.set_policy("carol", UserPolicy::default()).unwrap();
    assert_eq!(users.policy("alice"), full_policy());
    assert_eq!(users.policy("bob"), bob);
    assert!(users.policy("carol").is_unlimited());
    let names: Vec<String> = users.policies().into_keys().collect();
    assert_eq!(names, ["alice", "bob"]);
    drop(db);

    let (db, _) = open(&dir.db());
    let users = db.users();
    assert_eq!(users.policy("alice"), full_policy());
    assert_eq!(users.policy("bob"), bob);
    assert!(users.policy("carol").is_unlimited());
    assert_eq!(users.policies().len(), 2);
    // Removing the runtime user keeps the policy of the name.
    users.remove("bob").unwrap();
    assert_eq!(users.policy("bob"), bob);
}

#[test]
fn invalid_policies_get_precise_errors_and_change_nothing() {
    let dir = TempDir::new("policy-invalid");
    let (db, _) = open(&dir.db());
    let users = db.users();
    users.set_policy("alice", full_policy()).unwrap();
    let cases: Vec<(UserPolicy, &str, &str)> = vec![
        (
            UserPolicy {
                max_sessions: Some(0),
                ..UserPolicy::default()
            },
            "max_sessions",
            "at least 1",
        ),
        (
            UserPolicy {
                up_bytes_per_sec: Some(0),
                ..UserPolicy::default()
            },
            "up_bytes_per_sec",
            "at least 1",
        ),
        (
            UserPolicy {
                down_bytes_per_sec: Some(0),
                ..UserPolicy::default()
            },
            "down_bytes_per_sec",
            "at least 1",
        ),
        (
            UserPolicy {
                quota: Some(Quota {
                    bytes: 0,
                    period: QuotaPeriod::Day,
                }),
                ..UserPolicy::default()
            },
            "quota bytes",
            "at least 1",
        ),
        (
            UserPolicy {
                allowed_destinations: vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()],
                ..UserPolicy::default()
            },
            "allowed_destinations",
            "entry 1: \"10.0.0.0/33\"",
        ),
        (
            UserPolicy {
                allowed_destinations: vec!["example.com".into()],
                ..UserPolicy::default()
            },
            "allowed_destinations",
            "entry 0: \"example.com\" is not an IPv4 or IPv6 address",
        ),
        (
            UserPolicy {
                allowed_destinations: vec!["192.168.1.5/16".into()],
                ..UserPolicy::default()
            },
            "allowed_destinations",
            "did you mean 192.168.0.0/16?",
        ),
        (
            UserPolicy {
                allowed_destinations: vec!["10.0.0.1".into(); 1_025],
                ..UserPolicy::default()
            },
            "allowed_destinations",
            "at most 1024",
        ),
    ];
    for (policy, field, says) in cases {
        let e = users.set_policy("alice", policy.clone()).unwrap_err();
        match &e {
            StateError::Invalid { what, reason } => {
                assert_eq!(*what, field, "{policy:?}: {e}");
                assert!(reason.contains(says), "{policy:?}: {e}");
            }
            other => panic!("{policy:?}: {other:?}"),
        }
    }
    let e = users
        .set_policy("no spaces", UserPolicy::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            StateError::Invalid {
                what: "user name",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(users.policy("alice"), full_policy(), "unchanged");
    drop(db);
    let (db, _) = open(&dir.db());
    assert_eq!(
        db.users().policy("alice"),
        full_policy(),
        "unchanged on disk"
    );
}

fn write_raw(path: &std::path::Path, table: &str, key: &[u8], value: &[u8]) {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new(table);
        let mut t = txn.open_table(def).unwrap();
        t.insert(key, value).unwrap();
    }
    txn.commit().unwrap();
}

/// A stored policy that does not decode, carries a field this build does not know (a
/// restriction it would silently drop), or fails validation refuses the open.
#[test]
fn a_damaged_or_unknown_stored_policy_refuses_the_open() {
    for (key, value) in [
        (&b"alice"[..], &b"{not json"[..]),
        (b"alice", br#"{"max_sessions":1,"max_streams":3}"#),
        (b"alice", br#"{"max_sessions":0}"#),
        (b"alice", br#"{"quota":{"bytes":5,"period":"week"}}"#),
        (b"alice", br#"{"allowed_destinations":["10.0.0.1/8"]}"#),
        (b"bad name", br#"{"max_sessions":1}"#),
    ] {
        let dir = TempDir::new("policy-corrupt");
        drop(open(&dir.db()));
        write_raw(&dir.db(), "user_policies", key, value);
        let e = StateDb::open(dir.db()).unwrap_err();
        match &e {
            StateError::Corrupt { table, key: k, .. } => {
                assert_eq!(*table, "user_policies");
                assert_eq!(k.as_bytes(), key);
            }
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(value)),
        }
    }
}
