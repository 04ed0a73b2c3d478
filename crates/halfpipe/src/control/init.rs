//! `halfpipe server init`: makes a state directory the server can start from.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use halfpipe_audit::{AuditKey, AuditLog, CheckpointPolicy};
use halfpipe_control::capability::{Capability, CapabilitySet};
use halfpipe_control::mode::{Mode, ModeFile, ModeState};
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

/// Creates the state directory: token pepper, database, audit key and log, mode OPEN,
/// and a bootstrap admin token written to a 0600 file. Refuses an initialized directory.
pub fn init(settings: &ControlSettings) -> Result<Initialized, ControlError> {
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
    mkdir(&p.dir)?;
    for f in [&p.audit_log, &p.audit_key, &p.admin_socket] {
        if let Some(parent) = f.parent() {
            mkdir(parent)?;
        }
    }
    let pepper = Pepper::create(&p.pepper)?;
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
    let policy = CheckpointPolicy {
        every_records: settings.checkpoint_every_records,
        every: settings.checkpoint_every,
    };
    let mut log = AuditLog::open(&p.audit_log, &p.audit_head, key, policy)?;
    log.append(
        "state_initialized",
        &[("bootstrap_token", info.id.clone())],
        wall_ms(),
    )?;
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
