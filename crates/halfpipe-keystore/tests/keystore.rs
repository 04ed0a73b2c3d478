//! The key store against its requirements: round trips with every sealer, wrong keys,
//! every flipped byte, every truncation, hostile headers, no secret in the file, in
//! `Debug` or in errors, rotation and expiry, versions, events.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use halfpipe_keystore::{
    create_key_file, KdfParams, KeyAction, KeyId, KeyKind, KeyState, KeyStore, KeyStoreError,
    Sealer, HEADER_LEN,
};
use zeroize::Zeroizing;

/// Serializes the tests that set CREDENTIALS_DIRECTORY (process-global).
static CRED_ENV: Mutex<()> = Mutex::new(());

const PASS: &str = "correct horse battery staple 7f3a";

fn tiny() -> KdfParams {
    KdfParams::new(64, 1, 1).unwrap()
}

fn pass(p: &str) -> Sealer {
    Sealer::Passphrase(Zeroizing::new(p.to_owned()))
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A store with one key of every kind and two users' keys, saved.
fn populated(path: &Path, sealer: &Sealer) -> KeyStore {
    let mut s = KeyStore::create(path, sealer, tiny(), 1_000).unwrap();
    s.generate(KeyKind::ServerStatic, None, 1_001).unwrap();
    s.generate(KeyKind::AuditSigning, None, 1_002).unwrap();
    s.generate(KeyKind::TokenPepper, None, 1_003).unwrap();
    s.generate(KeyKind::UserStatic, Some("alice"), 1_004)
        .unwrap();
    s.generate(KeyKind::UserStatic, Some("bob"), 1_005).unwrap();
    s
}

/// Every live secret of the store, copied out (test only).
fn secrets(s: &KeyStore) -> Vec<(KeyId, [u8; 32])> {
    s.list()
        .into_iter()
        .filter(|k| !matches!(k.state, KeyState::Revoked { .. }))
        .map(|k| (k.id.clone(), s.with_secret(&k.id, |b| *b).unwrap()))
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every textual form of a secret that could betray it.
fn forms(secret: &[u8; 32]) -> Vec<Vec<u8>> {
    let std64 = base64::engine::general_purpose::STANDARD.encode(secret);
    let numbers = secret.iter().map(|b| b.to_string()).collect::<Vec<_>>();
    vec![
        secret.to_vec(),
        secret[..16].to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode(&secret[..16]).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        std64.into_bytes(),
        numbers.join(",").into_bytes(),
        numbers[..8].join(",").into_bytes(),
        format!("{:?}", secret).into_bytes(),
        format!("{:?}", &secret[..8]).into_bytes(),
    ]
}

fn assert_no_secret(what: &str, hay: &[u8], secrets: &[(KeyId, [u8; 32])]) {
    for (id, s) in secrets {
        for f in forms(s) {
            assert!(
                !contains(hay, &f),
                "{what} contains a form of {id}'s secret"
            );
        }
    }
}

fn same_infos(a: &KeyStore, b: &KeyStore) {
    assert_eq!(a.list(), b.list());
    assert_eq!(secrets(a), secrets(b));
}

// ---------------------------------------------------------------- round trips

#[test]
fn round_trip_passphrase() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let s = populated(&path, &pass(PASS));
    assert_eq!(s.list().len(), 5);
    let back = KeyStore::open(&path, &pass(PASS)).unwrap();
    same_infos(&s, &back);
    assert_eq!(back.created_ms(), 1_000);
    assert_eq!(back.sealed_with(), "passphrase");
    // The parameters come from the header: m = 64 KiB, t = 1, p = 1.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[10..22], &[0, 0, 0, 64, 0, 0, 0, 1, 0, 0, 0, 1]);
    // Saving again re-seals under a fresh salt and nonce: a different file, same keys.
    back.save().unwrap();
    let again = std::fs::read(&path).unwrap();
    assert_ne!(bytes[38..82], again[38..82]);
    same_infos(&s, &KeyStore::open(&path, &pass(PASS)).unwrap());
}

#[test]
fn round_trip_key_file_and_spec() {
    let d = tmp();
    let key = d.path().join("store.key");
    create_key_file(&key).unwrap();
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(matches!(
        create_key_file(&key),
        Err(KeyStoreError::Exists { .. })
    ));
    let path = d.path().join("keys.hpks");
    let s = populated(&path, &Sealer::KeyFile(key.clone()));
    let spec = Sealer::from_spec(&format!("keyfile:{}", key.display())).unwrap();
    same_infos(&s, &KeyStore::open(&path, &spec).unwrap());

    // Raw 32 bytes in the file work too, and are the same key as their hex.
    let raw = d.path().join("raw.key");
    let hex_text = std::fs::read_to_string(&key).unwrap();
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut bytes).unwrap();
    std::fs::write(&raw, bytes).unwrap();
    std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o400)).unwrap();
    same_infos(&s, &KeyStore::open(&path, &Sealer::KeyFile(raw)).unwrap());
}

