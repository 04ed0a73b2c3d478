//! A leg's channel binding: the TLS 1.3 exporter value (RFC 8446 §7.5, the `tls-exporter`
//! binding of RFC 9266) of the TLS connection it runs over, when this process terminates
//! that TLS itself.
//!
//! The client offers its value in the Noise hello; the exit compares it with its own for
//! the same connection. Equal values mean one TLS session runs end to end between the two,
//! so the leg's records can skip the Noise AEAD (see `halfpipe_core::record`). A proxy or
//! CDN that terminates TLS holds two sessions with two different values, and the leg keeps
//! both layers.
//!
//! QUIC connections export through quinn. rustls' unbuffered API (under `tls://` and
//! `wss://`) has no exporter call, so [`ExporterSecretLog`] takes the exporter secret from
//! rustls' key-log hook, the one place it is handed out, and [`tls13_exporter`] derives the
//! value as RFC 8446 defines it (tested against rustls' own exporter).

use std::sync::Mutex;

use halfpipe_core::handshake::ChannelBinding;
use ring::{digest, hkdf};
use rustls::CipherSuite;
use zeroize::Zeroizing;

use crate::locks::lock;

/// The exporter label of halfpipe's leg binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-halfpipe-leg-binding";

const EXPORTER_SECRET: &str = "EXPORTER_SECRET";

/// Holds one TLS connection's exporter secret as rustls derives it (installed as that
/// connection's `key_log`, so every connection has its own).
#[derive(Default)]
pub struct ExporterSecretLog(Mutex<Option<Zeroizing<Vec<u8>>>>);

impl std::fmt::Debug for ExporterSecretLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExporterSecretLog(..)")
    }
}

impl rustls::KeyLog for ExporterSecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if label == EXPORTER_SECRET {
            let mut slot = lock(&self.0);
            *slot = Some(Zeroizing::new(secret.to_vec()));
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == EXPORTER_SECRET
    }
}

impl ExporterSecretLog {
    /// The binding of the finished handshake negotiated with `suite`; takes the secret out
    /// (it is zeroized when dropped). `None` before the handshake, for TLS 1.2 (which has
    /// no exporter secret) and for an unknown suite.
    pub fn take_binding(&self, suite: Option<CipherSuite>) -> Option<ChannelBinding> {
        let secret = lock(&self.0).take()?;
        use CipherSuite::*;
        let hash = match suite? {
            TLS13_AES_128_GCM_SHA256 | TLS13_CHACHA20_POLY1305_SHA256 => Tls13Hash::Sha256,
            TLS13_AES_256_GCM_SHA384 => Tls13Hash::Sha384,
            _ => return None,
        };
        let mut out = [0u8; 32];
        tls13_exporter(hash, &secret, EXPORTER_LABEL, b"", &mut out)?;
        Some(ChannelBinding(out))
    }
}

/// The binding from a transport's own exporter call `export(out, label, context)` (quinn's
/// and wtransport's `export_keying_material`), with our label and an empty context.
pub fn exported<E>(
    export: impl FnOnce(&mut [u8], &[u8], &[u8]) -> Result<(), E>,
) -> Option<ChannelBinding> {
    let mut out = [0u8; 32];
    export(&mut out, EXPORTER_LABEL, b"").ok()?;
    Some(ChannelBinding(out))
}

/// The hash of a TLS 1.3 cipher suite.
#[derive(Clone, Copy, Debug)]
pub enum Tls13Hash {
    /// SHA-256 suites.
    Sha256,
    /// SHA-384 suites.
    Sha384,
}

impl Tls13Hash {
    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Tls13Hash::Sha256 => hkdf::HKDF_SHA256,
            Tls13Hash::Sha384 => hkdf::HKDF_SHA384,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Tls13Hash::Sha256 => &digest::SHA256,
            Tls13Hash::Sha384 => &digest::SHA384,
        }
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label of RFC 8446 §7.1 into `out`.
fn expand_label(
    hash: Tls13Hash,
    secret: &[u8],
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Option<()> {
    let full_label_len = u8::try_from(6 + label.len()).ok()?;
    let context_len = u8::try_from(context.len()).ok()?;
    let length = u16::try_from(out.len()).ok()?.to_be_bytes();
    let info: [&[u8]; 6] = [
        &length,
        &[full_label_len],
        b"tls13 ",
        label,
        &[context_len],
        context,
    ];
    let prk = hkdf::Prk::new_less_safe(hash.hkdf(), secret);
    prk.expand(&info, Len(out.len())).ok()?.fill(out).ok()
}

/// TLS-Exporter(label, context, out.len()) of RFC 8446 §7.5 from the exporter secret:
/// `HKDF-Expand-Label(Derive-Secret(secret, label, ""), "exporter", Hash(context), len)`.
pub fn tls13_exporter(
    hash: Tls13Hash,
    exporter_secret: &[u8],
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Option<()> {
    let alg = hash.digest();
    let empty = digest::digest(alg, b"");
    let mut derived = Zeroizing::new(vec![0u8; alg.output_len()]);
    expand_label(hash, exporter_secret, label, empty.as_ref(), &mut derived)?;
    let context_hash = digest::digest(alg, context);
    expand_label(hash, &derived, b"exporter", context_hash.as_ref(), out)
}
