//! A bounded cache of handshakes already seen, to refuse replays.
//!
//! A handshake is identified by its ephemeral public key (fresh for every honest attempt).
//! Entries live for twice the allowed clock skew: any older handshake is refused as stale by
//! its timestamp anyway. When the cache is full new handshakes are refused (fail closed)
//! rather than forgetting entries an attacker could then replay.

use std::collections::{HashMap, VecDeque};

/// Why a handshake was refused by the replay check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The timestamp is further from our clock than the allowed skew.
    #[error(
        "handshake timestamp is {skew_ms} ms away from the server clock (allowed {max_ms} ms)"
    )]
    Stale {
        /// Observed difference in milliseconds.
        skew_ms: u64,
        /// Allowed difference.
        max_ms: u64,
    },
    /// This exact handshake was already accepted.
    #[error("handshake replayed")]
    Replayed,
    /// Too many handshakes inside the window; refusing until entries expire.
    #[error("replay cache full ({0} entries); refusing handshakes until entries expire")]
    Full(usize),
}

/// The cache itself; time is passed in as Unix milliseconds.
pub struct ReplayCache {
    max_skew_ms: u64,
    capacity: usize,
    seen: HashMap<[u8; 32], u64>,
    order: VecDeque<([u8; 32], u64)>,
}

impl ReplayCache {
    /// A cache accepting timestamps within `max_skew_ms` and holding at most `capacity` entries.
    pub fn new(max_skew_ms: u64, capacity: usize) -> Self {
        Self {
            max_skew_ms,
            capacity,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Checks a handshake's timestamp and identity, and remembers it when accepted.
    pub fn check_and_insert(
        &mut self,
        id: [u8; 32],
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), ReplayError> {
        let skew_ms = now_ms.abs_diff(timestamp_ms);
        if skew_ms > self.max_skew_ms {
            return Err(ReplayError::Stale {
                skew_ms,
                max_ms: self.max_skew_ms,
            });
        }
        self.expire(now_ms);
        if self.seen.contains_key(&id) {
            return Err(ReplayError::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(ReplayError::Full(self.capacity));
        }
        let expiry = now_ms.saturating_add(2 * self.max_skew_ms);
        self.seen.insert(id, expiry);
        self.order.push_back((id, expiry));
        Ok(())
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some(&(id, expiry)) = self.order.front() {
            if expiry > now_ms {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&id) == Some(&expiry) {
                self.seen.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_stale_and_full_are_refused() {
        let mut c = ReplayCache::new(1_000, 2);
        assert_eq!(c.check_and_insert([1; 32], 10_000, 10_000), Ok(()));
        assert_eq!(
            c.check_and_insert([1; 32], 10_000, 10_001),
            Err(ReplayError::Replayed)
        );
        assert!(matches!(
            c.check_and_insert([2; 32], 8_000, 10_001),
            Err(ReplayError::Stale { skew_ms: 2_001, .. })
        ));
        assert!(matches!(
            c.check_and_insert([2; 32], 12_500, 10_001),
            Err(ReplayError::Stale { .. })
        ));
        assert_eq!(c.check_and_insert([2; 32], 10_001, 10_001), Ok(()));
        assert_eq!(
            c.check_and_insert([3; 32], 10_002, 10_002),
            Err(ReplayError::Full(2))
        );
        // After two skews the first entries expire, making room; a replay of them is
        // then refused as stale by its timestamp instead.
        assert_eq!(c.check_and_insert([3; 32], 12_002, 12_002), Ok(()));
        assert!(matches!(
            c.check_and_insert([1; 32], 10_000, 12_002),
            Err(ReplayError::Stale { .. })
        ));
        assert_eq!(c.len(), 1);
    }
}
