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
//!
//! A channel-bound leg whose TLS stream hands its traffic keys over
//! ([`RecordSealer::tls13`]) goes one step further: each record *is* one TLS 1.3 record
//! (RFC 8446 §5.2: `[23][03 03][length u16 BE][AEAD(plaintext ‖ 23)][16-byte tag]`, nonce =
//! IV ⊕ sequence number, the 5-byte header as associated data), sealed and opened in place
//! in the leg's own buffers, so the bytes are copied neither into nor out of a TLS
//! library. Such a record carries at most [`TLS_MAX_PLAINTEXT`] bytes; anything but
//! application data (an alert, a post-handshake message) ends the leg, which the session
//! then replaces.

use bytes::{Bytes, BytesMut};

use crate::aead::{AeadKey, Algorithm};
use crate::frame::MAX_RECORD_PAYLOAD;

/// Length of the record header.
pub const HEADER_LEN: usize = 4;
/// Length of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// The largest value the length header may carry (payload plus tag).
pub const MAX_RECORD_BODY: usize = MAX_RECORD_PAYLOAD + TAG_LEN;

/// Length of a TLS 1.3 record header (type, legacy version, length).
pub const TLS_HEADER_LEN: usize = 5;
/// The most plaintext one TLS record carries (RFC 8446 §5.1).
pub const TLS_MAX_PLAINTEXT: usize = 16 * 1024;
/// What a sealed TLS 1.3 record adds after its plaintext: the inner content type and the tag.
const TLS_TRAILER_LEN: usize = 1 + TAG_LEN;
/// The largest ciphertext a TLS 1.3 record may announce (RFC 8446 §5.2).
const TLS_MAX_CIPHERTEXT: usize = TLS_MAX_PLAINTEXT + 256;
/// TLS content types (RFC 8446 §5.1).
const TLS_ALERT: u8 = 21;
const TLS_HANDSHAKE: u8 = 22;
const TLS_APPLICATION_DATA: u8 = 23;
/// Records one TLS traffic key protects before the leg must be replaced: below the
/// 2^24.5 records RFC 8446 §5.5 allows AES-GCM, for every suite alike.
const TLS_RECORD_LIMIT: u64 = 1 << 24;

/// The AEAD of a TLS 1.3 connection whose traffic keys a leg took over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsCipher {
    /// TLS_AES_128_GCM_SHA256.
    Aes128Gcm,
    /// TLS_AES_256_GCM_SHA384.
    Aes256Gcm,
    /// TLS_CHACHA20_POLY1305_SHA256.
    ChaCha20Poly1305,
}

impl TlsCipher {
    fn algorithm(self) -> Algorithm {
        match self {
            TlsCipher::Aes128Gcm => Algorithm::Aes128Gcm,
            TlsCipher::Aes256Gcm => Algorithm::Aes256Gcm,
            TlsCipher::ChaCha20Poly1305 => Algorithm::ChaCha20Poly1305,
        }
    }
}

