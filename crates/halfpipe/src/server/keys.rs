//! The exit's static keys during a rotation: the active key, the retiring ones still
//! accepted (their clients are told the new key), and retired ones kept only to tell a
//! late client that the key changed.

use std::path::PathBuf;
use std::time::Duration;

use halfpipe_core::handshake::{public_key_of, HandshakeError, HandshakeKeys};
use halfpipe_core::record::CipherSuite;
use halfpipe_keystore::{KeyKind, KeyState, KeyStore, KeyStoreError, Sealer};
use zeroize::Zeroizing;

/// How long a retired key (past its overlap window) is kept to tell late clients that the
/// key changed, before the store wipes it.
pub const RETIRED_KEPT: Duration = Duration::from_secs(90 * 24 * 3600);

/// Where the exit's static key comes from.
pub enum KeySource {
    /// A key file (no rotation).
    File(HandshakeKeys),
    /// The sealed key store (rotation with an overlap window).
    Store(KeystoreSettings),
}

/// `[keystore]`: the sealed key store holding the exit's static keys.
#[derive(Clone)]
pub struct KeystoreSettings {
    /// The store file.
    pub file: PathBuf,
    /// How it is sealed (`keyfile:PATH`, `passphrase-env:VAR`, `env:VAR`,
    /// `credential:NAME`); parsed when the store is opened.
    pub sealer: String,
    /// The cipher for handshakes and records.
    pub suite: CipherSuite,
    /// The optional pre-shared key.
    pub psk: Option<Zeroizing<[u8; 32]>>,
    /// How long a rotated-out key is still accepted.
    pub overlap: Duration,
    /// Rotate by itself when the active key is this old.
    pub rotate_every: Option<Duration>,
}

impl KeystoreSettings {
    /// Opens (unseals) the store.
    pub fn open(&self) -> Result<KeyStore, KeyStoreError> {
        KeyStore::open(&self.file, &Sealer::from_spec(&self.sealer)?)
    }

    /// Creates the store with a first server key (`server init`); returns the store and
    /// the key's public half. A `keyfile:` sealer whose file does not exist yet gets a
    /// fresh random key file.
    pub fn create(&self, now_ms: u64) -> Result<(KeyStore, [u8; 32]), KeyStoreError> {
        if let Some(path) = self.sealer.strip_prefix("keyfile:") {
            let path = std::path::Path::new(path);
            if !path.exists() {
                halfpipe_keystore::create_key_file(path)?;
            }
        }
        let sealer = Sealer::from_spec(&self.sealer)?;
        let mut store = KeyStore::create(&self.file, &sealer, Default::default(), now_ms)?;
        let info = store.generate(KeyKind::ServerStatic, None, now_ms)?;
        let public = info.public.ok_or(KeyStoreError::NoActiveKey {
            kind: KeyKind::ServerStatic,
            label: None,
        })?;
        Ok((store, public))
    }
}

/// Why the store's keys could not become handshake keys.
#[derive(Debug, thiserror::Error)]
pub enum StoreKeysError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] KeyStoreError),
    /// The store holds no active server key.
    #[error("the key store holds no active server key (run 'halfpipe server init' or 'halfpipe ctl keys rotate')")]
    NoActiveKey,
    /// A key could not be used.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// How a handshake's server key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// The active key.
    Active,
    /// A retiring key inside its overlap window: accept, and announce this new key.
    Overlap([u8; 32]),
    /// A key past its window: refuse with "server key changed; get a new link".
    Retired,
}

/// The keys an exit answers to.
#[derive(Clone)]
pub struct ServerKeys {
    /// The key new clients dial.
    pub active: HandshakeKeys,
    /// Its public half.
    pub active_public: [u8; 32],
    /// Keys being rotated out, each accepted until its wall-clock deadline (Unix ms).
    pub retiring: Vec<(HandshakeKeys, u64)>,
    /// Keys past their window, kept to answer their clients precisely.
    pub retired: Vec<HandshakeKeys>,
}

impl ServerKeys {
    /// Only `active` (no rotation under way).
    pub fn single(active: HandshakeKeys) -> Result<Self, HandshakeError> {
        Ok(Self {
            active_public: public_key_of(&active.private_key)?,
            active,
            retiring: Vec::new(),
            retired: Vec::new(),
        })
    }

    /// The active key, the retiring ones inside their window and those past it (kept to
    /// answer their clients), from the store, at wall time `now_ms`.
    pub fn from_store(
        store: &KeyStore,
        suite: CipherSuite,
        psk: Option<Zeroizing<[u8; 32]>>,
        now_ms: u64,
    ) -> Result<Self, StoreKeysError> {
        let handshake = |id: &halfpipe_keystore::KeyId| -> Result<HandshakeKeys, StoreKeysError> {
            let private_key = store.with_secret(id, |s| Zeroizing::new(*s))?;
            Ok(HandshakeKeys {
                suite,
                private_key,
                psk: psk.clone(),
            })
        };
        let active = store
            .active(KeyKind::ServerStatic)
            .ok_or(StoreKeysError::NoActiveKey)?;
        let mut keys = Self::single(handshake(&active.id)?)?;
        for k in store.list() {
            if k.kind != KeyKind::ServerStatic {
                continue;
            }
            if let KeyState::Retiring { until_ms } = k.state {
                if now_ms < until_ms {
                    keys.retiring.push((handshake(&k.id)?, until_ms));
                } else {
                    keys.retired.push(handshake(&k.id)?);
                }
            }
        }
        Ok(keys)
    }

    /// Every key a handshake may be addressed to, in the order to try them.
    pub fn candidates(&self) -> Vec<&HandshakeKeys> {
        std::iter::once(&self.active)
            .chain(self.retiring.iter().map(|(k, _)| k))
            .chain(self.retired.iter())
            .collect()
    }

    /// What the key at `index` of [`ServerKeys::candidates`] allows at wall time `now_ms`.
    pub fn classify(&self, index: usize, now_ms: u64) -> KeyUse {
        match index {
            0 => KeyUse::Active,
            i if i <= self.retiring.len() => {
                if now_ms < self.retiring[i - 1].1 {
                    KeyUse::Overlap(self.active_public)
                } else {
                    KeyUse::Retired
                }
            }
            _ => KeyUse::Retired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halfpipe_core::handshake::generate_keypair;
    use halfpipe_core::record::CipherSuite;

    fn key() -> HandshakeKeys {
        HandshakeKeys {
            suite: CipherSuite::Aes256Gcm,
            private_key: generate_keypair().unwrap().0,
            psk: None,
        }
    }

    #[test]
    fn retiring_keys_overlap_until_their_deadline_then_are_retired() {
        let mut k = ServerKeys::single(key()).unwrap();
        k.retiring.push((key(), 1_000));
        k.retired.push(key());
        assert_eq!(k.candidates().len(), 3);
        assert_eq!(k.classify(0, 5_000), KeyUse::Active);
        assert_eq!(k.classify(1, 999), KeyUse::Overlap(k.active_public));
        assert_eq!(k.classify(1, 1_000), KeyUse::Retired);
        assert_eq!(k.classify(2, 0), KeyUse::Retired);
    }
}