#[test]
fn key_file_readable_by_others_is_refused() {
    let d = tmp();
    let key = d.path().join("store.key");
    create_key_file(&key).unwrap();
    let path = d.path().join("keys.hpks");
    drop(populated(&path, &Sealer::KeyFile(key.clone())));
    for mode in [0o640, 0o604, 0o660, 0o644] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = KeyStore::open(&path, &Sealer::KeyFile(key.clone())).unwrap_err();
        assert!(matches!(e, KeyStoreError::Permissions { .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    KeyStore::open(&path, &Sealer::KeyFile(key)).unwrap();
}

#[test]
fn store_file_readable_by_others_is_refused() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    drop(populated(&path, &pass(PASS)));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = KeyStore::open(&path, &pass(PASS)).unwrap_err();
    assert!(matches!(e, KeyStoreError::Permissions { .. }), "{e}");
}

#[test]
fn round_trip_env_hex_and_base64() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let key = [0x5au8; 32];
    let var = "HALFPIPE_KEYSTORE_TEST_ENV_HEX_7731";
    std::env::set_var(var, hex::encode(key));
    let s = populated(&path, &Sealer::from_spec(&format!("env:{var}")).unwrap());
    let var64 = "HALFPIPE_KEYSTORE_TEST_ENV_B64_7731";
    std::env::set_var(var64, base64::engine::general_purpose::STANDARD.encode(key));
    same_infos(
        &s,
        &KeyStore::open(&path, &Sealer::Env(var64.into())).unwrap(),
    );

    // A key file holding the same key opens it too: raw-key sealers are interchangeable.
    let kf = d.path().join("same.key");
    std::fs::write(&kf, format!("{}\n", hex::encode(key))).unwrap();
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o600)).unwrap();
    same_infos(&s, &KeyStore::open(&path, &Sealer::KeyFile(kf)).unwrap());

    // Unset, or not a key: precise errors that never show the value.
    let unset = "HALFPIPE_KEYSTORE_TEST_ENV_UNSET_7731";
    let e = KeyStore::open(&path, &Sealer::Env(unset.into())).unwrap_err();
    assert!(
        matches!(e, KeyStoreError::BadSealer(_)) && e.to_string().contains(unset),
        "{e}"
    );
    let bad = "HALFPIPE_KEYSTORE_TEST_ENV_BAD_7731";
    let value = "not-a-key-but-maybe-a-secret-9q8w7e";
    std::env::set_var(bad, value);
    let e = KeyStore::open(&path, &Sealer::Env(bad.into())).unwrap_err();
    assert!(matches!(e, KeyStoreError::BadSealer(_)), "{e}");
    assert!(!e.to_string().contains(value) && !format!("{e:?}").contains(value));
    // A wrong key of the right shape.
    std::env::set_var(bad, hex::encode([0x5bu8; 32]));
    let e = KeyStore::open(&path, &Sealer::Env(bad.into())).unwrap_err();
    assert!(matches!(e, KeyStoreError::WrongKeyOrTampered { .. }), "{e}");
}

