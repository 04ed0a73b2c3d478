//! [`KeyStore`]: the keys of one server (or client), sealed in one file.

use std::fmt;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::de::{Error as _, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::error::{KeyStoreError, Result};
use crate::format::{self, KdfParams, SealParams};
use crate::fsutil::{self, ReadOutcome};
use crate::key::{KeyAction, KeyEvent, KeyId, KeyInfo, KeyKind, KeyState};
use crate::sealer::Sealer;

/// The largest key store file read (16 MiB: some hundred thousand keys).
const MAX_STORE: usize = 16 << 20;
/// The payload layout version (inside the sealed body).
const PAYLOAD_VERSION: u32 = 1;
/// The longest label, in bytes.
const MAX_LABEL: usize = 64;

/// A 32-byte secret on the heap, wiped when dropped. Entries move only the pointer, so
/// growing or sorting the entry list leaves no stale copies of secrets behind.
struct Secret(Box<Zeroizing<[u8; 32]>>);

impl Secret {
    fn zeroed() -> Secret {
        Secret(Box::new(Zeroizing::new([0u8; 32])))
    }

    fn random() -> Result<Secret> {
        let mut s = Secret::zeroed();
        SystemRandom::new()
            .fill(&mut s.0[..])
            .map_err(|_| KeyStoreError::Random)?;
        Ok(s)
    }

    fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Clone for Secret {
    fn clone(&self) -> Secret {
        let mut s = Secret::zeroed();
        s.0.copy_from_slice(&self.0[..]);
        s
    }
}

/// Serialized as an array of 32 numbers: written straight into the zeroizing payload
/// buffer and read straight out of it, with no intermediate string.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(32)?;
        for b in self.0.iter() {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Secret, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Secret, A::Error> {
                let mut s = Secret::zeroed();
                for i in 0..32 {
                    s.0[i] = seq
                        .next_element::<u8>()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                Ok(s)
            }
        }
        d.deserialize_tuple(32, V)
    }
}

/// The last version handed out per kind (0: none yet).
#[derive(Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LastVersions {
    server_static: u32,
    user_static: u32,
    audit_signing: u32,
    token_pepper: u32,
    /// Absent in stores written before the kind existed.
    #[serde(default)]
    pre_shared_key: u32,
}

impl LastVersions {
    fn get(&self, kind: KeyKind) -> u32 {
        match kind {
            KeyKind::ServerStatic => self.server_static,
            KeyKind::UserStatic => self.user_static,
            KeyKind::AuditSigning => self.audit_signing,
            KeyKind::TokenPepper => self.token_pepper,
            KeyKind::PreSharedKey => self.pre_shared_key,
        }
    }

    fn slot(&mut self, kind: KeyKind) -> &mut u32 {
        match kind {
            KeyKind::ServerStatic => &mut self.server_static,
            KeyKind::UserStatic => &mut self.user_static,
            KeyKind::AuditSigning => &mut self.audit_signing,
            KeyKind::TokenPepper => &mut self.token_pepper,
            KeyKind::PreSharedKey => &mut self.pre_shared_key,
        }
    }
}

/// One key: metadata and, unless revoked, the secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: KeyId,
    kind: KeyKind,
    version: u32,
    created_ms: u64,
    state: KeyState,
    label: Option<String>,
    #[serde(with = "crate::key::hex32")]
    public: Option<[u8; 32]>,
    secret: Option<Secret>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .field("label", &self.label)
            .field(
                "secret",
                &if self.secret.is_some() {
                    "<redacted>"
                } else {
                    "<wiped>"
                },
            )
            .finish()
    }
}

impl Entry {
    fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            kind: self.kind,
            version: self.version,
            state: self.state,
            label: self.label.clone(),
            public: self.public,
            created_ms: self.created_ms,
        }
    }

    fn event(&self, action: KeyAction, at_ms: u64) -> KeyEvent {
        KeyEvent {
            action,
            id: self.id.clone(),
            kind: self.kind,
            at_ms,
            label: self.label.clone(),
            replaces: None,
            until_ms: None,
        }
    }

    fn revoke(&mut self, at_ms: u64) {
        self.state = KeyState::Revoked { at_ms };
        self.secret = None; // dropped: wiped
    }
}

