//! The per-leg record layer: `[length u32 BE][AEAD ciphertext][16-byte tag]`.
//!
//! Each leg carries records in one direction only, under a key from that leg's Noise
//! handshake. Nonces are an explicit per-key counter (never random, never reused: the
//! counter is refused past 2^64-1); the 4-byte length header is bound as associated data,
//! so a record cannot be cut, grown or moved without the tag failing.
//!
//! A *channel-bound* leg ([`RecordSealer::bound`]) carries `[length u32 BE][plaintext]`
//! instead: its transport is TLS 1.3 end to end between client and exit, proven in the
//! Noise handshake by both ends holding the same TLS exporter value (see
//! [`crate::handshake::ChannelBinding`]), so TLS's own AEAD already protects every record
//! and a second pass would only cost CPU.

use bytes::{Bytes, BytesMut};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::frame::MAX_RECORD_PAYLOAD;

/// Length of the record header.
pub const HEADER_LEN: usize = 4;
/// Length of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// The largest value the length header may carry (payload plus tag).
pub const MAX_RECORD_BODY: usize = MAX_RECORD_PAYLOAD + TAG_LEN;

/// The AEAD used for records (and named in the Noise pattern).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CipherSuite {
    /// AES-256-GCM: the default, fastest where AES instructions exist.
    #[default]
    Aes256Gcm,
    /// ChaCha20-Poly1305: for machines without AES instructions.
    ChaCha20Poly1305,
}

impl CipherSuite {
    /// The wire value sent before the first handshake message.
    pub fn id(self) -> u8 {
        match self {
            CipherSuite::Aes256Gcm => 1,
            CipherSuite::ChaCha20Poly1305 => 2,
        }
    }

    /// Decodes a wire value.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(CipherSuite::Aes256Gcm),
            2 => Some(CipherSuite::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// The name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            CipherSuite::Aes256Gcm => "aes-256-gcm",
            CipherSuite::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            CipherSuite::Aes256Gcm => &aead::AES_256_GCM,
            CipherSuite::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// A record that could not be opened or sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The length header exceeds [`MAX_RECORD_BODY`] or is shorter than a tag (on a
    /// channel-bound leg: exceeds [`MAX_RECORD_PAYLOAD`]).
    #[error("record length {0} is outside this leg's bounds (sealed 16..={max}, channel-bound 0..={plain})", max = MAX_RECORD_BODY, plain = MAX_RECORD_PAYLOAD)]
    BadLength(usize),
    /// The tag did not verify: tampering, truncation, or the wrong key.
    #[error("record failed authentication")]
    BadTag,
    /// The nonce counter is exhausted; the leg must be replaced.
    #[error("record counter exhausted; the leg must be re-keyed")]
    CounterExhausted,
    /// The key material was rejected by the AEAD.
    #[error("invalid record key")]
    BadKey,
}

struct Keyed {
    key: LessSafeKey,
    counter: u64,
}

impl Keyed {
    fn new(suite: CipherSuite, key: &[u8; 32]) -> Result<Self, RecordError> {
        let unbound = UnboundKey::new(suite.algorithm(), key).map_err(|_| RecordError::BadKey)?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            counter: 0,
        })
    }

    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let n = self.counter;
        self.counter = n.checked_add(1).ok_or(RecordError::CounterExhausted)?;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// How a leg's records are protected.
enum Protection {
    /// AEAD under the leg's Noise key (boxed: the expanded AES key is large).
    Sealed(Box<Keyed>),
    /// In the clear inside a channel-bound TLS 1.3 transport.
    Bound,
}

impl Protection {
    fn tag_len(&self) -> usize {
        match self {
            Protection::Sealed(_) => TAG_LEN,
            Protection::Bound => 0,
        }
    }

    /// The body length a header may announce.
    fn check_body_len(&self, len: usize) -> Result<usize, RecordError> {
        let ok = match self {
            Protection::Sealed(_) => (TAG_LEN..=MAX_RECORD_BODY).contains(&len),
            Protection::Bound => len <= MAX_RECORD_PAYLOAD,
        };
        ok.then_some(len).ok_or(RecordError::BadLength(len))
    }
}

/// Seals records for the sending end of a leg.
pub struct RecordSealer(Protection);

impl RecordSealer {
    /// A sealer with nonce counter 0.
    pub fn new(suite: CipherSuite, key: &[u8; 32]) -> Result<Self, RecordError> {
        Keyed::new(suite, key).map(|k| Self(Protection::Sealed(Box::new(k))))
    }