#[test]
fn round_trip_systemd_credential() {
    let _g = CRED_ENV.lock().unwrap_or_else(|e| e.into_inner());
    let d = tmp();
    let creds = d.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    create_key_file(&creds.join("halfpipe-store")).unwrap();
    std::fs::set_permissions(
        creds.join("halfpipe-store"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    std::env::set_var("CREDENTIALS_DIRECTORY", &creds);
    let path = d.path().join("keys.hpks");
    let sealer = Sealer::from_spec("credential:halfpipe-store").unwrap();
    let s = populated(&path, &sealer);
    same_infos(&s, &KeyStore::open(&path, &sealer).unwrap());

    let e = KeyStore::open(&path, &Sealer::Credential("missing".into())).unwrap_err();
    assert!(matches!(e, KeyStoreError::Io { .. }), "{e}");
    std::env::remove_var("CREDENTIALS_DIRECTORY");
    let e = KeyStore::open(&path, &sealer).unwrap_err();
    assert!(
        matches!(e, KeyStoreError::BadSealer(_)) && e.to_string().contains("CREDENTIALS_DIRECTORY"),
        "{e}"
    );
}

#[test]
fn passphrase_from_env_and_file() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let var = "HALFPIPE_KEYSTORE_TEST_PASSPHRASE_4410";
    std::env::set_var(var, PASS);
    let s = populated(
        &path,
        &Sealer::from_spec(&format!("passphrase-env:{var}")).unwrap(),
    );
    let pf = d.path().join("pass");
    std::fs::write(&pf, format!("{PASS}\n")).unwrap();
    std::fs::set_permissions(&pf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sealer = Sealer::from_spec(&format!("passphrase-file:{}", pf.display())).unwrap();
    same_infos(&s, &KeyStore::open(&path, &sealer).unwrap());
    std::fs::set_permissions(&pf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Sealer::from_spec(&format!("passphrase-file:{}", pf.display())).unwrap_err();
    assert!(matches!(e, KeyStoreError::Permissions { .. }), "{e}");
    std::env::set_var(var, "");
    assert!(matches!(
        Sealer::from_spec(&format!("passphrase-env:{var}")),
        Err(KeyStoreError::BadSealer(_))
    ));
}

#[test]
fn sealer_specs_are_checked_and_never_echo_secrets() {
    for (spec, needle) in [
        ("keyfile:", "path is empty"),
        ("env:", "environment variable name"),
        ("env:9X", "environment variable name"),
        ("env:A-B", "environment variable name"),
        ("credential:../etc/shadow", "plain file name"),
        ("credential:", "plain file name"),
        (
            "passphrase-env:HALFPIPE_KEYSTORE_SURELY_UNSET_99",
            "is not set",
        ),
        ("blob:x", "unknown sealer kind \"blob\""),
    ] {
        let e = Sealer::from_spec(spec).unwrap_err();
        assert!(matches!(e, KeyStoreError::BadSealer(_)), "{spec}: {e}");
        assert!(e.to_string().contains(needle), "{spec}: {e}");
    }
    for secretish in [
        "hunter2-Very-Secret",
        "passphrase:hunter2-Very-Secret",
        "Hunter2-Very-Secret:x",
    ] {
        let e = Sealer::from_spec(secretish).unwrap_err();
        assert!(!e.to_string().contains("hunter2-Very-Secret"), "{e}");
        assert!(!e.to_string().contains("Hunter2-Very-Secret"), "{e}");
        assert!(!format!("{e:?}").contains("unter2-Very-Secret"), "{e:?}");
    }
    assert!(matches!(Sealer::from_spec("env:HALFPIPE_X"), Ok(Sealer::Env(v)) if v == "HALFPIPE_X"));
    assert!(matches!(
        Sealer::from_spec("credential:halfpipe-store"),
        Ok(Sealer::Credential(_))
    ));
}

// ---------------------------------------------------------------- unseal failures

#[test]
fn wrong_passphrase_is_a_clear_error() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    drop(populated(&path, &pass(PASS)));
    let wrong = "correct horse battery stapler";
    let e = KeyStore::open(&path, &pass(wrong)).unwrap_err();
    assert!(matches!(e, KeyStoreError::WrongKeyOrTampered { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("cannot unseal") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains("wrong passphrase/key, or the file was modified"),
        "{msg}"
    );
    assert!(!msg.contains(wrong) && !msg.contains(PASS) && !format!("{e:?}").contains(wrong));
    assert_eq!(e.code(), "wrong_key_or_tampered");
}

#[test]
fn sealer_kind_mismatch() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    drop(populated(&path, &pass(PASS)));
    let key = d.path().join("k");
    create_key_file(&key).unwrap();
    let e = KeyStore::open(&path, &Sealer::KeyFile(key)).unwrap_err();
    assert!(matches!(e, KeyStoreError::SealerMismatch { .. }), "{e}");
}

/// Flip `mask` into byte `i` of the file and open: never Ok; the expected typed error.
fn flipped(path: &Path, orig: &[u8], i: usize, mask: u8, sealer: &Sealer) -> KeyStoreError {
    let mut b = orig.to_vec();
    b[i] ^= mask;
    std::fs::write(path, &b).unwrap();
    match KeyStore::open(path, sealer) {
        Ok(_) => panic!("byte {i} ^ {mask:#04x}: the store opened"),
        Err(e) => e,
    }
}

fn check_every_flip(sealer: &Sealer, raw_key: bool) {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    drop(populated(&path, sealer));
    let orig = std::fs::read(&path).unwrap();
    assert!(orig.len() > HEADER_LEN + 500);
    for i in 0..orig.len() {
        for mask in [0x01, 0x80, 0xff] {
            let e = flipped(&path, &orig, i, mask, sealer);
            let ok = match i {
                0..=5 => matches!(e, KeyStoreError::NotAKeyStore { .. }),
                6 => matches!(e, KeyStoreError::UnsupportedVersion { .. }),
                7..=9 => matches!(e, KeyStoreError::Malformed { .. }),
                10..=37 if raw_key => matches!(e, KeyStoreError::Malformed { .. }),
                10..=21 => matches!(
                    e,
                    KeyStoreError::ParamsOutOfRange { .. }
                        | KeyStoreError::WrongKeyOrTampered { .. }
                ),
                82..=85 => matches!(
                    e,
                    KeyStoreError::Truncated { .. } | KeyStoreError::Malformed { .. }
                ),
                _ => matches!(e, KeyStoreError::WrongKeyOrTampered { .. }),
            };
            assert!(ok, "byte {i} ^ {mask:#04x}: unexpected error {e:?}");
        }
    }
    // Restored, it opens again: the failures left nothing behind.
    std::fs::write(&path, &orig).unwrap();
    KeyStore::open(&path, sealer).unwrap();
}

#[test]
fn every_flipped_byte_is_refused_passphrase() {
    check_every_flip(&pass(PASS), false);
}

#[test]
fn every_flipped_byte_is_refused_raw_key() {
    let d = tmp();
    let key = d.path().join("k");
    create_key_file(&key).unwrap();
    check_every_flip(&Sealer::KeyFile(key), true);
}

#[test]
fn every_truncation_is_refused() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    drop(populated(&path, &pass(PASS)));
    let orig = std::fs::read(&path).unwrap();
    for len in 0..orig.len() {
        std::fs::write(&path, &orig[..len]).unwrap();
        match KeyStore::open(&path, &pass(PASS)) {
            Err(KeyStoreError::Truncated { len: l, needed, .. }) => {
                assert_eq!(l, len);
                assert!(needed > len);
            }
            Err(e) => panic!("truncated to {len}: {e:?}"),
            Ok(_) => panic!("truncated to {len}: the store opened"),
        }
    }
    let mut longer = orig.clone();
    longer.push(0);
    std::fs::write(&path, &longer).unwrap();
    assert!(matches!(
        KeyStore::open(&path, &pass(PASS)),
        Err(KeyStoreError::Malformed { .. })
    ));
    std::fs::write(&path, b"not a key store at all").unwrap();
    assert!(matches!(
        KeyStore::open(&path, &pass(PASS)),
        Err(KeyStoreError::NotAKeyStore { .. })
    ));
}

#[test]
fn hostile_argon2_params_are_refused_before_running() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    drop(populated(&path, &pass(PASS)));
    let orig = std::fs::read(&path).unwrap();
    let four_gib_kib: u32 = 4 * 1024 * 1024;
    for (off, value) in [
        (10, four_gib_kib),
        (10, u32::MAX),
        (14, 1_000_000),
        (18, 255),
        (14, 0),
        (18, 0),
        (10, 7),
    ] {
        let mut b = orig.clone();
        b[off..off + 4].copy_from_slice(&value.to_be_bytes());
        std::fs::write(&path, &b).unwrap();
        let t = Instant::now();
        let e = KeyStore::open(&path, &pass(PASS)).unwrap_err();
        assert!(
            matches!(e, KeyStoreError::ParamsOutOfRange { .. }),
            "{off}={value}: {e:?}"
        );
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        // Refused without running Argon2id (4 GiB of it would take many seconds).
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    // At create time too.
    let p2 = d.path().join("other.hpks");
    let bad = KdfParams {
        m_cost_kib: four_gib_kib,
        t_cost: 1,
        p_cost: 1,
    };
    assert!(matches!(
        KeyStore::create(&p2, &pass(PASS), bad, 0),
        Err(KeyStoreError::ParamsOutOfRange { .. })
    ));
    assert!(!p2.exists());
}

// ---------------------------------------------------------------- no secret leaks

#[test]
fn no_secret_in_the_file_debug_or_errors() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let sealer = pass(PASS);
    let mut s = populated(&path, &sealer);
    let (old, _new) = s.rotate(KeyKind::ServerStatic, 10, 2_000).unwrap();
    let all = secrets(&s);
    assert_eq!(all.len(), 6);
    s.save().unwrap();
    let file = std::fs::read(&path).unwrap();
    assert_no_secret("the file", &file, &all);
    assert!(!contains(&file, PASS.as_bytes()));

    let dbg = format!(
        "{s:?} {s:#?} {:?} {:?} {sealer:?}",
        s.list(),
        s.take_events()
    );
    assert_no_secret("Debug", dbg.as_bytes(), &all);
    assert!(!dbg.contains(PASS));
    assert!(dbg.contains("server-static-v1") && dbg.contains("<redacted>"));

    // Errors of every operation.
    let mut errs = vec![
        KeyStore::open(&path, &pass("nope")).unwrap_err(),
        s.generate(KeyKind::ServerStatic, None, 3).unwrap_err(),
        s.rotate_key(&old.id, 1, 3).unwrap_err(),
        s.x25519_private_zeroizing(&s.active(KeyKind::TokenPepper).unwrap().id)
            .unwrap_err(),
        s.sign_ed25519(&s.active(KeyKind::ServerStatic).unwrap().id, b"m")
            .unwrap_err(),
        s.with_secret(&"token-pepper-v9".parse().unwrap(), |_| ())
            .unwrap_err(),
    ];
    errs.push(KeyStore::create(&path, &sealer, tiny(), 0).unwrap_err());
    for e in &errs {
        let text = format!("{e} {e:?}");
        assert_no_secret("an error", text.as_bytes(), &all);
        assert!(!text.contains(PASS));
    }
}

#[test]
fn revoked_and_expired_secrets_are_gone_from_the_file() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let mut s = populated(&path, &pass(PASS));
    let before = secrets(&s);
    let pepper = s.active(KeyKind::TokenPepper).unwrap().id;
    let alice = s.active_labelled(KeyKind::UserStatic, "alice").unwrap().id;
    s.rotate(KeyKind::TokenPepper, 100, 5_000).unwrap();
    s.revoke(&alice, 5_001).unwrap();
    s.expire_retired(5_100).unwrap();
    let gone: Vec<_> = before
        .into_iter()
        .filter(|(id, _)| *id == pepper || *id == alice)
        .collect();
    assert_eq!(gone.len(), 2);
    assert_no_secret("the file", &std::fs::read(&path).unwrap(), &gone);
    let back = KeyStore::open(&path, &pass(PASS)).unwrap();
    for (id, _) in &gone {
        assert!(matches!(
            back.info(id).unwrap().state,
            KeyState::Revoked { .. }
        ));
        assert!(matches!(
            back.with_secret(id, |_| ()),
            Err(KeyStoreError::KeyRevoked(_))
        ));
    }
}