/// Where a key kept outside the store lives, and the public key it must have: the store
/// vouches for it, so a key file swapped behind the operator's back is caught.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyReference {
    /// Where the key lives (a path, a credential name, …), as the caller names it.
    pub location: String,
    /// Its public key, if it has one.
    #[serde(with = "crate::key::hex32")]
    pub public: Option<[u8; 32]>,
    /// When the reference was recorded (the caller's clock, milliseconds).
    pub set_ms: u64,
}

/// Everything sealed in the file.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    payload_version: u32,
    created_ms: u64,
    last_version: LastVersions,
    entries: Vec<Entry>,
    /// Keys kept elsewhere, by name (absent in stores written before references existed).
    #[serde(default)]
    references: std::collections::BTreeMap<String, KeyReference>,
}

/// The public key of a secret: X25519 for static keys, Ed25519 for the audit signing
/// seed, none for the pepper.
fn public_of(kind: KeyKind, secret: &[u8; 32]) -> Option<[u8; 32]> {
    match kind {
        KeyKind::ServerStatic | KeyKind::UserStatic => {
            let s = x25519_dalek::StaticSecret::from(*secret);
            Some(x25519_dalek::PublicKey::from(&s).to_bytes())
        }
        KeyKind::AuditSigning => {
            let kp = Ed25519KeyPair::from_seed_unchecked(secret).ok()?;
            let mut p = [0u8; 32];
            p.copy_from_slice(kp.public_key().as_ref());
            Some(p)
        }
        KeyKind::TokenPepper | KeyKind::PreSharedKey => None,
    }
}

fn check_label(kind: KeyKind, label: Option<&str>) -> Result<Option<String>> {
    let Some(l) = label else {
        if kind == KeyKind::UserStatic {
            return Err(KeyStoreError::BadLabel(
                "a user-static key needs a label: the user name".into(),
            ));
        }
        return Ok(None);
    };
    if l.is_empty() || l.len() > MAX_LABEL {
        return Err(KeyStoreError::BadLabel(format!(
            "a label is 1 to {MAX_LABEL} bytes"
        )));
    }
    if l.chars().any(char::is_control) || l.trim() != l {
        return Err(KeyStoreError::BadLabel(
            "a label has no control characters and no leading or trailing spaces".into(),
        ));
    }
    Ok(Some(l.to_owned()))
}

impl Payload {
    fn find(&self, id: &KeyId) -> Result<usize> {
        self.entries
            .iter()
            .position(|e| &e.id == id)
            .ok_or_else(|| KeyStoreError::UnknownKey(id.clone()))
    }

    /// The active key that a new key of `kind` and `label` would compete with.
    fn active_slot(&self, kind: KeyKind, label: Option<&str>) -> Option<usize> {
        self.entries.iter().position(|e| {
            e.kind == kind
                && e.state == KeyState::Active
                && (kind.is_singleton() || e.label.as_deref() == label)
        })
    }

    /// Appends a fresh active key of `kind`, with the next version of that kind.
    fn push_new(&mut self, kind: KeyKind, label: Option<String>, now_ms: u64) -> Result<usize> {
        self.push(kind, label, Secret::random()?, now_ms)
    }

    /// Appends `secret` as the active key of `kind`, with the next version of that kind.
    fn push(
        &mut self,
        kind: KeyKind,
        label: Option<String>,
        secret: Secret,
        now_ms: u64,
    ) -> Result<usize> {
        let version = self
            .last_version
            .get(kind)
            .checked_add(1)
            .ok_or_else(|| KeyStoreError::BadKeyId(format!("no {kind} versions left")))?;
        let public = public_of(kind, secret.bytes());
        if public.is_none() && !matches!(kind, KeyKind::TokenPepper | KeyKind::PreSharedKey) {
            return Err(KeyStoreError::Random);
        }
        *self.last_version.slot(kind) = version;
        self.entries.push(Entry {
            id: KeyId::new(kind, version),
            kind,
            version,
            created_ms: now_ms,
            state: KeyState::Active,
            label,
            public,
            secret: Some(secret),
        });
        Ok(self.entries.len() - 1)
    }