    /// A sealer for a channel-bound leg: records carry their plaintext, no tag.
    pub fn bound() -> Self {
        Self(Protection::Bound)
    }

    /// Whether this leg's records travel without their own AEAD (channel-bound).
    pub fn is_bound(&self) -> bool {
        matches!(self.0, Protection::Bound)
    }

    /// Reserves a header at the end of `out` and returns where this record starts; append
    /// the plaintext after it, then call [`RecordSealer::seal`] with the same start.
    pub fn begin(out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        start
    }

    /// Encrypts `out[start + HEADER_LEN..]` in place, appends the tag and fills the header.
    pub fn seal(&mut self, out: &mut Vec<u8>, start: usize) -> Result<(), RecordError> {
        self.reserve_tag(out);
        self.seal_reserved(&mut out[start..])
    }

    /// Appends room for the tag (none on a channel-bound leg) after a record's plaintext,
    /// so that the record can be sealed later with [`RecordSealer::seal_reserved`] without
    /// moving bytes.
    pub fn reserve_tag(&self, out: &mut Vec<u8>) {
        out.resize(out.len() + self.0.tag_len(), 0);
    }

    /// Seals one record laid out as `[header][plaintext][tag room]`, in place.
    pub fn seal_reserved(&mut self, record: &mut [u8]) -> Result<(), RecordError> {
        let body_len = record.len() - HEADER_LEN;
        self.0.check_body_len(body_len)?;
        let header = (body_len as u32).to_be_bytes();
        record[..HEADER_LEN].copy_from_slice(&header);
        let Protection::Sealed(keyed) = &mut self.0 else {
            return Ok(());
        };
        let nonce = keyed.next_nonce()?;
        let (plain, tag_room) = record[HEADER_LEN..].split_at_mut(body_len - TAG_LEN);
        let tag = keyed
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), plain)
            .map_err(|_| RecordError::BadKey)?;
        tag_room.copy_from_slice(tag.as_ref());
        Ok(())
    }
}

/// Opens records at the receiving end of a leg.
pub struct RecordOpener(Protection);

impl RecordOpener {
    /// An opener expecting nonce counter 0 first.
    pub fn new(suite: CipherSuite, key: &[u8; 32]) -> Result<Self, RecordError> {
        Keyed::new(suite, key).map(|k| Self(Protection::Sealed(Box::new(k))))
    }

    /// An opener for a channel-bound leg: records carry their plaintext, no tag.
    pub fn bound() -> Self {
        Self(Protection::Bound)
    }

    /// Whether this leg's records travel without their own AEAD (channel-bound).
    pub fn is_bound(&self) -> bool {
        matches!(self.0, Protection::Bound)
    }

    /// If `buf` starts with a whole record, splits it off, decrypts it in place and returns
    /// the plaintext; `Ok(None)` when more bytes are needed.
    pub fn open_next(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, RecordError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let body_len = self.0.check_body_len(header_value(&buf[..HEADER_LEN]))?;
        if buf.len() < HEADER_LEN + body_len {
            buf.reserve(HEADER_LEN + body_len - buf.len());
            return Ok(None);
        }
        let mut record = buf.split_to(HEADER_LEN + body_len);
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&record[..HEADER_LEN]);
        let Protection::Sealed(keyed) = &mut self.0 else {
            let _ = record.split_to(HEADER_LEN);
            return Ok(Some(record.freeze()));
        };
        let nonce = keyed.next_nonce()?;
        let plain_len = keyed
            .key
            .open_in_place(nonce, Aad::from(header), &mut record[HEADER_LEN..])
            .map_err(|_| RecordError::BadTag)?
            .len();
        let _ = record.split_to(HEADER_LEN);
        record.truncate(plain_len);
        Ok(Some(record.freeze()))
    }
}