// ---------------------------------------------------------------- lifecycle

#[test]
fn rotation_overlap_then_expiry() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let mut s = KeyStore::create(&path, &pass(PASS), tiny(), 0).unwrap();
    let v1 = s.generate(KeyKind::ServerStatic, None, 1_000).unwrap();
    assert_eq!(v1.id.as_str(), "server-static-v1");
    assert!(v1.public.is_some());
    let v1_secret = s.with_secret(&v1.id, |b| *b).unwrap();

    let (old, new) = s.rotate(KeyKind::ServerStatic, 500, 2_000).unwrap();
    assert_eq!(old.id, v1.id);
    assert_eq!(old.state, KeyState::Retiring { until_ms: 2_500 });
    assert_eq!(new.id.as_str(), "server-static-v2");
    assert_eq!(new.state, KeyState::Active);
    assert_ne!(new.public, old.public);
    assert_eq!(s.active(KeyKind::ServerStatic).unwrap().id, new.id);

    // In the window both are accepted, the active one first; the old one still works.
    let ids = |v: Vec<halfpipe_keystore::KeyInfo>| v.into_iter().map(|k| k.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.accepting(KeyKind::ServerStatic, 2_499)),
        vec![new.id.clone(), old.id.clone()]
    );
    assert_eq!(s.with_secret(&old.id, |b| *b).unwrap(), v1_secret);
    assert!(s.expire_retired(2_499).unwrap().is_empty());
    // The state survives a reopen.
    let mut s = KeyStore::open(&path, &pass(PASS)).unwrap();
    assert_eq!(ids(s.accepting(KeyKind::ServerStatic, 2_400)).len(), 2);

    // Past the window: no longer accepted, then expired, revoked and wiped.
    assert_eq!(
        ids(s.accepting(KeyKind::ServerStatic, 2_500)),
        vec![new.id.clone()]
    );
    let expired = s.expire_retired(2_500).unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].state, KeyState::Revoked { at_ms: 2_500 });
    assert!(matches!(
        s.with_secret(&old.id, |_| ()),
        Err(KeyStoreError::KeyRevoked(_))
    ));
    let s = KeyStore::open(&path, &pass(PASS)).unwrap();
    assert_eq!(
        s.info(&old.id).unwrap().state,
        KeyState::Revoked { at_ms: 2_500 }
    );
    assert_eq!(s.info(&old.id).unwrap().public, old.public); // metadata kept
    assert!(!contains(
        &std::fs::read(&path).unwrap(),
        &hex::encode(v1_secret).into_bytes()
    ));
}