    /// Everything a file written by this crate satisfies; anything else is refused.
    fn check(&self) -> std::result::Result<(), String> {
        if self.payload_version != PAYLOAD_VERSION {
            return Err(format!("payload version {}", self.payload_version));
        }
        let mut ids = std::collections::BTreeSet::new();
        let mut active = std::collections::BTreeSet::new();
        for e in &self.entries {
            if e.id != KeyId::new(e.kind, e.version) || e.version == 0 {
                return Err(format!(
                    "entry {} does not match its kind and version",
                    e.id
                ));
            }
            if !ids.insert(e.id.clone()) {
                return Err(format!("entry {} appears twice", e.id));
            }
            if e.version > self.last_version.get(e.kind) {
                return Err(format!("entry {} is newer than the last version", e.id));
            }
            if check_label(e.kind, e.label.as_deref()).is_err() {
                return Err(format!("entry {} has an invalid label", e.id));
            }
            match (&e.state, &e.secret) {
                (KeyState::Revoked { .. }, None) => {}
                (KeyState::Revoked { .. }, Some(_)) => {
                    return Err(format!("revoked entry {} still holds a secret", e.id))
                }
                (_, None) => return Err(format!("entry {} has no secret", e.id)),
                (_, Some(s)) => {
                    if public_of(e.kind, s.bytes()) != e.public {
                        return Err(format!("entry {} has a wrong public key", e.id));
                    }
                }
            }
            if e.state == KeyState::Active {
                let slot = if e.kind.is_singleton() {
                    (e.kind, None)
                } else {
                    (e.kind, e.label.clone())
                };
                if !active.insert(slot) {
                    return Err(format!("two active keys like {}", e.id));
                }
            }
        }
        Ok(())
    }
}

/// Grows by reallocating into a fresh zeroizing buffer, so serialising never leaves a
/// copy of the payload in freed memory.
struct ZeroizingWriter(Zeroizing<Vec<u8>>);

