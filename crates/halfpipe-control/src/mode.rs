//! Modes, the rules for moving between them, and their persistence.
//!
//! # The modes
//!
//! | mode | what the server does |
//! | --- | --- |
//! | [`Mode::Open`] | normal operation: every configured user may open sessions to every destination the egress policy allows |
//! | [`Mode::Restricted`] | only users and destinations on the restricted-mode allow lists; new sessions of everyone else are refused (existing ones are left alone) |
//! | [`Mode::Lockdown`] | no new sessions at all, existing sessions are closed, and only the admin API answers |
//!
//! # Transitions
//!
//! Every change of mode goes through [`ModeState::apply`], which holds all the rules:
//!
//! - anyone may **escalate** (move to a more severe mode): the system (tripwires, startup
//!   checks) or a token holding `mode.set` (or `admin`);
//! - **de-escalation** needs a token holding `mode.set` (or `admin`); the system never
//!   de-escalates;
//! - leaving **lockdown** additionally needs an explicit confirmation
//!   ([`ModeRequest::confirm`], `--confirm-leave-lockdown` on the command line);
//! - while the state is **frozen** (set by the system through [`ModeState::freeze`] after a
//!   clock jump) de-escalation is refused until a token holding `mode.set` clears the freeze
//!   with [`ModeState::unfreeze`]; escalation stays possible;
//! - asking for the current mode is not an error: it is reported as [`Change::Unchanged`].
//!
//! # Persistence
//!
//! [`ModeFile::store`] writes the state atomically (temporary file in the same directory,
//! write, fsync, rename, fsync of the directory) with mode 0600, as one line of JSON carrying a
//! SHA-256 checksum. [`ModeFile::load`] never fails open: a missing, unreadable, insecure or
//! corrupt file yields a LOCKDOWN state whose `reason` says what was wrong and how to recover.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::capability::{Capability, CapabilitySet};

/// The command an operator runs to leave a lockdown the server fell back to.
pub const RECOVERY_HINT: &str = "inspect the server, then run `halfpipe ctl mode set open --confirm-leave-lockdown` with an admin token";

/// The longest `reason` a [`ModeRequest`] or [`UnfreezeRequest`] may carry, in bytes.
pub const MAX_REASON_LEN: usize = 1024;

/// The server's operating mode. Ordered by severity: `Open < Restricted < Lockdown`.
///
/// Serialized as the lowercase names `"open"`, `"restricted"`, `"lockdown"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Normal operation.
    Open,
    /// Only users and destinations on the allow lists; new sessions of others are refused.
    Restricted,
    /// No new sessions, existing sessions closed; only the admin API answers.
    Lockdown,
}

impl Mode {
    /// Every mode, from the least to the most severe.
    pub const ALL: [Mode; 3] = [Mode::Open, Mode::Restricted, Mode::Lockdown];