#[test]
fn versions_are_never_reused() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let mut s = KeyStore::create(&path, &pass(PASS), tiny(), 0).unwrap();
    let a = s.generate(KeyKind::AuditSigning, None, 1).unwrap();
    s.revoke(&a.id, 2).unwrap();
    let b = s.generate(KeyKind::AuditSigning, None, 3).unwrap();
    assert_eq!(b.id.as_str(), "audit-signing-v2");
    s.revoke(&b.id, 4).unwrap();
    drop(s);
    let mut s = KeyStore::open(&path, &pass(PASS)).unwrap();
    let c = s.generate(KeyKind::AuditSigning, None, 5).unwrap();
    assert_eq!(c.id.as_str(), "audit-signing-v3");
    let (_, d4) = s.rotate(KeyKind::AuditSigning, 0, 6).unwrap();
    assert_eq!(d4.id.as_str(), "audit-signing-v4");
    // Versions are per kind.
    assert_eq!(
        s.generate(KeyKind::TokenPepper, None, 7)
            .unwrap()
            .id
            .as_str(),
        "token-pepper-v1"
    );
    let ids: std::collections::BTreeSet<_> = s.list().into_iter().map(|k| k.id).collect();
    assert_eq!(ids.len(), s.list().len());
}

#[test]
fn events_for_create_rotate_revoke_expire() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let mut s = KeyStore::create(&path, &pass(PASS), tiny(), 0).unwrap();
    assert!(s.take_events().is_empty());
    let k = s.generate(KeyKind::ServerStatic, None, 10).unwrap();
    let u = s.generate(KeyKind::UserStatic, Some("carol"), 11).unwrap();
    let (old, new) = s.rotate(KeyKind::ServerStatic, 5, 20).unwrap();
    s.revoke(&u.id, 30).unwrap();
    s.expire_retired(40).unwrap();
    let ev = s.take_events();
    let got: Vec<_> = ev
        .iter()
        .map(|e| (e.action, e.id.as_str().to_owned(), e.at_ms))
        .collect();
    assert_eq!(
        got,
        vec![
            (KeyAction::Created, k.id.to_string(), 10),
            (KeyAction::Created, u.id.to_string(), 11),
            (KeyAction::Rotated, new.id.to_string(), 20),
            (KeyAction::Revoked, u.id.to_string(), 30),
            (KeyAction::Expired, old.id.to_string(), 40),
        ]
    );
    assert_eq!(ev[1].label.as_deref(), Some("carol"));
    assert_eq!(ev[2].replaces.as_ref(), Some(&old.id));
    assert_eq!(ev[2].until_ms, Some(25));
    assert_eq!(
        ev[2].to_string(),
        "key rotated: server-static-v2, replaces server-static-v1 (accepted until 25 ms)"
    );
    let json = serde_json::to_string(&ev[3]).unwrap();
    assert!(
        json.contains("\"action\":\"revoked\"") && json.contains("\"kind\":\"user-static\""),
        "{json}"
    );
    assert!(s.take_events().is_empty());
    // Failed operations record nothing.
    assert!(s.revoke(&u.id, 50).is_err());
    assert!(s.generate(KeyKind::ServerStatic, None, 50).is_err());
    assert!(s.take_events().is_empty());
}

