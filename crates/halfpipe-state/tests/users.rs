//! Runtime users.

mod common;

use common::{open, TempDir};
use halfpipe_state::StateError;

#[test]
fn add_remove_disable_and_survive_a_restart() {
    let dir = TempDir::new("users");
    let (db, _) = open(&dir.db());
    let users = db.users();
    let alice = users.add("alice", [1; 32], 1_000).unwrap();
    assert!(!alice.disabled);
    users.add("bob", [2; 32], 2_000).unwrap();
    users.add("carol", [3; 32], 3_000).unwrap();

    assert_eq!(users.get_by_key(&[2; 32]).unwrap().name, "bob");
    assert!(users.get_by_key(&[9; 32]).is_none());
    assert_eq!(users.get("alice").unwrap(), alice);

    let bob = users.set_disabled("bob", true).unwrap();
    assert!(bob.disabled);
    assert!(users.get_by_key(&[2; 32]).unwrap().disabled);

    let removed = users.remove("carol").unwrap();
    assert_eq!(removed.public_key, [3; 32]);
    assert!(users.get_by_key(&[3; 32]).is_none());
    drop(db);

    let (db, _) = open(&dir.db());
    let users = db.users();
    let names: Vec<String> = users.list().into_iter().map(|u| u.name).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(users.get("bob").unwrap().disabled);
    assert_eq!(users.get("alice").unwrap().added_ms, 1_000);
    assert!(!users.set_disabled("bob", false).unwrap().disabled);
    // The freed key can be given to someone else.
    users.add("dave", [3; 32], 4_000).unwrap();
    assert_eq!(users.get_by_key(&[3; 32]).unwrap().name, "dave");
}

#[test]
fn duplicates_and_unknowns_get_precise_errors() {
    let dir = TempDir::new("dupes");
    let (db, _) = open(&dir.db());
    let users = db.users();
    users.add("alice", [1; 32], 0).unwrap();

    let e = users.add("alice", [2; 32], 0).unwrap_err();
    assert!(
        matches!(&e, StateError::UserNameTaken { name } if name == "alice"),
        "{e:?}"
    );
    assert!(e.to_string().contains("\"alice\" already exists"), "{e}");

    let e = users.add("alicia", [1; 32], 0).unwrap_err();
    assert!(
        matches!(&e, StateError::UserKeyTaken { existing } if existing == "alice"),
        "{e:?}"
    );
    assert!(e.to_string().contains("belongs to user \"alice\""), "{e}");

    assert!(matches!(
        users.remove("nobody"),
        Err(StateError::UnknownUser { .. })
    ));
    assert!(matches!(
        users.set_disabled("nobody", true),
        Err(StateError::UnknownUser { .. })
    ));
    for bad in ["", "a b", "x:y", "tab\t", &"n".repeat(65)] {
        let e = users.add(bad, [7; 32], 0).unwrap_err();
        assert!(matches!(e, StateError::Invalid { .. }), "{bad:?}: {e:?}");
    }
    assert_eq!(users.list().len(), 1);
}

#[test]
fn names_of_users_defined_elsewhere_can_be_disabled_and_it_survives_a_restart() {
    let dir = TempDir::new("disabled-names");
    let (db, _) = open(&dir.db());
    let users = db.users();
    users.add("bob", [2; 32], 0).unwrap();
    users.set_disabled("bob", true).unwrap();
    users.set_name_disabled("alice", true).unwrap();
    let names: Vec<String> = users.disabled_names().into_iter().collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(users.set_name_disabled("no spaces", true).is_err());
    drop(db);
    let (db, _) = open(&dir.db());
    let users = db.users();
    assert!(users.disabled_names().contains("alice"));
    users.set_name_disabled("alice", false).unwrap();
    assert!(!users.disabled_names().contains("alice"));
    assert!(users.disabled_names().contains("bob"));
}