    /// The name used in the API, on the command line and in storage.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Restricted => "restricted",
            Mode::Lockdown => "lockdown",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mode name that is not one of [`Mode::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?} (known: open, restricted, lockdown)")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMode(s.to_string()))
    }
}

/// The mode together with who set it, when and why.
///
/// `changed_at_ms`, `changed_by` and `reason` describe the last change of the state: a change
/// of mode, a freeze or an unfreeze.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeState {
    /// The current mode.
    pub mode: Mode,
    /// De-escalation is frozen (after a clock jump) until an admin unfreezes it.
    pub frozen: bool,
    /// Wall-clock time of the last change, in milliseconds since the Unix epoch.
    pub changed_at_ms: u64,
    /// Who made the last change: `token:<id>`, `tripwire:<kind>`, `startup`, ….
    pub changed_by: String,
    /// Why.
    pub reason: String,
}

impl ModeState {
    /// A state set at startup (`changed_by` is `"startup"`), not frozen.
    pub fn startup(mode: Mode, now_ms: u64, reason: impl Into<String>) -> Self {
        Self {
            mode,
            frozen: false,
            changed_at_ms: now_ms,
            changed_by: "startup".to_string(),
            reason: reason.into(),
        }
    }

    /// Applies a request to change the mode. All the transition rules live here (see the
    /// [module documentation](self)); the state itself is not modified, the new one is returned.
    pub fn apply(&self, req: &ModeRequest) -> Result<Transition, ModeError> {
        check_reason(&req.reason)?;
        if let Authority::Token { id, caps } = &req.by {
            if !caps.allows(Capability::ModeSet) {
                return Err(ModeError::MissingCapability { token: id.clone() });
            }
        }
        let change = match req.target.cmp(&self.mode) {
            std::cmp::Ordering::Equal => return Ok(self.unchanged()),
            std::cmp::Ordering::Greater => Change::Escalated,
            std::cmp::Ordering::Less => {
                if let Authority::System { source } = &req.by {
                    return Err(ModeError::SystemCannotDeEscalate {
                        by: source.clone(),
                        from: self.mode,
                        to: req.target,
                    });
                }
                if self.frozen {
                    return Err(ModeError::Frozen {
                        from: self.mode,
                        to: req.target,
                    });
                }
                if self.mode == Mode::Lockdown && !req.confirm {
                    return Err(ModeError::ConfirmationRequired { to: req.target });
                }
                Change::DeEscalated
            }
        };
        Ok(Transition {
            state: ModeState {
                mode: req.target,
                frozen: self.frozen,
                changed_at_ms: req.now_ms,
                changed_by: req.by.label(),
                reason: req.reason.clone(),
            },
            from: self.mode,
            change,
        })
    }

    /// Clears the freeze. Only a token holding `mode.set` (or `admin`) may; unfreezing a state
    /// that is not frozen is reported as [`Change::Unchanged`].
    pub fn unfreeze(&self, req: &UnfreezeRequest) -> Result<Transition, ModeError> {
        check_reason(&req.reason)?;
        match &req.by {
            Authority::System { source } => {
                return Err(ModeError::SystemCannotUnfreeze { by: source.clone() })
            }
            Authority::Token { id, caps } => {
                if !caps.allows(Capability::ModeSet) {
                    return Err(ModeError::MissingCapability { token: id.clone() });
                }
            }
        }
        if !self.frozen {
            return Ok(self.unchanged());
        }
        Ok(Transition {
            state: ModeState {
                mode: self.mode,
                frozen: false,
                changed_at_ms: req.now_ms,
                changed_by: req.by.label(),
                reason: req.reason.clone(),
            },
            from: self.mode,
            change: Change::Unfrozen,
        })
    }

    /// Freezes de-escalation; done by the system (`source`, e.g. `"tripwire:clock_jump"`)
    /// after a clock jump. The mode is kept. Freezing a frozen state is
    /// [`Change::Unchanged`]. A `reason` longer than [`MAX_REASON_LEN`] is truncated.
    pub fn freeze(&self, source: &str, reason: &str, now_ms: u64) -> Transition {
        if self.frozen {
            return self.unchanged();
        }
        Transition {
            state: ModeState {
                mode: self.mode,
                frozen: true,
                changed_at_ms: now_ms,
                changed_by: source.to_string(),
                reason: truncate(reason, MAX_REASON_LEN).to_string(),
            },
            from: self.mode,
            change: Change::Frozen,
        }
    }

    fn unchanged(&self) -> Transition {
        Transition {
            state: self.clone(),
            from: self.mode,
            change: Change::Unchanged,
        }
    }
}

fn check_reason(reason: &str) -> Result<(), ModeError> {
    if reason.len() > MAX_REASON_LEN {
        return Err(ModeError::ReasonTooLong {
            len: reason.len(),
            max: MAX_REASON_LEN,
        });
    }
    Ok(())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Who asks for a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authority {
    /// The server itself: a tripwire or a startup check. `source` is recorded verbatim as
    /// `changed_by`, e.g. `"tripwire:handshake_failures_total"` or `"startup"`.
    System {
        /// What in the server asks, e.g. `"tripwire:audit_failure"`.
        source: String,
    },
    /// An admin token, through the admin API. Recorded as `token:<id>`.
    Token {
        /// The token's public id.
        id: String,
        /// What the token may do.
        caps: CapabilitySet,
    },
}

impl Authority {
    /// How the authority is recorded in [`ModeState::changed_by`].
    pub fn label(&self) -> String {
        match self {
            Authority::System { source } => source.clone(),
            Authority::Token { id, .. } => format!("token:{id}"),
        }
    }
}

/// A request to move to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeRequest {
    /// The mode asked for.
    pub target: Mode,
    /// Who asks.
    pub by: Authority,
    /// The explicit confirmation needed to leave lockdown (`--confirm-leave-lockdown`).
    pub confirm: bool,
    /// Why; recorded in the state. At most [`MAX_REASON_LEN`] bytes.
    pub reason: String,
    /// Wall-clock time of the request, in milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// A request to clear the freeze on de-escalation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnfreezeRequest {
    /// Who asks (must be a token holding `mode.set`).
    pub by: Authority,
    /// Why; recorded in the state. At most [`MAX_REASON_LEN`] bytes.
    pub reason: String,
    /// Wall-clock time of the request, in milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// What a request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Moved to a more severe mode.
    Escalated,
    /// Moved to a less severe mode.
    DeEscalated,
    /// Nothing to do: the state already was what was asked for.
    Unchanged,
    /// De-escalation is now frozen.
    Frozen,
    /// De-escalation is no longer frozen.
    Unfrozen,
}

/// The outcome of an accepted request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The new state (equal to the old one when `change` is [`Change::Unchanged`]).
    pub state: ModeState,
    /// The mode before the request.
    pub from: Mode,
    /// What happened.
    pub change: Change,
}

impl Transition {
    /// Whether the state changed (and so should be stored and logged).
    pub fn changed(&self) -> bool {
        self.change != Change::Unchanged
    }
}

/// A refused request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    /// The token does not hold `mode.set` (or `admin`).
    #[error("token {token} lacks the mode.set capability needed to change the mode")]
    MissingCapability {
        /// The token's id.
        token: String,
    },
    /// The system asked to de-escalate; only a token with `mode.set` may.
    #[error("{by} may only escalate the mode: moving from {from} to {to} needs a token with the mode.set capability")]
    SystemCannotDeEscalate {
        /// What in the server asked.
        by: String,
        /// The current mode.
        from: Mode,
        /// The mode asked for.
        to: Mode,
    },
    /// De-escalation while frozen.
    #[error("de-escalation from {from} to {to} is frozen after a clock jump: an admin must unfreeze first (`halfpipe ctl mode unfreeze` with a token holding mode.set)")]
    Frozen {
        /// The current mode.
        from: Mode,
        /// The mode asked for.
        to: Mode,
    },
    /// Leaving lockdown without the confirmation flag.
    #[error(
        "leaving lockdown for {to} needs explicit confirmation: pass --confirm-leave-lockdown"
    )]
    ConfirmationRequired {
        /// The mode asked for.
        to: Mode,
    },
    /// The system asked to unfreeze; only a token with `mode.set` may.
    #[error(
        "{by} may not unfreeze de-escalation: that needs a token with the mode.set capability"
    )]
    SystemCannotUnfreeze {
        /// What in the server asked.
        by: String,
    },
    /// The reason is too long.
    #[error("reason is {len} bytes long, at most {max} are allowed")]
    ReasonTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit, [`MAX_REASON_LEN`].
        max: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// Persistence
// ---------------------------------------------------------------------------------------------

/// The format number written in every mode file.
pub const MODE_FILE_FORMAT: u64 = 1;

/// The largest mode file accepted (and written), in bytes.
pub const MAX_MODE_FILE_LEN: u64 = 64 * 1024;

/// Domain separation for the checksum.
const CHECKSUM_CONTEXT: &[u8] = b"halfpipe mode file v1\0";

/// The on-disk shape: `{"format":1,"state":{...},"sha256":"<hex>"}` followed by a newline.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    format: u64,
    state: ModeState,
    sha256: String,
}

/// Reading and writing the mode file.
///
/// The file is one line of compact JSON, `{"format":1,"state":{…},"sha256":"…"}`, where
/// `sha256` is the lowercase hex SHA-256 of `"halfpipe mode file v1\0"` followed by the compact
/// JSON encoding of `state` (fields in declaration order: `mode`, `frozen`, `changed_at_ms`,
/// `changed_by`, `reason`). A file is accepted only if it is byte for byte the canonical
/// encoding of the state it carries, so any change to it is detected.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModeFile;

/// The outcome of [`ModeFile::load`]: always a state to run with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadedMode {
    /// The stored state, intact.
    Stored(ModeState),
    /// The file could not be used: the server runs in LOCKDOWN, and should log `problem`.
    FellBackToLockdown {
        /// A LOCKDOWN state whose `reason` says why and how to recover.
        state: ModeState,
        /// What was wrong with the file.
        problem: LoadProblem,
    },
}

impl LoadedMode {
    /// The state to run with.
    pub fn state(&self) -> &ModeState {
        match self {
            LoadedMode::Stored(s) | LoadedMode::FellBackToLockdown { state: s, .. } => s,
        }
    }

    /// The state to run with, by value.
    pub fn into_state(self) -> ModeState {
        match self {
            LoadedMode::Stored(s) | LoadedMode::FellBackToLockdown { state: s, .. } => s,
        }
    }

    /// Whether the file could not be used and the state is the LOCKDOWN fallback.
    pub fn fell_back(&self) -> bool {
        matches!(self, LoadedMode::FellBackToLockdown { .. })
    }

    /// What was wrong with the file, if anything.
    pub fn problem(&self) -> Option<&LoadProblem> {
        match self {
            LoadedMode::Stored(_) => None,
            LoadedMode::FellBackToLockdown { problem, .. } => Some(problem),
        }
    }
}

/// Why a mode file could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadProblem {
    /// There is no file.
    #[error("missing (no file at that path)")]
    Missing,
    /// The file exists but could not be read.
    #[error("unreadable: {0}")]
    Unreadable(String),
    /// The path is not a regular file.
    #[error("not a regular file")]
    NotAFile,
    /// Group or others may write the file, so its content cannot be trusted.
    #[error("insecure: file mode {mode:04o} lets group or others write it (chmod 600 it after checking its content)")]
    InsecurePermissions {
        /// The permission bits.
        mode: u32,
    },
    /// The file is larger than [`MAX_MODE_FILE_LEN`].
    #[error("corrupt: {len} bytes long, a mode file is at most {max}")]
    TooLarge {
        /// Its length (at least `max + 1`).
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The file is empty.
    #[error("corrupt: empty file (an interrupted write or a full disk?)")]
    Empty,
    /// The file ends in the middle of the JSON document.
    #[error("corrupt: truncated ({0})")]
    Truncated(String),
    /// The file is not JSON.
    #[error("corrupt: not JSON ({0})")]
    NotJson(String),
    /// The file is JSON but not a mode file.
    #[error("corrupt: not a mode file ({0})")]
    NotAModeFile(String),
    /// The file has a format number this version does not know.
    #[error("unsupported format {found} (this version reads format {MODE_FILE_FORMAT})")]
    UnsupportedFormat {
        /// The format number found.
        found: u64,
    },
    /// The checksum does not match the content.
    #[error("corrupt: checksum mismatch (stored {stored:?}, computed {computed})")]
    ChecksumMismatch {
        /// The checksum in the file (at most 80 characters of it).
        stored: String,
        /// The checksum of the content.
        computed: String,
    },
    /// The checksum matches but the bytes are not the canonical encoding (edited by hand?).
    #[error("corrupt: not in canonical form (edited by hand?)")]
    NotCanonical,
}

/// A failure to store the mode file. The previous file, if any, is left intact.
#[derive(Debug, thiserror::Error)]
pub enum ModeFileError {
    /// The path names no file (`/`, `..`, an empty path).
    #[error("{0}: not a file path")]
    NoFileName(PathBuf),
    /// The encoded state is larger than [`MAX_MODE_FILE_LEN`].
    #[error("mode state encodes to {len} bytes, a mode file is at most {max}")]
    TooLarge {
        /// The encoded length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The state could not be encoded.
    #[error("encoding the mode state: {0}")]
    Encode(String),
    /// A file-system step failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn checksum(state: &ModeState) -> Result<String, serde_json::Error> {
    let body = serde_json::to_vec(state)?;
    let mut h = Sha256::new();
    h.update(CHECKSUM_CONTEXT);
    h.update(&body);
    Ok(hex::encode(h.finalize()))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ModeFile {
    /// The exact bytes [`ModeFile::store`] writes for `state`.
    pub fn encode(state: &ModeState) -> Result<Vec<u8>, ModeFileError> {
        let enc = |e: serde_json::Error| ModeFileError::Encode(e.to_string());
        let repr = FileRepr {
            format: MODE_FILE_FORMAT,
            state: state.clone(),
            sha256: checksum(state).map_err(enc)?,
        };
        let mut out = serde_json::to_vec(&repr).map_err(enc)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Checks and decodes the content of a mode file.
    pub fn decode(bytes: &[u8]) -> Result<ModeState, LoadProblem> {
        if bytes.is_empty() {
            return Err(LoadProblem::Empty);
        }
        if bytes.len() as u64 > MAX_MODE_FILE_LEN {
            return Err(LoadProblem::TooLarge {
                len: bytes.len() as u64,
                max: MAX_MODE_FILE_LEN,
            });
        }
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            if e.is_eof() {
                LoadProblem::Truncated(e.to_string())
            } else {
                LoadProblem::NotJson(e.to_string())
            }
        })?;
        let Some(obj) = value.as_object() else {
            return Err(LoadProblem::NotAModeFile(
                "the top level is not an object".to_string(),
            ));
        };
        match obj.get("format") {
            None => return Err(LoadProblem::NotAModeFile("no \"format\" field".to_string())),
            Some(f) => match f.as_u64() {
                Some(MODE_FILE_FORMAT) => {}
                Some(found) => return Err(LoadProblem::UnsupportedFormat { found }),
                None => {
                    return Err(LoadProblem::NotAModeFile(
                        "\"format\" is not a number".to_string(),
                    ))
                }
            },
        }
        let repr: FileRepr =
            serde_json::from_value(value).map_err(|e| LoadProblem::NotAModeFile(e.to_string()))?;
        let computed =
            checksum(&repr.state).map_err(|e| LoadProblem::NotAModeFile(e.to_string()))?;
        if repr.sha256 != computed {
            return Err(LoadProblem::ChecksumMismatch {
                stored: truncate(&repr.sha256, 80).to_string(),
                computed,
            });
        }
        let canonical =
            ModeFile::encode(&repr.state).map_err(|e| LoadProblem::NotAModeFile(e.to_string()))?;
        if canonical != bytes {
            return Err(LoadProblem::NotCanonical);
        }
        Ok(repr.state)
    }

    /// Writes `state` to `path` atomically, with file mode 0600: a temporary file in the same
    /// directory is written and fsynced, renamed over `path`, and the directory is fsynced.
    /// On failure the previous file, if any, is left as it was.
    pub fn store(path: &Path, state: &ModeState) -> Result<(), ModeFileError> {
        let bytes = ModeFile::encode(state)?;
        if bytes.len() as u64 > MAX_MODE_FILE_LEN {
            return Err(ModeFileError::TooLarge {
                len: bytes.len() as u64,
                max: MAX_MODE_FILE_LEN,
            });
        }
        let Some(name) = path.file_name() else {
            return Err(ModeFileError::NoFileName(path.to_path_buf()));
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let io_err = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ModeFileError::Io { step, path, source }
        };

        // A fresh temporary file (create_new: never through an existing file or symlink).
        let (tmp, mut file) = {
            let mut attempt = 0;
            loop {
                let mut tmp_name = OsString::from(".");
                tmp_name.push(name);
                tmp_name.push(format!(
                    ".tmp-{}-{}",
                    std::process::id(),
                    TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
                ));
                let tmp = dir.join(tmp_name);
                match OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                {
                    Ok(f) => break (tmp, f),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => {
                        attempt += 1;
                    }
                    Err(e) => return Err(io_err("creating temporary file", &tmp)(e)),
                }
            }
        };
        let written = (|| {
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err("setting permissions of", &tmp))?;
            file.write_all(&bytes).map_err(io_err("writing", &tmp))?;
            file.sync_all().map_err(io_err("fsyncing", &tmp))?;
            drop(file);
            fs::rename(&tmp, path).map_err(io_err("renaming temporary file to", path))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsyncing directory", dir))
    }

    /// Reads the mode file. Never fails open: when the file is missing, unreadable, writable by
    /// group or others, or corrupt, the result is a LOCKDOWN state (set by `"startup"` at
    /// `now_ms`, wall-clock milliseconds) whose `reason` says what was wrong and how to recover,
    /// marked [`LoadedMode::FellBackToLockdown`] so that the caller logs it.
    ///
    /// A server being installed should therefore [`store`](ModeFile::store) its initial state
    /// before its first start.
    pub fn load(path: &Path, now_ms: u64) -> LoadedMode {
        match read_checked(path) {
            Ok(state) => LoadedMode::Stored(state),
            Err(problem) => {
                let reason = format!(
                    "mode file {} is {problem}; fell back to lockdown (fail closed). To recover: {RECOVERY_HINT}",
                    path.display()
                );
                LoadedMode::FellBackToLockdown {
                    state: ModeState::startup(Mode::Lockdown, now_ms, reason),
                    problem,
                }
            }
        }
    }
}

fn read_checked(path: &Path) -> Result<ModeState, LoadProblem> {
    let io_problem = |e: io::Error| {
        if e.kind() == io::ErrorKind::NotFound {
            LoadProblem::Missing
        } else {
            LoadProblem::Unreadable(e.to_string())
        }
    };
    // Look before opening: opening a FIFO for reading would block.
    let meta = fs::metadata(path).map_err(io_problem)?;
    if !meta.is_file() {
        return Err(LoadProblem::NotAFile);
    }
    let file = File::open(path).map_err(io_problem)?;
    let meta = file.metadata().map_err(io_problem)?;
    if !meta.is_file() {
        return Err(LoadProblem::NotAFile);
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(LoadProblem::InsecurePermissions { mode });
    }
    let mut bytes = Vec::new();
    file.take(MAX_MODE_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_problem)?;
    ModeFile::decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(caps: &[Capability]) -> Authority {
        Authority::Token {
            id: "ab12cd".to_string(),
            caps: CapabilitySet::new(caps.iter().copied()),
        }
    }

    fn system() -> Authority {
        Authority::System {
            source: "tripwire:handshake_failures_total".to_string(),
        }
    }

    fn req(target: Mode, by: Authority, confirm: bool) -> ModeRequest {
        ModeRequest {
            target,
            by,
            confirm,
            reason: "because".to_string(),
            now_ms: 5_000,
        }
    }

    fn state(mode: Mode, frozen: bool) -> ModeState {
        ModeState {
            mode,
            frozen,
            changed_at_ms: 1_000,
            changed_by: "startup".to_string(),
            reason: "initial".to_string(),
        }
    }

    #[test]
    fn modes_are_ordered_named_and_parsed() {
        assert!(Mode::Open < Mode::Restricted && Mode::Restricted < Mode::Lockdown);
        for m in Mode::ALL {
            assert_eq!(m.name().parse::<Mode>().unwrap(), m);
            assert_eq!(m.to_string(), m.name());
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.name())
            );
            assert_eq!(
                serde_json::from_str::<Mode>(&format!("\"{}\"", m.name())).unwrap(),
                m
            );
        }
        let err = "LOCKDOWN".parse::<Mode>().unwrap_err();
        assert_eq!(err, UnknownMode("LOCKDOWN".to_string()));
        assert!(err
            .to_string()
            .contains("known: open, restricted, lockdown"));
        assert!(serde_json::from_str::<Mode>("\"Open\"").is_err());
    }

    #[test]
    fn system_and_token_with_mode_set_may_escalate() {
        for by in [
            system(),
            token(&[Capability::ModeSet]),
            token(&[Capability::Admin]),
        ] {
            for (from, to) in [
                (Mode::Open, Mode::Restricted),
                (Mode::Open, Mode::Lockdown),
                (Mode::Restricted, Mode::Lockdown),
            ] {
                let t = state(from, false)
                    .apply(&req(to, by.clone(), false))
                    .unwrap();
                assert_eq!(t.change, Change::Escalated);
                assert_eq!(t.from, from);
                assert_eq!(t.state.mode, to);
                assert_eq!(t.state.changed_at_ms, 5_000);
                assert_eq!(t.state.changed_by, by.label());
                assert_eq!(t.state.reason, "because");
                assert!(t.changed());
            }
        }
        let t = state(Mode::Open, false)
            .apply(&req(Mode::Lockdown, token(&[Capability::ModeSet]), false))
            .unwrap();
        assert_eq!(t.state.changed_by, "token:ab12cd");
        let t = state(Mode::Open, false)
            .apply(&req(Mode::Lockdown, system(), false))
            .unwrap();
        assert_eq!(t.state.changed_by, "tripwire:handshake_failures_total");
    }

    #[test]
    fn token_without_mode_set_may_do_nothing() {
        for caps in [&[][..], &[Capability::Status], &[Capability::Reload]] {
            for from in Mode::ALL {
                for to in Mode::ALL {
                    let err = state(from, false)
                        .apply(&req(to, token(caps), true))
                        .unwrap_err();
                    assert_eq!(
                        err,
                        ModeError::MissingCapability {
                            token: "ab12cd".to_string()
                        }
                    );
                    assert!(err.to_string().contains("mode.set"));
                }
            }
        }
    }

    #[test]
    fn only_a_token_with_mode_set_may_de_escalate() {
        let err = state(Mode::Restricted, false)
            .apply(&req(Mode::Open, system(), true))
            .unwrap_err();
        assert!(matches!(err, ModeError::SystemCannotDeEscalate { .. }));
        assert!(err.to_string().contains("may only escalate"));
        for caps in [&[Capability::ModeSet][..], &[Capability::Admin]] {
            let t = state(Mode::Restricted, false)
                .apply(&req(Mode::Open, token(caps), false))
                .unwrap();
            assert_eq!(t.change, Change::DeEscalated);
            assert_eq!(t.state.mode, Mode::Open);
        }
    }

    #[test]
    fn leaving_lockdown_needs_confirmation() {
        for to in [Mode::Open, Mode::Restricted] {
            let err = state(Mode::Lockdown, false)
                .apply(&req(to, token(&[Capability::ModeSet]), false))
                .unwrap_err();
            assert_eq!(err, ModeError::ConfirmationRequired { to });
            assert!(err.to_string().contains("--confirm-leave-lockdown"));
            let t = state(Mode::Lockdown, false)
                .apply(&req(to, token(&[Capability::ModeSet]), true))
                .unwrap();
            assert_eq!(t.state.mode, to);
        }
        // Not needed when not leaving lockdown.
        assert!(state(Mode::Restricted, false)
            .apply(&req(Mode::Open, token(&[Capability::ModeSet]), false))
            .is_ok());
    }

    #[test]
    fn frozen_refuses_de_escalation_but_not_escalation() {
        let s = state(Mode::Lockdown, true);
        let err = s
            .apply(&req(Mode::Open, token(&[Capability::Admin]), true))
            .unwrap_err();
        assert_eq!(
            err,
            ModeError::Frozen {
                from: Mode::Lockdown,
                to: Mode::Open
            }
        );
        assert!(err.to_string().contains("an admin must unfreeze first"));
        let s = state(Mode::Restricted, true);
        assert!(matches!(
            s.apply(&req(Mode::Open, token(&[Capability::ModeSet]), true)),
            Err(ModeError::Frozen { .. })
        ));
        let t = s.apply(&req(Mode::Lockdown, system(), false)).unwrap();
        assert_eq!(t.state.mode, Mode::Lockdown);
        assert!(t.state.frozen, "escalation keeps the freeze");
    }

    #[test]
    fn same_mode_is_reported_unchanged() {
        for m in Mode::ALL {
            for by in [system(), token(&[Capability::ModeSet])] {
                let s = state(m, false);
                let t = s.apply(&req(m, by, false)).unwrap();
                assert_eq!(t.change, Change::Unchanged);
                assert!(!t.changed());
                assert_eq!(t.state, s);
            }
        }
    }

    #[test]
    fn freeze_and_unfreeze() {
        let s = state(Mode::Restricted, false);
        let t = s.freeze("tripwire:clock_jump", "wall clock jumped 3600000 ms", 7_000);
        assert_eq!(t.change, Change::Frozen);
        assert!(t.state.frozen);
        assert_eq!(t.state.mode, Mode::Restricted);
        assert_eq!(t.state.changed_by, "tripwire:clock_jump");
        let frozen = t.state;
        assert_eq!(
            frozen.freeze("tripwire:clock_jump", "again", 8_000).change,
            Change::Unchanged
        );

        let unfreeze = |by| UnfreezeRequest {
            by,
            reason: "clock checked".to_string(),
            now_ms: 9_000,
        };
        assert!(matches!(
            frozen.unfreeze(&unfreeze(system())),
            Err(ModeError::SystemCannotUnfreeze { .. })
        ));
        assert!(matches!(
            frozen.unfreeze(&unfreeze(token(&[Capability::Status]))),
            Err(ModeError::MissingCapability { .. })
        ));
        let t = frozen
            .unfreeze(&unfreeze(token(&[Capability::ModeSet])))
            .unwrap();
        assert_eq!(t.change, Change::Unfrozen);
        assert!(!t.state.frozen);
        assert_eq!(t.state.changed_by, "token:ab12cd");
        assert_eq!(t.state.changed_at_ms, 9_000);
        // Now de-escalation works again.
        assert!(t
            .state
            .apply(&req(Mode::Open, token(&[Capability::ModeSet]), false))
            .is_ok());
        // Unfreezing what is not frozen is no change.
        assert_eq!(
            t.state
                .unfreeze(&unfreeze(token(&[Capability::ModeSet])))
                .unwrap()
                .change,
            Change::Unchanged
        );
        // Freeze truncates an overlong reason.
        let long = "é".repeat(MAX_REASON_LEN);
        let t = s.freeze("tripwire:clock_jump", &long, 1);
        assert!(t.state.reason.len() <= MAX_REASON_LEN);
    }

    #[test]
    fn overlong_reason_is_refused() {
        let mut r = req(Mode::Lockdown, system(), false);
        r.reason = "x".repeat(MAX_REASON_LEN + 1);
        assert_eq!(
            state(Mode::Open, false).apply(&r).unwrap_err(),
            ModeError::ReasonTooLong {
                len: MAX_REASON_LEN + 1,
                max: MAX_REASON_LEN
            }
        );
        r.reason.pop();
        assert!(state(Mode::Open, false).apply(&r).is_ok());
    }

    // ----- persistence -----

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "halfpipe-control-{}-{name}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample() -> ModeState {
        ModeState {
            mode: Mode::Restricted,
            frozen: true,
            changed_at_ms: 1_700_000_000_123,
            changed_by: "token:ab12cd".to_string(),
            reason: "suspicious \"traffic\"\nfrom 203.0.113.7 — é".to_string(),
        }
    }

    fn assert_lockdown(loaded: &LoadedMode, needle: &str) {
        assert!(loaded.fell_back(), "{loaded:?}");
        let s = loaded.state();
        assert_eq!(s.mode, Mode::Lockdown);
        assert!(!s.frozen);
        assert_eq!(s.changed_by, "startup");
        assert_eq!(s.changed_at_ms, 42);
        assert!(s.reason.contains(needle), "{:?} lacks {needle:?}", s.reason);
        assert!(s.reason.contains(RECOVERY_HINT), "{:?}", s.reason);
        assert!(loaded.problem().is_some());
    }

    #[test]
    fn store_then_load_round_trips_with_mode_0600_and_no_leftovers() {
        let dir = TempDir::new("roundtrip");
        let path = dir.0.join("mode.json");
        ModeFile::store(&path, &sample()).unwrap();
        let loaded = ModeFile::load(&path, 42);
        assert_eq!(loaded, LoadedMode::Stored(sample()));
        assert!(!loaded.fell_back());
        assert_eq!(loaded.problem(), None);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Overwrite.
        let next = state(Mode::Open, false);
        ModeFile::store(&path, &next).unwrap();
        assert_eq!(ModeFile::load(&path, 42).into_state(), next);
        let names: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("mode.json")]);
        // Content is JSON with the checksum.
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\"format\":1,\"state\":{\"mode\":\"open\""));
        assert!(text.contains("\"sha256\":\""));
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn store_replaces_an_existing_file_with_loose_permissions() {
        let dir = TempDir::new("replace");
        let path = dir.0.join("mode.json");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        ModeFile::store(&path, &sample()).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(ModeFile::load(&path, 0).into_state(), sample());
    }

    #[test]
    fn store_errors_are_typed() {
        let dir = TempDir::new("storeerr");
        let err = ModeFile::store(&dir.0.join("no/such/dir/mode.json"), &sample()).unwrap_err();
        assert!(
            matches!(
                err,
                ModeFileError::Io {
                    step: "creating temporary file",
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            ModeFile::store(Path::new("/"), &sample()),
            Err(ModeFileError::NoFileName(_))
        ));
        let mut big = sample();
        big.reason = "x".repeat(MAX_MODE_FILE_LEN as usize);
        assert!(matches!(
            ModeFile::store(&dir.0.join("mode.json"), &big),
            Err(ModeFileError::TooLarge { .. })
        ));
        assert!(!dir.0.join("mode.json").exists());
    }

    #[test]
    fn missing_file_falls_back_to_lockdown() {
        let dir = TempDir::new("missing");
        let loaded = ModeFile::load(&dir.0.join("mode.json"), 42);
        assert_lockdown(&loaded, "missing");
        assert_eq!(loaded.problem(), Some(&LoadProblem::Missing));
        assert!(loaded.state().reason.contains("mode.json"));
    }

    #[test]
    fn empty_garbage_and_directory_fall_back_to_lockdown() {
        let dir = TempDir::new("garbage");
        let path = dir.0.join("mode.json");
        let write = |bytes: &[u8]| {
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(b"");
        let l = ModeFile::load(&path, 42);
        assert_lockdown(&l, "empty file");
        assert_eq!(l.problem(), Some(&LoadProblem::Empty));

        write(b"\x00\xff\xfegarbage");
        let l = ModeFile::load(&path, 42);
        assert_lockdown(&l, "not JSON");
        assert!(matches!(l.problem(), Some(LoadProblem::NotJson(_))));

        write(b"[1,2,3]");
        assert!(matches!(
            ModeFile::load(&path, 42).problem(),
            Some(LoadProblem::NotAModeFile(_))
        ));
        write(b"{\"format\":2,\"state\":{}}");
        let l = ModeFile::load(&path, 42);
        assert_lockdown(&l, "unsupported format 2");
        write(b"{\"format\":1,\"state\":{},\"sha256\":\"00\"}");
        assert_lockdown(&ModeFile::load(&path, 42), "not a mode file");

        write(&vec![b' '; MAX_MODE_FILE_LEN as usize + 10]);
        assert!(matches!(
            ModeFile::load(&path, 42).problem(),
            Some(LoadProblem::TooLarge { .. })
        ));

        let sub = dir.0.join("sub");
        fs::create_dir(&sub).unwrap();
        let l = ModeFile::load(&sub, 42);
        assert_lockdown(&l, "not a regular file");
    }

    #[test]
    fn writable_by_others_falls_back_to_lockdown() {
        let dir = TempDir::new("perms");
        let path = dir.0.join("mode.json");
        ModeFile::store(&path, &sample()).unwrap();
        for mode in [0o620, 0o602, 0o666] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let l = ModeFile::load(&path, 42);
            assert_lockdown(&l, "insecure");
            assert_eq!(
                l.problem(),
                Some(&LoadProblem::InsecurePermissions { mode })
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!ModeFile::load(&path, 42).fell_back());
    }

    #[test]
    fn checksum_mismatch_is_named() {
        let good = String::from_utf8(ModeFile::encode(&sample()).unwrap()).unwrap();
        let bad = good.replace("restricted", "open");
        let err = ModeFile::decode(bad.as_bytes()).unwrap_err();
        assert!(matches!(err, LoadProblem::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"));
        // Upper-case hex is the same number but not the canonical file.
        let i = good.find("\"sha256\":\"").unwrap() + 10;
        let mut upper = good.clone();
        upper.replace_range(i.., &good[i..].to_uppercase());
        assert!(ModeFile::decode(upper.as_bytes()).is_err());
        // Re-formatted JSON with a valid checksum is still refused.
        let v: serde_json::Value = serde_json::from_str(&good).unwrap();
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        assert_eq!(
            ModeFile::decode(&pretty).unwrap_err(),
            LoadProblem::NotCanonical
        );
    }

    #[test]
    fn every_truncation_falls_back_to_lockdown() {
        let dir = TempDir::new("truncate");
        let path = dir.0.join("mode.json");
        let good = ModeFile::encode(&sample()).unwrap();
        for len in 0..good.len() {
            fs::write(&path, &good[..len]).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let l = ModeFile::load(&path, 42);
            assert!(l.fell_back(), "prefix of {len} bytes accepted");
            assert_eq!(l.state().mode, Mode::Lockdown);
        }
        fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert_lockdown(&ModeFile::load(&path, 42), "truncated");
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let good = ModeFile::encode(&sample()).unwrap();
        assert_eq!(ModeFile::decode(&good).unwrap(), sample());
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    ModeFile::decode(&bad).is_err(),
                    "flipping bit {bit} of byte {i} went unnoticed"
                );
            }
        }
        // And through a real file.
        let dir = TempDir::new("flip");
        let path = dir.0.join("mode.json");
        let mut bad = good.clone();
        let i = bad.len() - 10;
        bad[i] ^= 0x01;
        fs::write(&path, &bad).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(ModeFile::load(&path, 42).state().mode, Mode::Lockdown);
    }
}
