//! Capability tokens and the pepper.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{open, TempDir};
use halfpipe_control::capability::{Capability, CapabilitySet};
use halfpipe_state::{Pepper, StateError, TokenError, Tokens};

const NOW: u64 = 1_700_000_000_000;

fn caps(list: &str) -> CapabilitySet {
    CapabilitySet::parse_list(list).unwrap()
}

#[test]
fn create_verify_revoke_and_survive_a_restart() {
    let dir = TempDir::new("tokens");
    let pepper_path = dir.path().join("pepper");
    let (db, _) = open(&dir.db());
    let tokens = Tokens::new(&db, Pepper::create(&pepper_path).unwrap());

    let (info, secret) = tokens
        .create("ops", caps("status,sessions.read"), None, NOW)
        .unwrap();
    let text = secret.expose().to_owned();
    assert_eq!(text.len(), 85);
    assert!(text.starts_with(&format!("hpt_{}_", info.id)), "{text}");
    assert_eq!(info.id.len(), 16);

    let v = tokens.verify(&text, NOW + 1).unwrap();
    assert_eq!(v.id, info.id);
    assert_eq!(v.name, "ops");
    assert!(v.caps.allows(Capability::SessionsRead));
    assert!(!v.caps.allows(Capability::SessionsKill));
    assert_eq!(v.last_used_ms, Some(NOW + 1));

    let (other, other_secret) = tokens.create("admin", caps("admin"), None, NOW).unwrap();
    let listed = tokens.list().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed
            .iter()
            .find(|t| t.id == info.id)
            .unwrap()
            .last_used_ms,
        Some(NOW + 1)
    );

    let r = tokens.revoke(&info.id).unwrap();
    assert!(r.revoked);
    assert!(matches!(
        tokens.verify(&text, NOW + 2),
        Err(TokenError::Revoked)
    ));
    assert!(
        tokens.revoke(&info.id).unwrap().revoked,
        "revoking twice is harmless"
    );
    assert!(matches!(
        tokens.revoke("00000000deadbeef"),
        Err(StateError::UnknownToken { .. })
    ));
    drop(tokens);
    drop(db);

    // Reopened, with the pepper reloaded from its file.
    let (db, _) = open(&dir.db());
    let tokens = Tokens::new(&db, Pepper::load(&pepper_path).unwrap());
    assert!(matches!(
        tokens.verify(&text, NOW + 3),
        Err(TokenError::Revoked)
    ));
    assert_eq!(
        tokens.verify(other_secret.expose(), NOW + 3).unwrap().id,
        other.id
    );
    assert_eq!(tokens.list().unwrap().len(), 2);

    // Another pepper recognises nothing.
    let wrong = Tokens::new(&db, Pepper::from_bytes([9; 32]));
    assert!(matches!(
        wrong.verify(other_secret.expose(), NOW),
        Err(TokenError::Unknown)
    ));
}

