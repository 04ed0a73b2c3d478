//! Records: the in-memory form, the canonical encoding that is hashed, the JSON line that is
//! stored, and the fields of the two reserved kinds (genesis and checkpoint).

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use crate::error::AuditError;

/// The kind of the first record of every log, naming the signing key.
pub const GENESIS_KIND: &str = "genesis";
/// The kind of a signed checkpoint record.
pub const CHECKPOINT_KIND: &str = "checkpoint";
/// The value of the genesis record's `version` field.
pub const FORMAT_VERSION: &str = "halfpipe-audit/1";
/// The longest line (one record, without its newline) the writer writes and readers accept.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The longest kind or field name the writer accepts.
pub const MAX_NAME_BYTES: usize = 64;

/// Domain separation tag that starts every record's canonical encoding.
pub(crate) const RECORD_DOMAIN: &[u8] = b"halfpipe-audit record v1";
/// Domain separation tag that starts every checkpoint's signed message.
pub(crate) const CHECKPOINT_DOMAIN: &[u8] = b"halfpipe-audit checkpoint v1";

/// The record kinds the halfpipe server writes (any other valid name may be used too).
pub mod kinds {
    /// A session was opened (fields such as `user`, `session`, `peer`).
    pub const SESSION_OPENED: &str = "session_opened";
    /// A session was closed (fields such as `user`, `bytes_up`, `bytes_down`).
    pub const SESSION_CLOSED: &str = "session_closed";
    /// A handshake or token was refused.
    pub const AUTH_FAILURE: &str = "auth_failure";
    /// The server's mode changed.
    pub const MODE_CHANGE: &str = "mode_change";
    /// A tripwire fired.
    pub const TRIPWIRE: &str = "tripwire";
    /// A capability token was used.
    pub const TOKEN_USE: &str = "token_use";
    /// The configuration was reloaded.
    pub const CONFIG_RELOAD: &str = "config_reload";
    /// A key was created, rotated, retired or loaded.
    pub const KEY_EVENT: &str = "key_event";
}

/// One record of the log, as stored (one JSON line) and as hashed (canonical encoding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Position in the chain: 0 for the genesis record, then 1, 2, …
    pub seq: u64,
    /// Wall-clock time the record was made, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened (`session_opened`, …, or the reserved `genesis` / `checkpoint`).
    pub kind: String,
    /// The record's fields, by name.
    pub fields: BTreeMap<String, String>,
    /// The hash of the previous record (all zeros for the genesis record).
    pub prev: [u8; 32],
    /// SHA-256 of this record's canonical encoding, as stored in the file.
    pub hash: [u8; 32],
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl Record {
    /// Makes a record and computes its hash.
    pub fn new(
        seq: u64,
        time_ms: u64,
        kind: String,
        fields: BTreeMap<String, String>,
        prev: [u8; 32],
    ) -> Record {
        let mut r = Record {
            seq,
            time_ms,
            kind,
            fields,
            prev,
            hash: [0; 32],
        };
        r.hash = r.compute_hash();
        r
    }

    /// The canonical encoding that is hashed: every integer 8 bytes big-endian, every string
    /// prefixed by its length as 8 bytes big-endian, fields in byte order of their names:
    ///
    /// `lp("halfpipe-audit record v1") ‖ seq ‖ time_ms ‖ lp(kind) ‖ n_fields ‖
    /// (lp(name) ‖ lp(value))* ‖ prev (32 bytes)`
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        put_bytes(&mut out, RECORD_DOMAIN);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        put_bytes(&mut out, self.kind.as_bytes());
        out.extend_from_slice(&(self.fields.len() as u64).to_be_bytes());
        for (name, value) in &self.fields {
            put_bytes(&mut out, name.as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        out.extend_from_slice(&self.prev);
        out
    }

    /// SHA-256 of [`Record::canonical_bytes`].
    pub fn compute_hash(&self) -> [u8; 32] {
        Sha256::digest(self.canonical_bytes()).into()
    }

    /// Whether the stored [`Record::hash`] is the hash of the record's content.
    pub fn hash_matches(&self) -> bool {
        self.compute_hash() == self.hash
    }

    /// A field's value.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// The record as the JSON line the writer stores (without the newline).
    pub fn to_json_line(&self) -> Result<String, AuditError> {
        serde_json::to_string(self).map_err(|e| AuditError::Encode(e.to_string()))
    }

    /// Parses one JSON line (without its newline). Duplicate keys, unknown keys and hashes
    /// that are not 64 hex digits are refused. The error is a reason for a finding.
    pub fn from_json_line(line: &[u8]) -> Result<Record, String> {
        serde_json::from_slice(line).map_err(|e| e.to_string())
    }
}

/// Serializes as the stored JSON line's object (hashes as lowercase hex).
impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RawRecordRef {
            seq: self.seq,
            time_ms: self.time_ms,
            kind: &self.kind,
            fields: &self.fields,
            prev: hex::encode(self.prev),
            hash: hex::encode(self.hash),
        }
        .serialize(s)
    }
}

