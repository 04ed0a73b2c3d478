//! The exit's static keys during a rotation: the active key, the retiring ones still
//! accepted (their clients are told the new key), and retired ones kept only to tell a
//! late client that the key changed.

use halfpipe_core::handshake::{public_key_of, HandshakeError, HandshakeKeys};

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