impl std::io::Write for ZeroizingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let need = self.0.len().saturating_add(buf.len());
        if need > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(2 * self.0.capacity())));
            bigger.extend_from_slice(&self.0);
            self.0 = bigger; // the old buffer is wiped as it drops
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The keys of one server (or client), sealed in one file.
///
/// Every key is held in a zeroizing heap buffer from unseal to drop. Nothing in the API
/// returns a secret: [`KeyStore::list`] and friends give [`KeyInfo`] (metadata and the
/// public key), and the secret is used in place through [`KeyStore::with_secret`],
/// [`KeyStore::sign_ed25519`] or — for the Noise library, which needs the bytes —
/// [`KeyStore::x25519_private_zeroizing`].
///
/// Every mutating operation is written to the file (atomically) before it returns; if
/// the write fails, the store in memory is left as it was and no event is recorded. On
/// success it records a [`KeyEvent`] for [`KeyStore::take_events`].
///
/// One process at a time: two processes that both change the same store would lose
/// one's changes (there is no file lock).
pub struct KeyStore {
    path: PathBuf,
    seal: SealParams,
    /// The Argon2id output or the raw key: kept so that saving needs neither the
    /// passphrase again nor another Argon2id run. Every save derives a fresh AES key from
    /// it (HKDF with a fresh salt).
    master: Zeroizing<[u8; 32]>,
    payload: Payload,
    events: Vec<KeyEvent>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .field("sealed_with", &self.seal.kind.name())
            .field("keys", &self.payload.entries)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// Creates a new, empty store at `path`, sealed by `sealer`, and writes it (mode 0600,
    /// atomically). Refuses to replace an existing file ([`KeyStoreError::Exists`]).
    ///
    /// `kdf` applies to a passphrase sealer (checked against the accepted ranges) and is
    /// ignored for the others. The Argon2id salt is chosen here, once, and kept for the
    /// life of the store. `now_ms` is the caller's clock.
    pub fn create(
        path: impl AsRef<Path>,
        sealer: &Sealer,
        kdf: KdfParams,
        now_ms: u64,
    ) -> Result<KeyStore> {
        let path = path.as_ref();
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(KeyStoreError::Exists {
                path: path.to_path_buf(),
            });
        }
        let seal = SealParams::new(sealer, kdf)?;
        let master = seal.master_key(sealer)?;
        let store = KeyStore {
            path: path.to_path_buf(),
            seal,
            master,
            payload: Payload {
                payload_version: PAYLOAD_VERSION,
                created_ms: now_ms,
                last_version: LastVersions::default(),
                entries: Vec::new(),
                references: Default::default(),
            },
            events: Vec::new(),
        };
        store.write(&store.payload, true)?;
        Ok(store)
    }

    /// Opens and unseals the store at `path`.
    ///
    /// All or nothing: either every key is unsealed, or an error is returned and
    /// everything decrypted so far is wiped. The errors a server writes to its audit log
    /// as an unseal failure: [`KeyStoreError::WrongKeyOrTampered`] (wrong passphrase or
    /// key, or any byte of the file changed), [`KeyStoreError::Truncated`],
    /// [`KeyStoreError::NotAKeyStore`], [`KeyStoreError::UnsupportedVersion`],
    /// [`KeyStoreError::Malformed`], [`KeyStoreError::ParamsOutOfRange`] (a header asking
    /// for absurd Argon2id costs, refused before running Argon2id),
    /// [`KeyStoreError::SealerMismatch`], [`KeyStoreError::Permissions`] (the file is
    /// accessible to group or others) and [`KeyStoreError::Io`].
    pub fn open(path: impl AsRef<Path>, sealer: &Sealer) -> Result<KeyStore> {
        let path = path.as_ref();
        let mut data = match fsutil::read_private(path, MAX_STORE)? {
            ReadOutcome::Data(d) => d,
            ReadOutcome::TooLarge(n) => {
                return Err(KeyStoreError::malformed(
                    path,
                    format!("{n} bytes, more than any key store ({MAX_STORE})"),
                ))
            }
        };
        let (seal, master, range) = format::unseal(path, &mut data, sealer)?;
        // The error is described by position only: serde's message could quote a value.
        let payload: Payload = serde_json::from_slice(&data[range]).map_err(|e| {
            KeyStoreError::malformed(
                path,
                format!(
                    "the sealed payload does not decode ({:?} error at line {} column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            )
        })?;
        drop(data);
        payload
            .check()
            .map_err(|what| KeyStoreError::malformed(path, format!("sealed payload: {what}")))?;
        Ok(KeyStore {
            path: path.to_path_buf(),
            seal,
            master,
            payload,
            events: Vec::new(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the store is sealed: `"passphrase"` or a raw key.
    pub fn sealed_with(&self) -> &'static str {
        self.seal.kind.name()
    }

    /// When the store was created (the caller's clock at [`KeyStore::create`]).
    pub fn created_ms(&self) -> u64 {
        self.payload.created_ms
    }

    /// Writes the store again (atomically, with a fresh HKDF salt and nonce). Mutating
    /// operations already save; this is for callers that want to re-seal explicitly.
    pub fn save(&self) -> Result<()> {
        self.write(&self.payload, false)
    }

    fn write(&self, payload: &Payload, no_replace: bool) -> Result<()> {
        let mut w = ZeroizingWriter(Zeroizing::new(Vec::with_capacity(
            512 + 320 * payload.entries.len(),
        )));
        serde_json::to_writer(&mut w, payload)
            .map_err(|_| KeyStoreError::malformed(&self.path, "the payload does not serialise"))?;
        let file = format::seal(&self.path, &self.seal, &self.master, &w.0)?;
        drop(w);
        fsutil::atomic_write(&self.path, &file, no_replace)
    }

    /// Applies `change` to a copy of the payload, saves the copy, and only then makes it
    /// the store's state and records the events.
    fn commit<R>(
        &mut self,
        change: impl FnOnce(&mut Payload) -> Result<(R, Vec<KeyEvent>)>,
    ) -> Result<R> {
        let mut next = self.payload.clone();
        let (r, events) = change(&mut next)?;
        self.write(&next, false)?;
        self.payload = next;
        self.events.extend(events);
        Ok(r)
    }

    /// Generates a new active key of `kind` (32 bytes from the system RNG) with the next
    /// version of that kind, saves, and records [`KeyAction::Created`].
    ///
    /// `label` is required for [`KeyKind::UserStatic`] (the user name) and optional for
    /// the others. Refuses ([`KeyStoreError::AlreadyActive`]) when a key of a singleton
    /// kind, or a user key with the same label, is already active: rotate that instead.
    pub fn generate(&mut self, kind: KeyKind, label: Option<&str>, now_ms: u64) -> Result<KeyInfo> {
        let label = check_label(kind, label)?;
        self.commit(|p| {
            if let Some(i) = p.active_slot(kind, label.as_deref()) {
                return Err(KeyStoreError::AlreadyActive {
                    id: p.entries[i].id.clone(),
                    kind,
                });
            }
            let i = p.push_new(kind, label, now_ms)?;
            let e = &p.entries[i];
            Ok((e.info(), vec![e.event(KeyAction::Created, now_ms)]))
        })
    }

    /// Seals `secret`, made elsewhere, as a new active key of `kind` (a client's user key
    /// and pre-shared key from a share link), with the next version of that kind; saves,
    /// and records [`KeyAction::Imported`]. The same rules as [`KeyStore::generate`]
    /// apply to `label` and to an already active key.
    pub fn import(
        &mut self,
        kind: KeyKind,
        label: Option<&str>,
        secret: &[u8; 32],
        now_ms: u64,
    ) -> Result<KeyInfo> {
        let label = check_label(kind, label)?;
        let mut sealed = Secret::zeroed();
        sealed.0.copy_from_slice(secret);
        self.commit(|p| {
            if let Some(i) = p.active_slot(kind, label.as_deref()) {
                return Err(KeyStoreError::AlreadyActive {
                    id: p.entries[i].id.clone(),
                    kind,
                });
            }
            let i = p.push(kind, label, sealed, now_ms)?;
            let e = &p.entries[i];
            Ok((e.info(), vec![e.event(KeyAction::Imported, now_ms)]))
        })
    }

    /// Records (or replaces) where the key called `name` lives outside the store and its
    /// public key, and saves. No event is recorded: the caller audits it.
    pub fn set_reference(
        &mut self,
        name: &str,
        location: &str,
        public: Option<[u8; 32]>,
        now_ms: u64,
    ) -> Result<()> {
        check_label(KeyKind::UserStatic, Some(name))?;
        let reference = KeyReference {
            location: location.to_owned(),
            public,
            set_ms: now_ms,
        };
        self.commit(|p| {
            p.references.insert(name.to_owned(), reference);
            Ok(((), Vec::new()))
        })
    }

    /// The reference recorded under `name`, if any.
    pub fn reference(&self, name: &str) -> Option<&KeyReference> {
        self.payload.references.get(name)
    }

    /// Rotates the active key of a singleton kind (server static, audit signing, token
    /// pepper): a new key becomes active, and the old one is retiring — still accepted —
    /// until `now_ms + overlap_ms`. Saves, and records [`KeyAction::Rotated`].
    ///
    /// Returns (old key, now retiring; new key, active). User keys are rotated one by one
    /// with [`KeyStore::rotate_key`].
    pub fn rotate(
        &mut self,
        kind: KeyKind,
        overlap_ms: u64,
        now_ms: u64,
    ) -> Result<(KeyInfo, KeyInfo)> {
        if !kind.is_singleton() {
            return Err(KeyStoreError::BadLabel(
                "user keys are rotated one by one: rotate_key with the user's key id".into(),
            ));
        }
        let Some(i) = self.payload.active_slot(kind, None) else {
            return Err(KeyStoreError::NoActiveKey { kind, label: None });
        };
        let id = self.payload.entries[i].id.clone();
        self.rotate_key(&id, overlap_ms, now_ms)
    }

    /// Rotates the active key `id` (of any kind): a new key of the same kind and label
    /// becomes active, `id` is retiring until `now_ms + overlap_ms` (an overlap of 0 ends
    /// its window at once). Saves, and records [`KeyAction::Rotated`].
    pub fn rotate_key(
        &mut self,
        id: &KeyId,
        overlap_ms: u64,
        now_ms: u64,
    ) -> Result<(KeyInfo, KeyInfo)> {
        self.commit(|p| {
            let old = p.find(id)?;
            match p.entries[old].state {
                KeyState::Active => {}
                KeyState::Revoked { .. } => return Err(KeyStoreError::KeyRevoked(id.clone())),
                KeyState::Retiring { .. } => return Err(KeyStoreError::NotActive(id.clone())),
            }
            let until_ms = now_ms.saturating_add(overlap_ms);
            p.entries[old].state = KeyState::Retiring { until_ms };
            let (kind, label) = (p.entries[old].kind, p.entries[old].label.clone());
            let new = p.push_new(kind, label, now_ms)?;
            let mut ev = p.entries[new].event(KeyAction::Rotated, now_ms);
            ev.replaces = Some(id.clone());
            ev.until_ms = Some(until_ms);
            Ok(((p.entries[old].info(), p.entries[new].info()), vec![ev]))
        })
    }

    /// Revokes `id` (active or retiring) at once: its secret is wiped, its metadata kept so
    /// the id is never reused. Saves, and records [`KeyAction::Revoked`]. Revoking a
    /// revoked key is [`KeyStoreError::KeyRevoked`].
    pub fn revoke(&mut self, id: &KeyId, now_ms: u64) -> Result<KeyInfo> {
        self.commit(|p| {
            let i = p.find(id)?;
            let e = &mut p.entries[i];
            if let KeyState::Revoked { .. } = e.state {
                return Err(KeyStoreError::KeyRevoked(id.clone()));
            }
            e.revoke(now_ms);
            Ok((e.info(), vec![e.event(KeyAction::Revoked, now_ms)]))
        })
    }

    /// Revokes every retiring key whose window has ended (`until_ms <= now_ms`), wiping
    /// its secret; records [`KeyAction::Expired`] for each. Saves only when something
    /// expired. Returns the keys it revoked. Call it periodically (and at start).
    pub fn expire_retired(&mut self, now_ms: u64) -> Result<Vec<KeyInfo>> {
        let due =
            |e: &Entry| matches!(e.state, KeyState::Retiring { until_ms } if until_ms <= now_ms);
        if !self.payload.entries.iter().any(due) {
            return Ok(Vec::new());
        }
        self.commit(|p| {
            let mut infos = Vec::new();
            let mut events = Vec::new();
            for e in p.entries.iter_mut().filter(|e| due(e)) {
                e.revoke(now_ms);
                infos.push(e.info());
                events.push(e.event(KeyAction::Expired, now_ms));
            }
            Ok((infos, events))
        })
    }

    /// Every key, revoked ones included, oldest first: metadata only.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.payload.entries.iter().map(Entry::info).collect()
    }

    /// The key `id`: metadata only.
    pub fn info(&self, id: &KeyId) -> Result<KeyInfo> {
        Ok(self.payload.entries[self.payload.find(id)?].info())
    }

    /// The active key of `kind` (for [`KeyKind::UserStatic`], the newest active one of
    /// any user: use [`KeyStore::active_labelled`]).
    pub fn active(&self, kind: KeyKind) -> Option<KeyInfo> {
        self.payload
            .entries
            .iter()
            .rev()
            .find(|e| e.kind == kind && e.state == KeyState::Active)
            .map(Entry::info)
    }

    /// The active key of `kind` with label `label` (a user's key).
    pub fn active_labelled(&self, kind: KeyKind, label: &str) -> Option<KeyInfo> {
        self.payload
            .entries
            .iter()
            .rev()
            .find(|e| {
                e.kind == kind && e.state == KeyState::Active && e.label.as_deref() == Some(label)
            })
            .map(Entry::info)
    }

    /// The keys of `kind` accepted at `now_ms`: the active one(s) first, then those
    /// retiring whose window has not ended, newest first. A server tries them in this
    /// order (e.g. verifying a token against every accepted pepper).
    pub fn accepting(&self, kind: KeyKind, now_ms: u64) -> Vec<KeyInfo> {
        let mut v: Vec<KeyInfo> = self
            .payload
            .entries
            .iter()
            .rev()
            .filter(|e| e.kind == kind)
            .map(Entry::info)
            .filter(|i| i.is_accepting(now_ms))
            .collect();
        v.sort_by_key(|i| !matches!(i.state, KeyState::Active));
        v
    }

    fn secret(&self, id: &KeyId) -> Result<(&Entry, &Secret)> {
        let e = &self.payload.entries[self.payload.find(id)?];
        match &e.secret {
            Some(s) => Ok((e, s)),
            None => Err(KeyStoreError::KeyRevoked(id.clone())),
        }
    }

    /// Runs `f` with the secret of `id` (active or retiring) in place, and returns what
    /// `f` returns.
    ///
    /// The reference is valid only during the call. `f` must not copy the bytes out,
    /// except into a zeroizing buffer that a cryptographic library needs (for example
    /// `ed25519_dalek::SigningKey::from_bytes`, which wipes itself, or the pepper of an
    /// HMAC key); and must never return, log or print them. A revoked key is
    /// [`KeyStoreError::KeyRevoked`].
    pub fn with_secret<R>(&self, id: &KeyId, f: impl FnOnce(&[u8; 32]) -> R) -> Result<R> {
        let (_, s) = self.secret(id)?;
        Ok(f(s.bytes()))
    }

    /// The X25519 private key `id` (server or user static) as a zeroizing byte buffer, for
    /// the Noise library.
    ///
    /// This exists because `snow`'s `Builder::local_private_key` takes the private key as
    /// a byte slice and copies it into its own state: there is no way to give it a key
    /// "in place". The buffer is wiped when dropped; hand it to the builder and drop it
    /// right after. It is not an export: do nothing else with it. Other kinds are
    /// [`KeyStoreError::WrongKind`].
    pub fn x25519_private_zeroizing(&self, id: &KeyId) -> Result<Zeroizing<Vec<u8>>> {
        let (e, s) = self.secret(id)?;
        if !e.kind.is_x25519() {
            return Err(KeyStoreError::WrongKind {
                id: id.clone(),
                kind: e.kind,
                expected: "server-static or user-static",
            });
        }
        let mut v = Zeroizing::new(Vec::with_capacity(32));
        v.extend_from_slice(s.bytes());
        Ok(v)
    }

    /// Signs `msg` with the audit signing key `id` (Ed25519, RFC 8032: the signatures
    /// verify with the public key in its [`KeyInfo`], as `ed25519-dalek` checks them).
    /// Other kinds are [`KeyStoreError::WrongKind`].
    pub fn sign_ed25519(&self, id: &KeyId, msg: &[u8]) -> Result<[u8; 64]> {
        let (e, s) = self.secret(id)?;
        if e.kind != KeyKind::AuditSigning {
            return Err(KeyStoreError::WrongKind {
                id: id.clone(),
                kind: e.kind,
                expected: "audit-signing",
            });
        }
        let kp =
            Ed25519KeyPair::from_seed_unchecked(s.bytes()).map_err(|_| KeyStoreError::Random)?;
        let mut sig = [0u8; 64];
        sig.copy_from_slice(kp.sign(msg).as_ref());
        Ok(sig)
    }

    /// The key events recorded since the last call, oldest first, for the caller's audit
    /// log.
    pub fn take_events(&mut self) -> Vec<KeyEvent> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_json_is_numbers_and_round_trips() {
        let s = Secret::random().unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.starts_with('[') && j.ends_with(']'));
        let back: Secret = serde_json::from_str(&j).unwrap();
        assert_eq!(back.bytes(), s.bytes());
        assert!(serde_json::from_str::<Secret>("[1,2,3]").is_err());
        let long = format!("[{}]", vec!["1"; 33].join(","));
        assert!(serde_json::from_str::<Secret>(&long).is_err());
    }

    #[test]
    fn a_payload_from_before_references_and_pre_shared_keys_still_decodes() {
        let old = r#"{"payload_version":1,"created_ms":5,"last_version":{"server_static":0,"user_static":0,"audit_signing":0,"token_pepper":0},"entries":[]}"#;
        let p: Payload = serde_json::from_str(old).unwrap();
        assert!(p.check().is_ok());
        assert!(p.references.is_empty());
        assert_eq!(p.last_version.get(KeyKind::PreSharedKey), 0);
    }

    #[test]
    fn inconsistent_payloads_are_refused() {
        let fresh = || {
            let mut p = Payload {
                payload_version: PAYLOAD_VERSION,
                created_ms: 0,
                last_version: LastVersions::default(),
                entries: Vec::new(),
                references: Default::default(),
            };
            p.push_new(KeyKind::ServerStatic, None, 1).unwrap();
            p.push_new(KeyKind::UserStatic, Some("alice".into()), 1)
                .unwrap();
            p.push_new(KeyKind::TokenPepper, None, 1).unwrap();
            p
        };
        assert!(fresh().check().is_ok());
        type Breaker = fn(&mut Payload);
        let breakers: [(&str, Breaker); 10] = [
            ("version", |p| p.payload_version = 2),
            ("revoked with secret", |p| {
                p.entries[0].state = KeyState::Revoked { at_ms: 1 }
            }),
            ("live without secret", |p| p.entries[0].secret = None),
            ("wrong public", |p| p.entries[0].public = Some([0; 32])),
            ("pepper with public", |p| {
                p.entries[2].public = Some([0; 32])
            }),
            ("id mismatch", |p| p.entries[0].version = 2),
            ("beyond last version", |p| p.last_version.server_static = 0),
            ("duplicate", |p| {
                let e = p.entries[0].clone();
                p.entries.push(e)
            }),
            ("user without label", |p| p.entries[1].label = None),
            ("two active", |p| {
                p.push_new(KeyKind::TokenPepper, None, 2).unwrap();
            }),
        ];
        for (what, f) in breakers {
            let mut p = fresh();
            f(&mut p);
            assert!(p.check().is_err(), "{what}");
        }
        // Serialised and parsed back, a payload is the same.
        let p = fresh();
        let j = serde_json::to_vec(&p).unwrap();
        let back: Payload = serde_json::from_slice(&j).unwrap();
        assert!(back.check().is_ok());
        assert_eq!(serde_json::to_vec(&back).unwrap(), j);
        let mut unknown: serde_json::Value = serde_json::from_slice(&j).unwrap();
        unknown["extra"] = serde_json::Value::Bool(true);
        assert!(serde_json::from_value::<Payload>(unknown).is_err());
    }

    #[test]
    fn public_keys_match_references() {
        // RFC 7748 section 6.1 (Alice) and RFC 8032 section 7.1 test 1.
        let mut x = [0u8; 32];
        hex::decode_to_slice(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
            &mut x,
        )
        .unwrap();
        assert_eq!(
            hex::encode(public_of(KeyKind::ServerStatic, &x).unwrap()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        let mut seed = [0u8; 32];
        hex::decode_to_slice(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            &mut seed,
        )
        .unwrap();
        assert_eq!(
            hex::encode(public_of(KeyKind::AuditSigning, &seed).unwrap()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        assert_eq!(public_of(KeyKind::TokenPepper, &seed), None);
    }
}