#[test]
fn unknown_malformed_and_expired_tokens_are_refused_without_echoing_them() {
    let dir = TempDir::new("refuse");
    let (db, _) = open(&dir.db());
    let tokens = Tokens::new(&db, Pepper::from_bytes([1; 32]));
    let (info, secret) = tokens
        .create("ci", caps("log.read"), Some(NOW + 60_000), NOW)
        .unwrap();
    let text = secret.expose();

    assert!(tokens.verify(text, NOW + 59_999).is_ok());
    let expired = tokens.verify(text, NOW + 60_000).unwrap_err();
    assert!(matches!(expired, TokenError::Expired), "{expired:?}");

    // The right id with a wrong secret is just unknown.
    let mut flipped = text.to_owned();
    let last = flipped.pop().unwrap();
    flipped.push(if last == '0' { '1' } else { '0' });
    let unknown_secret = tokens.verify(&flipped, NOW).unwrap_err();
    assert!(matches!(unknown_secret, TokenError::Unknown));
    let never = format!("hpt_0123456789abcdef_{}", "7".repeat(64));
    let unknown_id = tokens.verify(&never, NOW).unwrap_err();
    assert!(matches!(unknown_id, TokenError::Unknown));

    let malformed_inputs = [
        String::new(),
        "hpt_".to_string(),
        text.to_uppercase(),
        format!(" {text}"),
        format!("{text}\n"),
        text.replace("hpt_", "tok_"),
        "hpt_zzzzzzzzzzzzzzzz_secret-hunter2".to_string(),
    ];
    for bad in &malformed_inputs {
        let e = tokens.verify(bad, NOW).unwrap_err();
        assert!(matches!(e, TokenError::Malformed), "{bad:?}: {e:?}");
    }

    // No message or Debug rendering contains any part of what was presented.
    let errors = [expired, unknown_secret, unknown_id];
    for e in &errors {
        for shown in [e.to_string(), format!("{e:?}")] {
            assert!(!shown.contains(&text[21..]), "{shown}");
            assert!(!shown.contains(&info.id), "{shown}");
            assert!(!shown.contains("hunter2") && !shown.contains("0123456789abcdef"));
        }
    }
    assert!(!format!("{:?}", TokenError::Malformed).contains("hunter2"));

    // Creation refuses nonsense.
    assert!(tokens.create("", caps("status"), None, NOW).is_err());
    assert!(tokens
        .create("x", CapabilitySet::default(), None, NOW)
        .is_err());
    assert!(tokens.create("x", caps("status"), Some(NOW), NOW).is_err());
}

#[test]
fn the_secret_is_never_stored_or_shown() {
    let dir = TempDir::new("nosecret");
    let (db, _) = open(&dir.db());
    let tokens = Tokens::new(&db, Pepper::create(dir.path().join("pepper")).unwrap());
    let mut secrets = Vec::new();
    for i in 0..5 {
        let (info, secret) = tokens
            .create(&format!("t{i}"), caps("status"), None, NOW)
            .unwrap();
        let debug = format!("{secret:?}");
        let hex_secret = secret.expose()[21..].to_owned();
        assert!(
            debug.contains(&info.id) && !debug.contains(&hex_secret),
            "{debug}"
        );
        tokens.verify(secret.expose(), NOW).unwrap();
        secrets.push(hex_secret);
    }
    db.flush().unwrap();
    drop(tokens);
    drop(db);
    let raw = std::fs::read(dir.db()).unwrap();
    let contains = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(b"\"name\":\"t3\""),
        "the test can see stored tokens"
    );
    for s in &secrets {
        assert!(!contains(s.as_bytes()), "hex secret in the file");
        assert!(
            !contains(&hex::decode(s).unwrap()),
            "raw secret in the file"
        );
    }
}

#[test]
fn the_pepper_file_is_private_and_exact() {
    let dir = TempDir::new("pepper");
    let path = dir.path().join("pepper");
    drop(Pepper::create(&path).unwrap());
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    Pepper::load(&path).unwrap();

    // Never replaced.
    let e = Pepper::create(&path).unwrap_err();
    assert!(matches!(e, StateError::Io { .. }), "{e:?}");

    for mode in [0o640, 0o604, 0o644] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = Pepper::load(&path).unwrap_err();
        assert!(matches!(e, StateError::PepperPermissions { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains(&format!("chmod 600 {}", path.display())),
            "{e}"
        );
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    Pepper::load(&path).unwrap();

    for len in [0usize, 31, 33, 64] {
        std::fs::write(&path, vec![1u8; len]).unwrap();
        let e = Pepper::load(&path).unwrap_err();
        assert!(
            matches!(e, StateError::PepperLength { len: l, .. } if l == len as u64),
            "{e:?}"
        );
    }
    assert!(matches!(
        Pepper::load(dir.path().join("absent")),
        Err(StateError::Io { .. })
    ));
}