#[test]
fn a_failed_save_changes_nothing() {
    let d = tmp();
    let dir = d.path().join("sub");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("keys.hpks");
    let mut s = KeyStore::create(&path, &pass(PASS), tiny(), 0).unwrap();
    let k = s.generate(KeyKind::ServerStatic, None, 1).unwrap();
    s.take_events();
    std::fs::remove_dir_all(&dir).unwrap();
    let before = s.list();
    assert!(matches!(
        s.rotate(KeyKind::ServerStatic, 10, 2),
        Err(KeyStoreError::Io { .. })
    ));
    assert!(matches!(
        s.generate(KeyKind::TokenPepper, None, 2),
        Err(KeyStoreError::Io { .. })
    ));
    assert!(matches!(s.revoke(&k.id, 2), Err(KeyStoreError::Io { .. })));
    assert_eq!(s.list(), before);
    assert!(s.take_events().is_empty());
}

#[test]
fn create_refuses_an_existing_file_and_leaves_no_temporaries() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    std::fs::write(&path, b"precious").unwrap();
    let e = KeyStore::create(&path, &pass(PASS), tiny(), 0).unwrap_err();
    assert!(matches!(e, KeyStoreError::Exists { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    let p2 = d.path().join("k2.hpks");
    let mut s = KeyStore::create(&p2, &pass(PASS), tiny(), 0).unwrap();
    s.generate(KeyKind::TokenPepper, None, 1).unwrap();
    s.save().unwrap();
    let names: Vec<PathBuf> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(matches!(
        KeyStore::open(d.path().join("none"), &pass(PASS)),
        Err(KeyStoreError::Io { .. })
    ));
}

#[test]
fn singleton_and_label_rules() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let mut s = KeyStore::create(&path, &pass(PASS), tiny(), 0).unwrap();
    assert!(matches!(
        s.rotate(KeyKind::ServerStatic, 1, 1),
        Err(KeyStoreError::NoActiveKey { .. })
    ));
    s.generate(KeyKind::ServerStatic, None, 1).unwrap();
    assert!(matches!(
        s.generate(KeyKind::ServerStatic, None, 2),
        Err(KeyStoreError::AlreadyActive { .. })
    ));
    assert!(matches!(
        s.generate(KeyKind::UserStatic, None, 2),
        Err(KeyStoreError::BadLabel(_))
    ));
    for bad in ["", " alice", "al\nice", &"x".repeat(65)] {
        assert!(
            matches!(
                s.generate(KeyKind::UserStatic, Some(bad), 2),
                Err(KeyStoreError::BadLabel(_))
            ),
            "{bad:?}"
        );
    }
    let a = s.generate(KeyKind::UserStatic, Some("alice"), 2).unwrap();
    s.generate(KeyKind::UserStatic, Some("bob"), 2).unwrap();
    assert!(matches!(
        s.generate(KeyKind::UserStatic, Some("alice"), 3),
        Err(KeyStoreError::AlreadyActive { .. })
    ));
    assert!(matches!(
        s.rotate(KeyKind::UserStatic, 1, 3),
        Err(KeyStoreError::BadLabel(_))
    ));
    let (old, new) = s.rotate_key(&a.id, 100, 3).unwrap();
    assert_eq!(new.label.as_deref(), Some("alice"));
    assert!(matches!(
        s.rotate_key(&old.id, 1, 4),
        Err(KeyStoreError::NotActive(_))
    ));
    assert_eq!(
        s.active_labelled(KeyKind::UserStatic, "alice").unwrap().id,
        new.id
    );
    assert_eq!(s.accepting(KeyKind::UserStatic, 50).len(), 3);
    let unknown: KeyId = "user-static-v99".parse().unwrap();
    assert!(matches!(
        s.revoke(&unknown, 5),
        Err(KeyStoreError::UnknownKey(_))
    ));
}

#[test]
fn keys_are_used_in_place() {
    let d = tmp();
    let path = d.path().join("keys.hpks");
    let s = populated(&path, &pass(PASS));
    // X25519: the bytes handed to the Noise library derive the listed public key.
    let st = s.active(KeyKind::ServerStatic).unwrap();
    let private = s.x25519_private_zeroizing(&st.id).unwrap();
    let mut arr = [0u8; 32];
    arr.copy_from_slice(&private);
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(arr));
    assert_eq!(Some(public.to_bytes()), st.public);
    // Ed25519: signatures verify under the listed public key.
    let audit = s.active(KeyKind::AuditSigning).unwrap();
    let sig = s.sign_ed25519(&audit.id, b"checkpoint 42").unwrap();
    let pk =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, audit.public.unwrap());
    pk.verify(b"checkpoint 42", &sig).unwrap();
    assert!(pk.verify(b"checkpoint 43", &sig).is_err());
    assert_eq!(s.active(KeyKind::TokenPepper).unwrap().public, None);
    assert!(matches!(
        s.x25519_private_zeroizing(&audit.id),
        Err(KeyStoreError::WrongKind { .. })
    ));
}