/// The body length a record header announces, unchecked.
fn header_value(header: &[u8]) -> usize {
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&header[..HEADER_LEN]);
    u32::from_be_bytes(h) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(suite: CipherSuite) -> (RecordSealer, RecordOpener) {
        let key = [7u8; 32];
        (
            RecordSealer::new(suite, &key).unwrap(),
            RecordOpener::new(suite, &key).unwrap(),
        )
    }

    /// Feeds `wire` one byte at a time: records must come out whole and in order.
    fn open_bytewise(o: &mut RecordOpener, wire: Vec<u8>) -> Vec<Bytes> {
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.extend_from_slice(&[b]);
            while let Some(p) = o.open_next(&mut buf).unwrap() {
                got.push(p);
            }
        }
        got
    }

    fn seal(s: &mut RecordSealer, out: &mut Vec<u8>, plain: &[u8]) {
        let start = RecordSealer::begin(out);
        out.extend_from_slice(plain);
        s.seal(out, start).unwrap();
    }

    #[test]
    fn records_roundtrip_in_both_suites_and_split_reads() {
        for suite in [CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305] {
            let (mut s, mut o) = pair(suite);
            let mut wire = Vec::new();
            seal(&mut s, &mut wire, b"first");
            seal(&mut s, &mut wire, b"");
            seal(&mut s, &mut wire, &[9u8; 1000]);
            let got = open_bytewise(&mut o, wire);
            assert_eq!(got.len(), 3);
            assert_eq!(&got[0][..], b"first");
            assert!(got[1].is_empty());
            assert_eq!(&got[2][..], &[9u8; 1000][..]);
        }
    }

    #[test]
    fn any_flipped_bit_fails_authentication() {
        let (mut s, _) = pair(CipherSuite::Aes256Gcm);
        let mut wire = Vec::new();
        seal(&mut s, &mut wire, b"payload bytes");
        for i in HEADER_LEN..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x01;
            let (_, mut o) = pair(CipherSuite::Aes256Gcm);
            let mut buf = BytesMut::from(&bad[..]);
            assert_eq!(o.open_next(&mut buf), Err(RecordError::BadTag), "byte {i}");
        }
    }

    #[test]
    fn header_tamper_and_reorder_are_detected() {
        let (mut s, mut o) = pair(CipherSuite::Aes256Gcm);
        let mut a = Vec::new();
        seal(&mut s, &mut a, b"one");
        let mut b = Vec::new();
        seal(&mut s, &mut b, b"two");
        // Swapped order: the counter nonce no longer matches.
        let mut buf = BytesMut::from(&b[..]);
        assert_eq!(o.open_next(&mut buf), Err(RecordError::BadTag));
        // Oversized and undersized lengths are refused before any allocation.
        let mut huge = BytesMut::from(&(MAX_RECORD_BODY as u32 + 1).to_be_bytes()[..]);
        assert!(matches!(
            o.open_next(&mut huge),
            Err(RecordError::BadLength(_))
        ));
        let mut tiny = BytesMut::from(&3u32.to_be_bytes()[..]);
        assert_eq!(o.open_next(&mut tiny), Err(RecordError::BadLength(3)));
    }

    #[test]
    fn bound_records_carry_plaintext_behind_a_length_and_keep_their_bounds() {
        let mut s = RecordSealer::bound();
        let mut o = RecordOpener::bound();
        assert!(s.is_bound() && o.is_bound());
        let mut wire = Vec::new();
        seal(&mut s, &mut wire, b"first");
        seal(&mut s, &mut wire, b"");
        seal(&mut s, &mut wire, &[9u8; MAX_RECORD_PAYLOAD]);
        assert_eq!(
            wire.len(),
            3 * HEADER_LEN + 5 + MAX_RECORD_PAYLOAD,
            "no tags"
        );
        assert_eq!(&wire[..HEADER_LEN + 5], b"\0\0\0\x05first");
        let got = open_bytewise(&mut o, wire);
        assert_eq!(got.len(), 3);
        assert_eq!(&got[0][..], b"first");
        assert!(got[1].is_empty());
        assert_eq!(got[2].len(), MAX_RECORD_PAYLOAD);
        // A length past the largest plaintext is refused before any allocation, and a
        // sealer never writes one.
        let mut huge = BytesMut::from(&(MAX_RECORD_PAYLOAD as u32 + 1).to_be_bytes()[..]);
        assert_eq!(
            o.open_next(&mut huge),
            Err(RecordError::BadLength(MAX_RECORD_PAYLOAD + 1))
        );
        let mut out = Vec::new();
        let start = RecordSealer::begin(&mut out);
        out.resize(out.len() + MAX_RECORD_PAYLOAD + 1, 0);
        assert!(s.seal(&mut out, start).is_err());
    }

    #[test]
    fn a_sealed_opener_refuses_a_bound_record() {
        // The two ends must agree (the handshake decides for both): a bound record read
        // by a sealed opener fails its tag and ends the leg.
        let mut bound = RecordSealer::bound();
        let mut wire = Vec::new();
        seal(&mut bound, &mut wire, b"0123456789abcdefXYZ");
        let (_, mut sealed) = pair(CipherSuite::Aes256Gcm);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(sealed.open_next(&mut buf), Err(RecordError::BadTag));
    }
}
