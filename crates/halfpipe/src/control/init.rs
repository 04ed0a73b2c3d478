//! `halfpipe server init`: makes a state directory the server can start from.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use halfpipe_audit::AuditKey;
use halfpipe_control::capability::{Capability, CapabilitySet};
use halfpipe_control::mode::{Mode, ModeFile, ModeState};
use halfpipe_keystore::{KeyEvent, KeyKind, KeyStore, KeyStoreError};
use halfpipe_state::token::{Pepper, Tokens};
use halfpipe_state::StateDb;

use super::settings::ControlSettings;
use super::{wall_ms, ControlError};

/// What `init` made.
#[derive(Debug)]
pub struct Initialized {
    /// The file holding the bootstrap admin token (0600).
    pub token_file: PathBuf,
    /// The bootstrap token's id.
    pub token_id: String,
    /// The audit signing key's public half (hex), for `log verify --key`.
    pub audit_public: String,
}

/// The audit fields of a key store event (one shape for `init` and the running server).
pub fn key_event_fields(ev: &KeyEvent) -> Vec<(&'static str, String)> {
    vec![
        ("event", format!("{:?}", ev.action).to_lowercase()),
        ("key", ev.id.as_str().into()),
        ("kind", ev.kind.as_str().into()),
        ("label", ev.label.clone().unwrap_or_default()),
        (
            "replaces",
            ev.replaces
                .as_ref()
                .map(|r| r.as_str().to_string())
                .unwrap_or_default(),
        ),
        (
            "until_ms",
            ev.until_ms.map(|u| u.to_string()).unwrap_or_default(),
        ),
    ]
}

fn mkdir(path: &Path) -> Result<(), ControlError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| ControlError::Io {
            what: "cannot create directory",
            path: path.display().to_string(),
            source,
        })
}

/// The name under which the key store records where the audit signing key lives.
pub const AUDIT_KEY_REFERENCE: &str = "audit-signing";

/// Refuses a state directory that was already initialized (checked before anything,
/// the key store included, is created).
pub fn check_fresh(settings: &ControlSettings) -> Result<(), ControlError> {
    let p = &settings.paths;
    for existing in [&p.db, &p.mode_file, &p.pepper, &p.audit_key, &p.audit_log] {
        if existing.exists() {
            return Err(ControlError::Io {
                what: "already initialized: refusing to overwrite",
                path: existing.display().to_string(),
                source: std::io::ErrorKind::AlreadyExists.into(),
            });
        }
    }
    Ok(())
}

/// The token pepper held by a key store, if it has one.
pub fn store_pepper(store: &KeyStore) -> Result<Option<Pepper>, KeyStoreError> {
    match store.active(KeyKind::TokenPepper) {
        Some(k) => store.with_secret(&k.id, |s| Some(Pepper::from_bytes(*s))),
        None => Ok(None),
    }
}

/// Creates the state directory: database, audit key and log, mode OPEN, and a
/// bootstrap admin token written to a 0600 file. Refuses an initialized directory.
///
/// The token pepper goes into `store` when there is one (else a 0600 file), and the
/// store records where the audit key lives and its public key; the store's key events
/// (the server key and the pepper created) are the log's first records.
pub fn init(
    settings: &ControlSettings,
    mut store: Option<&mut KeyStore>,
) -> Result<Initialized, ControlError> {
    let p = &settings.paths;
    check_fresh(settings)?;
    mkdir(&p.dir)?;
    for f in [&p.audit_log, &p.audit_key, &p.admin_socket] {
        if let Some(parent) = f.parent() {
            mkdir(parent)?;
        }
    }
    let pepper = match store.as_deref_mut() {
        Some(s) => {
            s.generate(KeyKind::TokenPepper, None, wall_ms())?;
            store_pepper(s)?.ok_or(KeyStoreError::NoActiveKey {
                kind: KeyKind::TokenPepper,
                label: None,
            })?
        }
        None => Pepper::create(&p.pepper)?,
    };
    let db = StateDb::open(&p.db)?;
    let tokens = Tokens::new(&db, pepper);
    let (info, secret) = tokens.create(
        "bootstrap",
        CapabilitySet::new([Capability::Admin]),
        None,
        wall_ms(),
    )?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p.bootstrap_token)
        .and_then(|mut f| {
            f.write_all(secret.expose().as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            Ok(f)
        })
        .map_err(|source| ControlError::Io {
            what: "cannot write the bootstrap token",
            path: p.bootstrap_token.display().to_string(),
            source,
        })?;
    let _ = f.flush();
    let key = AuditKey::generate();
    key.write_new(&p.audit_key)?;
    let audit_public = key.public_hex();
    let mut key_events = Vec::new();
    if let Some(s) = store.as_deref_mut() {
        s.set_reference(
            AUDIT_KEY_REFERENCE,
            &p.audit_key.display().to_string(),
            Some(key.public_bytes()),
            wall_ms(),
        )?;
        key_events = s.take_events();
    }
    let mut log = settings.open_audit_log(key)?;
    log.append(
        "state_initialized",
        &[("bootstrap_token", info.id.clone())],
        wall_ms(),
    )?;
    for ev in &key_events {
        log.append("key_event", &key_event_fields(ev), wall_ms())?;
    }
    if store.is_some() {
        log.append(
            "key_event",
            &[
                ("event", "referenced".into()),
                ("key", AUDIT_KEY_REFERENCE.into()),
                ("location", p.audit_key.display().to_string()),
                ("public", audit_public.clone()),
            ],
            wall_ms(),
        )?;
    }
    log.close(wall_ms())?;
    ModeFile::store(
        &p.mode_file,
        &ModeState::startup(
            Mode::Open,
            wall_ms(),
            "initialized by 'halfpipe server init'",
        ),
    )?;
    db.flush()?;
    Ok(Initialized {
        token_file: p.bootstrap_token.clone(),
        token_id: info.id,
        audit_public,
    })
}