/// Deserializes the stored JSON line's object, refusing duplicate and unknown keys.
impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawRecord::deserialize(d)?;
        let prev = decode_hash(&raw.prev)
            .map_err(|e| serde::de::Error::custom(format!("its \"prev\" is {e}")))?;
        let hash = decode_hash(&raw.hash)
            .map_err(|e| serde::de::Error::custom(format!("its \"hash\" is {e}")))?;
        Ok(Record {
            seq: raw.seq,
            time_ms: raw.time_ms,
            kind: raw.kind,
            fields: raw.fields.0,
            prev,
            hash,
        })
    }
}

fn decode_hash(text: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).map_err(|_| "not 64 hex digits".to_owned())?;
    Ok(out)
}

#[derive(Serialize)]
struct RawRecordRef<'a> {
    seq: u64,
    time_ms: u64,
    kind: &'a str,
    fields: &'a BTreeMap<String, String>,
    prev: String,
    hash: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    seq: u64,
    time_ms: u64,
    kind: String,
    fields: UniqueMap,
    prev: String,
    hash: String,
}

/// A string map that refuses duplicate keys (serde's map would keep the last one silently,
/// letting a line say two things at once).
struct UniqueMap(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of string fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "field {k:?} appears twice"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Checks a kind or field name: 1 to [`MAX_NAME_BYTES`] bytes of ASCII letters, digits, `_`,
/// `-` and `.`.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return Err("it is longer than 64 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err("only ASCII letters, digits, '_', '-' and '.' are allowed");
    }
    Ok(())
}

/// Checks a record the caller wants appended and turns its fields into a map.
pub(crate) fn check_new_record<'a>(
    kind: &str,
    fields: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<BTreeMap<String, String>, AuditError> {
    check_name(kind).map_err(|reason| AuditError::InvalidKind {
        kind: kind.to_owned(),
        reason,
    })?;
    if kind == GENESIS_KIND || kind == CHECKPOINT_KIND {
        return Err(AuditError::InvalidKind {
            kind: kind.to_owned(),
            reason: "it is reserved for the log's own records",
        });
    }
    let mut map = BTreeMap::new();
    for (name, value) in fields {
        check_name(name).map_err(|reason| AuditError::InvalidField {
            kind: kind.to_owned(),
            name: name.to_owned(),
            reason,
        })?;
        if map.insert(name.to_owned(), value.to_owned()).is_some() {
            return Err(AuditError::InvalidField {
                kind: kind.to_owned(),
                name: name.to_owned(),
                reason: "it is given twice",
            });
        }
    }
    Ok(map)
}

/// The message a checkpoint's signature covers:
/// `lp("halfpipe-audit checkpoint v1") ‖ count ‖ head (32 bytes) ‖ time_ms`.
pub(crate) fn checkpoint_message(count: u64, head: &[u8; 32], time_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + CHECKPOINT_DOMAIN.len() + 48);
    put_bytes(&mut out, CHECKPOINT_DOMAIN);
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(&time_ms.to_be_bytes());
    out
}

/// The parsed fields of a checkpoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// How many records precede the checkpoint (which is therefore record `count`).
    pub count: u64,
    /// The hash of record `count - 1`.
    pub head: [u8; 32],
    /// Ed25519 signature over [`checkpoint_message`].
    pub signature: [u8; 64],
    /// The checkpoint record's time.
    pub time_ms: u64,
}

impl Checkpoint {
    /// Parses a checkpoint record's fields; the error is the reason it is malformed.
    pub fn parse(r: &Record) -> Result<Checkpoint, String> {
        if r.kind != CHECKPOINT_KIND {
            return Err(format!("its kind is {:?}, not \"checkpoint\"", r.kind));
        }
        if r.fields.len() != 3 {
            return Err("it must have exactly the fields count, head and signature".into());
        }
        let count_text = r.field("count").ok_or("it has no \"count\" field")?;
        let count: u64 = count_text
            .parse()
            .map_err(|_| format!("its count {count_text:?} is not a number"))?;
        if count.to_string() != count_text {
            return Err(format!("its count {count_text:?} is not in canonical form"));
        }
        if count != r.seq {
            return Err(format!(
                "its count {count} differs from its seq {} (a checkpoint covers exactly the records before it)",
                r.seq
            ));
        }
        let head_text = r.field("head").ok_or("it has no \"head\" field")?;
        let head = decode_hash(head_text).map_err(|e| format!("its head is {e}"))?;
        if hex::encode(head) != head_text {
            return Err("its head is not lowercase hex".into());
        }
        let sig_text = r
            .field("signature")
            .ok_or("it has no \"signature\" field")?;
        let mut signature = [0u8; 64];
        hex::decode_to_slice(sig_text, &mut signature)
            .map_err(|_| "its signature is not 128 hex digits".to_owned())?;
        if hex::encode(signature) != sig_text {
            return Err("its signature is not lowercase hex".into());
        }
        Ok(Checkpoint {
            count,
            head,
            signature,
            time_ms: r.time_ms,
        })
    }