/// One direction's TLS 1.3 traffic key, as the TLS library hands it over.
pub struct TlsTrafficKey<'a> {
    /// The AEAD.
    pub cipher: TlsCipher,
    /// The traffic key (16 or 32 bytes).
    pub key: &'a [u8],
    /// The static IV the sequence number is mixed into.
    pub iv: [u8; 12],
    /// The sequence number of the next record in this direction.
    pub seq: u64,
}

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

    fn algorithm(self) -> Algorithm {
        match self {
            CipherSuite::Aes256Gcm => Algorithm::Aes256Gcm,
            CipherSuite::ChaCha20Poly1305 => Algorithm::ChaCha20Poly1305,
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
    /// A TLS record header this leg cannot accept (wrong type or version, bad length).
    #[error("malformed TLS record: {0}")]
    TlsRecord(&'static str),
    /// The peer ended the TLS connection (close_notify).
    #[error("the peer closed the TLS connection (close_notify)")]
    TlsClosed,
    /// The peer sent a TLS alert.
    #[error("the peer sent TLS alert {0}")]
    TlsAlert(u8),
    /// A post-handshake TLS message (key update, session ticket) after the keys were handed
    /// over; the leg is replaced instead.
    #[error("post-handshake TLS message on a leg whose TLS keys were handed over")]
    TlsHandshake,
}

struct Keyed {
    key: AeadKey,
    counter: u64,
}

impl Keyed {
    fn new(suite: CipherSuite, key: &[u8; 32]) -> Result<Self, RecordError> {
        Ok(Self {
            key: AeadKey::new(suite.algorithm(), key)?,
            counter: 0,
        })
    }

    fn next_nonce(&mut self) -> Result<[u8; 12], RecordError> {
        let n = self.counter;
        self.counter = n.checked_add(1).ok_or(RecordError::CounterExhausted)?;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        Ok(nonce)
    }
}

/// A TLS 1.3 traffic key in use: the AEAD, its IV and the next sequence number.
struct TlsKeyed {
    key: AeadKey,
    iv: [u8; 12],
    seq: u64,
}

impl TlsKeyed {
    fn new(k: &TlsTrafficKey<'_>) -> Result<Self, RecordError> {
        Ok(Self {
            key: AeadKey::new(k.cipher.algorithm(), k.key)?,
            iv: k.iv,
            seq: k.seq,
        })
    }

    /// RFC 8446 §5.3: the sequence number, left-padded to the IV's length, XORed into it.
    fn next_nonce(&mut self) -> Result<[u8; 12], RecordError> {
        if self.seq >= TLS_RECORD_LIMIT {
            return Err(RecordError::CounterExhausted);
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(nonce)
    }
}

/// How a leg's records are protected.
enum Protection {
    /// AEAD under the leg's Noise key (boxed: the expanded AES key is large).
    Sealed(Box<Keyed>),
    /// In the clear inside a channel-bound TLS 1.3 transport.
    Bound,
    /// As TLS 1.3 records of a channel-bound transport whose keys were handed over.
    Tls13(Box<TlsKeyed>),
}

impl Protection {
    fn header_len(&self) -> usize {
        match self {
            Protection::Sealed(_) | Protection::Bound => HEADER_LEN,
            Protection::Tls13(_) => TLS_HEADER_LEN,
        }
    }

    fn trailer_len(&self) -> usize {
        match self {
            Protection::Sealed(_) => TAG_LEN,
            Protection::Bound => 0,
            Protection::Tls13(_) => TLS_TRAILER_LEN,
        }
    }

    fn max_payload(&self) -> usize {
        match self {
            Protection::Sealed(_) | Protection::Bound => MAX_RECORD_PAYLOAD,
            Protection::Tls13(_) => TLS_MAX_PLAINTEXT,
        }
    }

    /// The body length a header may announce.
    fn check_body_len(&self, len: usize) -> Result<usize, RecordError> {
        let ok = match self {
            Protection::Sealed(_) => (TAG_LEN..=MAX_RECORD_BODY).contains(&len),
            Protection::Bound => len <= MAX_RECORD_PAYLOAD,
            Protection::Tls13(_) => (TLS_TRAILER_LEN..=TLS_MAX_CIPHERTEXT).contains(&len),
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

    /// A sealer writing TLS 1.3 records under a traffic key taken over from the leg's
    /// channel-bound TLS connection.
    pub fn tls13(key: &TlsTrafficKey<'_>) -> Result<Self, RecordError> {
        TlsKeyed::new(key).map(|k| Self(Protection::Tls13(Box::new(k))))
    }

    /// Whether this leg's records travel without their own AEAD (channel-bound).
    pub fn is_bound(&self) -> bool {
        !matches!(self.0, Protection::Sealed(_))
    }

    /// The most plaintext one record may carry on this leg.
    pub fn max_payload(&self) -> usize {
        self.0.max_payload()
    }

    /// Reserves a header at the end of `out` and returns where this record starts; append
    /// the plaintext after it, then call [`RecordSealer::seal`] with the same start.
    pub fn begin(&self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.resize(start + self.0.header_len(), 0);
        start
    }

    /// Encrypts the plaintext after the header at `start` in place, appends the tag and
    /// fills the header.
    pub fn seal(&mut self, out: &mut Vec<u8>, start: usize) -> Result<(), RecordError> {
        self.reserve_tag(out);
        self.seal_reserved(&mut out[start..])
    }

    /// Appends room for what follows a record's plaintext (the tag; none on a
    /// channel-bound leg), so that the record can be sealed later with
    /// [`RecordSealer::seal_reserved`] without moving bytes.
    pub fn reserve_tag(&self, out: &mut Vec<u8>) {
        out.resize(out.len() + self.0.trailer_len(), 0);
    }

    /// Seals one record laid out as `[header][plaintext][tag room]`, in place.
    pub fn seal_reserved(&mut self, record: &mut [u8]) -> Result<(), RecordError> {
        let header_len = self.0.header_len();
        let body_len = record.len() - header_len;
        self.0.check_body_len(body_len)?;
        match &mut self.0 {
            Protection::Bound => {
                record[..HEADER_LEN].copy_from_slice(&(body_len as u32).to_be_bytes());
                Ok(())
            }
            Protection::Sealed(keyed) => {
                let header = (body_len as u32).to_be_bytes();
                record[..HEADER_LEN].copy_from_slice(&header);
                let nonce = keyed.next_nonce()?;
                let (plain, tag_room) = record[HEADER_LEN..].split_at_mut(body_len - TAG_LEN);
                keyed.key.seal(nonce, &header, plain, tag_room)
            }
            Protection::Tls13(keyed) => {
                if body_len - TLS_TRAILER_LEN > TLS_MAX_PLAINTEXT {
                    return Err(RecordError::BadLength(body_len));
                }
                let [hi, lo] = (body_len as u16).to_be_bytes();
                let header = [TLS_APPLICATION_DATA, 3, 3, hi, lo];
                record[..TLS_HEADER_LEN].copy_from_slice(&header);
                // TLSInnerPlaintext: the content, then its real type.
                record[record.len() - TLS_TRAILER_LEN] = TLS_APPLICATION_DATA;
                let nonce = keyed.next_nonce()?;
                let inner_len = body_len - TAG_LEN;
                let (inner, tag_room) = record[TLS_HEADER_LEN..].split_at_mut(inner_len);
                keyed.key.seal(nonce, &header, inner, tag_room)
            }
        }
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

    /// An opener reading TLS 1.3 records under a traffic key taken over from the leg's
    /// channel-bound TLS connection.
    pub fn tls13(key: &TlsTrafficKey<'_>) -> Result<Self, RecordError> {
        TlsKeyed::new(key).map(|k| Self(Protection::Tls13(Box::new(k))))
    }

    /// Whether this leg's records travel without their own AEAD (channel-bound).
    pub fn is_bound(&self) -> bool {
        !matches!(self.0, Protection::Sealed(_))
    }

    /// If `buf` starts with a whole record, splits it off, decrypts it in place and returns
    /// the plaintext; `Ok(None)` when more bytes are needed.
    pub fn open_next(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, RecordError> {
        if let Protection::Tls13(keyed) = &mut self.0 {
            return open_tls13(keyed, buf);
        }
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
        let plain_len = keyed.key.open(nonce, &header, &mut record[HEADER_LEN..])?;
        let _ = record.split_to(HEADER_LEN);
        record.truncate(plain_len);
        Ok(Some(record.freeze()))
    }
}

/// [`RecordOpener::open_next`] for TLS 1.3 records: the next non-empty application-data
/// payload, decrypted in place.
fn open_tls13(keyed: &mut TlsKeyed, buf: &mut BytesMut) -> Result<Option<Bytes>, RecordError> {
    loop {
        if buf.len() < TLS_HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; TLS_HEADER_LEN];
        header.copy_from_slice(&buf[..TLS_HEADER_LEN]);
        // Every protected TLS 1.3 record looks like application data on the outside.
        if header[0] != TLS_APPLICATION_DATA || header[1..3] != [3, 3] {
            return Err(RecordError::TlsRecord(
                "not a protected TLS 1.3 record (outer type 23, version 0x0303)",
            ));
        }
        let body_len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if !(TLS_TRAILER_LEN..=TLS_MAX_CIPHERTEXT).contains(&body_len) {
            return Err(RecordError::TlsRecord("record length out of bounds"));
        }
        if buf.len() < TLS_HEADER_LEN + body_len {
            buf.reserve(TLS_HEADER_LEN + body_len - buf.len());
            return Ok(None);
        }
        let mut record = buf.split_to(TLS_HEADER_LEN + body_len);
        let nonce = keyed.next_nonce()?;
        let inner_len = keyed
            .key
            .open(nonce, &header, &mut record[TLS_HEADER_LEN..])?;
        // TLSInnerPlaintext: content, content type, then zero padding.
        let inner = &record[TLS_HEADER_LEN..TLS_HEADER_LEN + inner_len];
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::TlsRecord("record without a content type"));
        };
        match inner[type_at] {
            TLS_APPLICATION_DATA if type_at == 0 => continue, // an empty record
            TLS_APPLICATION_DATA => {
                let _ = record.split_to(TLS_HEADER_LEN);
                record.truncate(type_at);
                return Ok(Some(record.freeze()));
            }
            TLS_ALERT => {
                return Err(match inner[..type_at] {
                    [_, 0] => RecordError::TlsClosed,
                    [_, description] => RecordError::TlsAlert(description),
                    _ => RecordError::TlsRecord("malformed alert"),
                })
            }
            TLS_HANDSHAKE => return Err(RecordError::TlsHandshake),
            _ => return Err(RecordError::TlsRecord("unknown content type")),
        }
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
    // The reference for hand-built TLS records is a library called directly.
    use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

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
        let start = s.begin(out);
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
        let start = s.begin(&mut out);
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

    const TLS_KEY: [u8; 32] = [0x42; 32];
    const TLS_IV: [u8; 12] = [0x17; 12];

    fn tls_key(cipher: TlsCipher, seq: u64) -> TlsTrafficKey<'static> {
        let len = match cipher {
            TlsCipher::Aes128Gcm => 16,
            _ => 32,
        };
        TlsTrafficKey {
            cipher,
            key: &TLS_KEY[..len],
            iv: TLS_IV,
            seq,
        }
    }

    /// A TLS 1.3 record built by hand from RFC 8446 §5.2, sealed under [`TLS_KEY`]: lets a
    /// test choose the inner content type and padding, which no sealer writes.
    fn tls_record(seq: u64, content: &[u8], inner_type: u8, padding: usize) -> Vec<u8> {
        let key = LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &TLS_KEY).unwrap());
        let mut inner = content.to_vec();
        inner.push(inner_type);
        inner.resize(inner.len() + padding, 0);
        let len = (inner.len() + TAG_LEN) as u16;
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let mut nonce = TLS_IV;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(header),
            &mut inner,
        )
        .unwrap();
        [&header[..], &inner].concat()
    }

    #[test]
    fn tls13_records_roundtrip_in_every_suite_from_any_sequence_number() {
        for cipher in [
            TlsCipher::Aes128Gcm,
            TlsCipher::Aes256Gcm,
            TlsCipher::ChaCha20Poly1305,
        ] {
            // Keys are handed over mid-connection: both ends continue at rustls' numbers.
            let mut s = RecordSealer::tls13(&tls_key(cipher, 3)).unwrap();
            let mut o = RecordOpener::tls13(&tls_key(cipher, 3)).unwrap();
            assert!(s.is_bound() && o.is_bound());
            assert_eq!(s.max_payload(), TLS_MAX_PLAINTEXT);
            let mut wire = Vec::new();
            seal(&mut s, &mut wire, b"first");
            seal(&mut s, &mut wire, &[9u8; TLS_MAX_PLAINTEXT]);
            assert_eq!(&wire[..5], &[23, 3, 3, 0, 5 + 1 + 16], "{cipher:?}");
            let got = open_bytewise(&mut o, wire);
            assert_eq!(got.len(), 2);
            assert_eq!(&got[0][..], b"first");
            assert_eq!(&got[1][..], &[9u8; TLS_MAX_PLAINTEXT][..]);
        }
    }

    #[test]
    fn tls13_records_follow_rfc_8446_and_padding_and_empty_records_are_accepted() {
        // What the sealer writes is byte for byte the RFC's record.
        let mut s = RecordSealer::tls13(&tls_key(TlsCipher::Aes256Gcm, 7)).unwrap();
        let mut wire = Vec::new();
        seal(&mut s, &mut wire, b"halfpipe");
        assert_eq!(wire, tls_record(7, b"halfpipe", 23, 0));
        // A padded record, then an empty one, then a plain one: padding is stripped and
        // the empty record skipped.
        let mut o = RecordOpener::tls13(&tls_key(TlsCipher::Aes256Gcm, 0)).unwrap();
        let mut wire = tls_record(0, b"pad", 23, 40);
        wire.extend(tls_record(1, b"", 23, 0));
        wire.extend(tls_record(2, b"next", 23, 0));
        let got = open_bytewise(&mut o, wire);
        assert_eq!(
            got,
            vec![Bytes::from_static(b"pad"), Bytes::from_static(b"next")]
        );
    }

    #[test]
    fn tls13_alerts_post_handshake_messages_and_malformed_records_end_the_leg() {
        let open = |wire: Vec<u8>| {
            let mut o = RecordOpener::tls13(&tls_key(TlsCipher::Aes256Gcm, 0)).unwrap();
            o.open_next(&mut BytesMut::from(&wire[..]))
        };
        assert_eq!(
            open(tls_record(0, &[1, 0], 21, 0)),
            Err(RecordError::TlsClosed)
        );
        assert_eq!(
            open(tls_record(0, &[2, 40], 21, 0)),
            Err(RecordError::TlsAlert(40))
        );
        assert!(matches!(
            open(tls_record(0, &[2], 21, 0)),
            Err(RecordError::TlsRecord(_))
        ));
        // A KeyUpdate or NewSessionTicket: the keys are no longer rustls', so the leg ends.
        assert_eq!(
            open(tls_record(0, &[24, 0, 0, 1, 0], 22, 0)),
            Err(RecordError::TlsHandshake)
        );
        assert!(matches!(
            open(tls_record(0, b"x", 99, 0)),
            Err(RecordError::TlsRecord(_))
        ));
        assert!(matches!(
            open(tls_record(0, b"", 0, 3)),
            Err(RecordError::TlsRecord(_))
        ));
        // Wrong outer type or version, and lengths out of bounds, before any decryption.
        let good = tls_record(0, b"ok", 23, 0);
        for (at, value) in [(0, 22u8), (1, 2), (2, 1)] {
            let mut bad = good.clone();
            bad[at] = value;
            assert!(
                matches!(open(bad), Err(RecordError::TlsRecord(_))),
                "byte {at}"
            );
        }
        for len in [16u16, (TLS_MAX_CIPHERTEXT + 1) as u16] {
            let mut bad = good.clone();
            bad[3..5].copy_from_slice(&len.to_be_bytes());
            assert!(
                matches!(open(bad), Err(RecordError::TlsRecord(_))),
                "length {len}"
            );
        }
        // A flipped bit, a wrong sequence number: authentication fails.
        let mut flipped = good.clone();
        flipped[7] ^= 1;
        assert_eq!(open(flipped), Err(RecordError::BadTag));
        assert_eq!(open(tls_record(1, b"ok", 23, 0)), Err(RecordError::BadTag));
    }

    #[test]
    fn tls13_sealer_refuses_oversized_records_and_stops_at_the_record_limit() {
        let mut s = RecordSealer::tls13(&tls_key(TlsCipher::Aes256Gcm, 0)).unwrap();
        let mut out = Vec::new();
        let start = s.begin(&mut out);
        out.resize(out.len() + TLS_MAX_PLAINTEXT + 1, 0);
        assert_eq!(
            s.seal(&mut out, start),
            Err(RecordError::BadLength(
                TLS_MAX_PLAINTEXT + 1 + TLS_TRAILER_LEN
            ))
        );
        let mut s =
            RecordSealer::tls13(&tls_key(TlsCipher::Aes256Gcm, TLS_RECORD_LIMIT - 1)).unwrap();
        let mut out = Vec::new();
        seal(&mut s, &mut out, b"last");
        let start = s.begin(&mut out);
        assert_eq!(s.seal(&mut out, start), Err(RecordError::CounterExhausted));
        let mut o = RecordOpener::tls13(&tls_key(TlsCipher::Aes256Gcm, TLS_RECORD_LIMIT)).unwrap();
        let wire = tls_record(0, b"x", 23, 0);
        assert_eq!(
            o.open_next(&mut BytesMut::from(&wire[..])),
            Err(RecordError::CounterExhausted)
        );
        assert!(RecordSealer::tls13(&TlsTrafficKey {
            key: &TLS_KEY[..7],
            ..tls_key(TlsCipher::Aes256Gcm, 0)
        })
        .is_err());
    }
}