#[test]
fn an_imported_key_is_sealed_under_the_next_version_and_its_bytes_never_reach_the_file() {
    let dir = tmp();
    let path = dir.path().join("client.hpks");
    let sealer = pass(PASS);
    let mut s = KeyStore::create(&path, &sealer, tiny(), 1).unwrap();
    let user = [0x5au8; 32];
    let psk = [0xc3u8; 32];
    let u = s
        .import(KeyKind::UserStatic, Some("self"), &user, 2)
        .unwrap();
    let p = s.import(KeyKind::PreSharedKey, None, &psk, 3).unwrap();
    assert_eq!(u.id.as_str(), "user-static-v1");
    assert_eq!(p.id.as_str(), "pre-shared-key-v1");
    assert!(u.public.is_some(), "an X25519 key gets its public key");
    assert_eq!(p.public, None);
    let events = s.take_events();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.action == KeyAction::Imported));
    // A second active one of a singleton kind, or of the same label, is refused.
    assert!(matches!(
        s.import(KeyKind::PreSharedKey, None, &psk, 4),
        Err(KeyStoreError::AlreadyActive { .. })
    ));
    assert!(matches!(
        s.import(KeyKind::UserStatic, Some("self"), &user, 4),
        Err(KeyStoreError::AlreadyActive { .. })
    ));
    let raw = std::fs::read(&path).unwrap();
    for f in forms(&user).into_iter().chain(forms(&psk)) {
        assert!(!contains(&raw, &f), "an imported secret is in the file");
    }
    drop(s);
    let back = KeyStore::open(&path, &sealer).unwrap();
    assert_eq!(back.with_secret(&u.id, |b| *b).unwrap(), user);
    assert_eq!(back.with_secret(&p.id, |b| *b).unwrap(), psk);
}

#[test]
fn a_reference_to_a_key_kept_elsewhere_survives_a_reopen_and_can_be_replaced() {
    let dir = tmp();
    let path = dir.path().join("s.hpks");
    let sealer = pass(PASS);
    let mut s = KeyStore::create(&path, &sealer, tiny(), 1).unwrap();
    assert!(s.reference("audit-signing").is_none());
    s.set_reference("audit-signing", "/etc/halfpipe/audit.key", Some([7; 32]), 5)
        .unwrap();
    assert!(
        s.set_reference("bad\nname", "x", None, 5).is_err(),
        "names are checked like labels"
    );
    drop(s);
    let mut s = KeyStore::open(&path, &sealer).unwrap();
    let r = s.reference("audit-signing").unwrap();
    assert_eq!(r.location, "/etc/halfpipe/audit.key");
    assert_eq!(r.public, Some([7; 32]));
    assert_eq!(r.set_ms, 5);
    s.set_reference("audit-signing", "/elsewhere", Some([8; 32]), 6)
        .unwrap();
    drop(s);
    let s = KeyStore::open(&path, &sealer).unwrap();
    assert_eq!(s.reference("audit-signing").unwrap().public, Some([8; 32]));
}