    /// Whether the signature is valid under `key` (strict Ed25519 verification).
    pub fn signature_valid(&self, key: &VerifyingKey) -> bool {
        let msg = checkpoint_message(self.count, &self.head, self.time_ms);
        key.verify_strict(&msg, &Signature::from_bytes(&self.signature))
            .is_ok()
    }
}

/// Parses a genesis record and returns the signing key it names; the error says why it is
/// not a valid genesis record.
pub(crate) fn parse_genesis(r: &Record) -> Result<[u8; 32], String> {
    if r.kind != GENESIS_KIND {
        return Err(format!("its kind is {:?}, not \"genesis\"", r.kind));
    }
    if r.seq != 0 {
        return Err(format!("its seq is {}, not 0", r.seq));
    }
    if r.prev != [0; 32] {
        return Err("its prev hash is not all zeros".into());
    }
    if r.fields.len() != 2 {
        return Err("it must have exactly the fields key and version".into());
    }
    match r.field("version") {
        Some(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "its version {v:?} is not {FORMAT_VERSION:?} (written by another version?)"
            ))
        }
        None => return Err("it has no \"version\" field".into()),
    }
    let key_text = r.field("key").ok_or("it has no \"key\" field")?;
    let key = decode_hash(key_text).map_err(|e| format!("its key is {e}"))?;
    if hex::encode(key) != key_text {
        return Err("its key is not lowercase hex".into());
    }
    VerifyingKey::from_bytes(&key)
        .map_err(|_| "its key is not a valid Ed25519 public key".to_owned())?;
    Ok(key)
}

/// The genesis record naming `public_key`.
pub(crate) fn genesis_record(public_key: &[u8; 32], time_ms: u64) -> Record {
    let mut fields = BTreeMap::new();
    fields.insert("key".to_owned(), hex::encode(public_key));
    fields.insert("version".to_owned(), FORMAT_VERSION.to_owned());
    Record::new(0, time_ms, GENESIS_KIND.to_owned(), fields, [0; 32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_encoding_is_length_prefixed_and_sorted() {
        let mut fields = BTreeMap::new();
        fields.insert("b".to_owned(), "2".to_owned());
        fields.insert("a".to_owned(), "1".to_owned());
        let r = Record::new(3, 9, "k".into(), fields, [7; 32]);
        let mut want = Vec::new();
        want.extend_from_slice(&(RECORD_DOMAIN.len() as u64).to_be_bytes());
        want.extend_from_slice(RECORD_DOMAIN);
        want.extend_from_slice(&3u64.to_be_bytes());
        want.extend_from_slice(&9u64.to_be_bytes());
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(b"k");
        want.extend_from_slice(&2u64.to_be_bytes());
        for (k, v) in [("a", "1"), ("b", "2")] {
            want.extend_from_slice(&1u64.to_be_bytes());
            want.extend_from_slice(k.as_bytes());
            want.extend_from_slice(&1u64.to_be_bytes());
            want.extend_from_slice(v.as_bytes());
        }
        want.extend_from_slice(&[7; 32]);
        assert_eq!(r.canonical_bytes(), want);
        assert_eq!(r.hash, <[u8; 32]>::from(Sha256::digest(&want)));
    }

    #[test]
    fn field_boundaries_change_the_hash() {
        // "ab"="c" and "a"="bc" must not collide.
        let one = Record::new(
            1,
            0,
            "k".into(),
            [("ab".to_owned(), "c".to_owned())].into(),
            [0; 32],
        );
        let two = Record::new(
            1,
            0,
            "k".into(),
            [("a".to_owned(), "bc".to_owned())].into(),
            [0; 32],
        );
        assert_ne!(one.hash, two.hash);
    }

    #[test]
    fn json_roundtrip_and_duplicate_keys_refused() {
        let r = Record::new(
            1,
            5,
            "session_opened".into(),
            [("user".to_owned(), "al\"ice\n".to_owned())].into(),
            [1; 32],
        );
        let line = r.to_json_line().unwrap();
        assert_eq!(Record::from_json_line(line.as_bytes()).unwrap(), r);
        let dup = line.replace("{\"user\"", "{\"user\":\"mallory\",\"user\"");
        let e = Record::from_json_line(dup.as_bytes()).unwrap_err();
        assert!(e.contains("appears twice"), "{e}");
        let extra = line.replacen("{\"seq\"", "{\"x\":1,\"seq\"", 1);
        assert!(Record::from_json_line(extra.as_bytes()).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_new_record("session_opened", [("user", "a")]).is_ok());
        assert!(check_new_record("", []).is_err());
        assert!(check_new_record("checkpoint", []).is_err());
        assert!(check_new_record("genesis", []).is_err());
        assert!(check_new_record("a b", []).is_err());
        assert!(check_new_record("k", [("u", "1"), ("u", "2")]).is_err());
        assert!(check_new_record("k", [("", "1")]).is_err());
    }
}
