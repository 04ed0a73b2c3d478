//! Share links: one copy-paste string that carries everything a client needs.
//!
//! `halfpipe ctl users add NAME` prints a link once; `halfpipe client --link LINK` needs
//! nothing else. A link names the exit's static X25519 public key, the uplink and downlink
//! URLs (each in order of preference), the user's name and static X25519 private key, and
//! optionally TLS settings, the cipher and a pre-shared key. The secret material sits in the
//! fragment (after `#`), which tools that fetch URLs never send anywhere.
//!
//! # Example
//!
//! ```
//! use halfpipe_core::link::ShareLink;
//! use halfpipe_core::record::CipherSuite;
//!
//! let link = "halfpipe://v1/ERERERERERERERERERERERERERERERERERERERERERE\
//!     ?up=wss%3A%2F%2Fcdn.example.com%3A443%2Fapi\
//!     &up=tls%3A%2F%2F%5B2001%3Adb8%3A%3A1%5D%3A8443\
//!     &down=quic%3A%2F%2Fexit.example.com%3A443\
//!     &name=alice%40corp\
//!     &sni=vpn.example.com\
//!     &pin=sha256%2FMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzM%3D\
//!     &cipher=chacha20-poly1305\
//!     #IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI\
//!     .REREREREREREREREREREREREREREREREREREREREREQ";
//! let parsed = ShareLink::parse(link).unwrap();
//! assert_eq!(parsed.server_public, [0x11; 32]);
//! assert_eq!(parsed.uplinks, ["wss://cdn.example.com:443/api", "tls://[2001:db8::1]:8443"]);
//! assert_eq!(parsed.downlinks, ["quic://exit.example.com:443"]);
//! assert_eq!(parsed.user, "alice@corp");
//! assert_eq!(parsed.server_name.as_deref(), Some("vpn.example.com"));
//! assert_eq!(parsed.cipher, CipherSuite::ChaCha20Poly1305);
//! assert_eq!(*parsed.user_secret, [0x22; 32]);
//! assert_eq!(parsed.psk.as_deref(), Some(&[0x44; 32]));
//! assert_eq!(parsed.encode().as_str(), link); // that link is in canonical form
//! ```
//!
//! (The link is one line; it is split above only for reading.)
//!
//! # Grammar (version 1)
//!
//! ```text
//! link        = "halfpipe://" "v1" "/" server-key "?" params "#" secret [ "." psk ]
//! server-key  = key32                       ; the exit's static X25519 public key
//! secret      = key32                       ; the user's static X25519 private key
//! psk         = key32                       ; the Noise psk1, if the exit uses one
//! key32       = 43 base64url characters     ; RFC 4648 §5: A-Z a-z 0-9 - _ , no padding;
//!                                           ; the last character's two low bits are 0,
//!                                           ; so every key has exactly one spelling;
//!                                           ; the all-zero key is refused
//! params      = param *( "&" param )
//! param       = name "=" value
//! name        = "up" / "down" / "name" / "sni" / "pin" / "cipher"
//! value       = *( unreserved / pct-encoded )
//! unreserved  = ALPHA / DIGIT / "-" / "." / "_" / "~"
//! pct-encoded = "%" HEXDIG HEXDIG           ; must decode to a visible ASCII byte
//!                                           ; (0x21..=0x7E): no spaces, controls, UTF-8
//! ```
//!
//! | parameter | times | decoded value |
//! | --- | --- | --- |
//! | `up` | 1 to 8 | an uplink leg URL; the order is the order of preference; no repeats |
//! | `down` | 1 to 8 | a downlink leg URL, likewise |
//! | `name` | exactly 1 | the user name (for display): 1 to 64 of `A-Z a-z 0-9 . _ @ -` |
//! | `sni` | 0 or 1 | TLS server name override: a DNS name or an IP address |
//! | `pin` | 0 or 1 | certificate pin `sha256/<standard base64 with = padding of 32 bytes>`, as printed by `halfpipe cert gen` |
//! | `cipher` | 0 or 1 | `aes-256-gcm` (the default when absent) or `chacha20-poly1305` |
//!
//! Leg URLs (after percent-decoding):
//!
//! ```text
//! leg-url   = ( "tcp" / "tls" / "quic" ) "://" authority         ; no path
//!           / ( "ws" / "wss" / "wt" ) "://" authority path       ; path required
//! authority = host ":" port
//! host      = hostname / "[" IPv6address "]"
//! hostname  = label *( "." label )          ; labels 1..=63 of A-Z a-z 0-9 - _, not starting
//!                                           ; or ending with "-"; 253 characters at most
//! port      = 1..=65535 in decimal, no leading zeros
//! path      = "/" *( pchar / "/" )          ; RFC 3986 pchar; no "..", "?" or "#"
//! ```
//!
//! # Parsing and encoding
//!
//! - Whitespace around the link (as pasted from a terminal) is trimmed; nothing else is
//!   forgiven. Links over [`MAX_LINK_LEN`] bytes and more than [`MAX_URLS`] URLs per
//!   direction are refused, as are unknown parameters and repeats of single-valued ones.
//! - Parameters may come in any order (the relative order of the `up`s and of the `down`s
//!   is kept); percent-escapes may use either case of hex digit.
//! - [`ShareLink::encode`] writes the canonical form: `up`s, `down`s, `name`, `sni`, `pin`,
//!   then `cipher` only when it is not the default; every byte of a value outside
//!   `unreserved` is escaped with upper-case hex. Re-encoding a parsed link never makes it
//!   longer, and `encode(parse(x)) == x` for every `x` that `encode` wrote.
//! - In a shell, quote the link: `&`, `?` and `#` are special there.
//! - Error messages quote only parameter names, the version, and URLs, all of which come from
//!   before the `#`; the secret and the psk never appear in an error or in `Debug` output.

#![deny(missing_docs)]

use std::fmt;
use std::net::Ipv6Addr;

use zeroize::Zeroizing;

use crate::record::CipherSuite;

/// The scheme every share link starts with.
pub const SCHEME: &str = "halfpipe://";
/// The format version this module reads and writes.
pub const VERSION: &str = "v1";
/// The longest link accepted, in bytes (after trimming surrounding whitespace).
pub const MAX_LINK_LEN: usize = 8192;
/// The most URLs per direction.
pub const MAX_URLS: usize = 8;
/// The longest user name.
pub const MAX_NAME_LEN: usize = 64;

/// Characters of a base64 encoding of 32 bytes, without padding.
const KEY_CHARS: usize = 43;
/// The longest version string quoted back in [`LinkError::UnsupportedVersion`].
const MAX_QUOTED_VERSION: usize = 16;
/// The longest parameter name quoted back in [`LinkError::UnknownParameter`].
const MAX_QUOTED_KEY: usize = 32;

/// Everything a client needs to reach an exit as one user.
///
/// `Debug` shows every field except the user secret and the psk.
#[derive(Clone)]
pub struct ShareLink {
    /// The exit's static X25519 public key.
    pub server_public: [u8; 32],
    /// Uplink leg URLs, most preferred first (1 to [`MAX_URLS`]).
    pub uplinks: Vec<String>,
    /// Downlink leg URLs, most preferred first (1 to [`MAX_URLS`]).
    pub downlinks: Vec<String>,
    /// The user name, for display (1 to [`MAX_NAME_LEN`] of `A-Z a-z 0-9 . _ @ -`).
    pub user: String,
    /// TLS server name to send and verify instead of the URL's host.
    pub server_name: Option<String>,
    /// Certificate pin, `sha256/<base64>`.
    pub pin: Option<String>,
    /// The AEAD for the handshake and the records.
    pub cipher: CipherSuite,
    /// The user's static X25519 private key.
    pub user_secret: Zeroizing<[u8; 32]>,
    /// The Noise pre-shared key, when the exit uses one.
    pub psk: Option<Zeroizing<[u8; 32]>>,
}

impl fmt::Debug for ShareLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareLink")
            .field("server_public", &self.server_public)
            .field("uplinks", &self.uplinks)
            .field("downlinks", &self.downlinks)
            .field("user", &self.user)
            .field("server_name", &self.server_name)
            .field("pin", &self.pin)
            .field("cipher", &self.cipher)
            .field("user_secret", &"<redacted>")
            .field("psk", &self.psk.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Equality that compares the secret and the psk without early exit.
impl PartialEq for ShareLink {
    fn eq(&self, other: &Self) -> bool {
        let psk_eq = match (&self.psk, &other.psk) {
            (None, None) => true,
            (Some(a), Some(b)) => ct_eq(a, b),
            _ => false,
        };
        let secret_eq = ct_eq(&self.user_secret, &other.user_secret);
        self.server_public == other.server_public
            && self.uplinks == other.uplinks
            && self.downlinks == other.downlinks
            && self.user == other.user
            && self.server_name == other.server_name
            && self.pin == other.pin
            && self.cipher == other.cipher
            && secret_eq
            && psk_eq
    }
}

impl Eq for ShareLink {}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Why a share link was refused. No variant carries the secret or the psk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The text does not start with `halfpipe://`.
    #[error("not a halfpipe share link: a share link starts with halfpipe://")]
    NotAHalfpipeLink,
    /// A format version other than `v1` (quoted, cut to 16 characters).
    #[error(
        "share link version {0:?} is not supported: this halfpipe reads v1 links \
         (upgrade halfpipe, or ask for a v1 link)"
    )]
    UnsupportedVersion(String),
    /// The server key is not 43 base64url characters of 32 bytes, or is all zero.
    #[error(
        "the server key after halfpipe://v1/ is not 43 base64url characters encoding a \
         32-byte key (was the link cut or changed?)"
    )]
    BadServerKey,
    /// A character that no link contains: a space, a control or a non-ASCII character.
    #[error(
        "the share link has a space, control or non-ASCII character at position {position} \
         (counting from 1); was it wrapped or re-quoted when copied?"
    )]
    BadCharacter {
        /// 1-based character position in the trimmed link.
        position: usize,
    },
    /// A query part that is empty or has no `=`.
    #[error("parameter number {index} of the share link is empty or has no '=' (parameters are name=value, separated by &)")]
    MalformedQuery {
        /// 1-based position of the part in the query.
        index: usize,
    },
    /// A parameter this version does not know (quoted, cut to 32 characters).
    #[error(
        "unknown parameter {0:?} in the share link (v1 knows up, down, name, sni, pin, cipher)"
    )]
    UnknownParameter(String),
    /// A single-valued parameter given more than once.
    #[error("parameter {0:?} appears more than once in the share link")]
    Duplicate(String),
    /// A value with a malformed percent-escape or a character that must be escaped.
    #[error(
        "the value of {key:?} is not correctly percent-encoded: every character other than \
         A-Z a-z 0-9 - . _ ~ must be written %XX (':' is %3A, '/' is %2F), and no value may \
         decode to a space, control or non-ASCII character"
    )]
    BadEscape {
        /// The parameter whose value is malformed.
        key: String,
    },
    /// No `up` parameter.
    #[error("the share link has no uplink URL (up=...)")]
    MissingUplink,
    /// No `down` parameter.
    #[error("the share link has no downlink URL (down=...)")]
    MissingDownlink,
    /// A leg URL that is not valid.
    #[error("{which}link URL {url:?} is not valid: {reason}")]
    BadUrl {
        /// `"up"` or `"down"`.
        which: &'static str,
        /// The URL, percent-decoded.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// More than [`MAX_URLS`] URLs for one direction.
    #[error("the share link has more than {max} {which}link URLs", max = MAX_URLS)]
    TooManyUrls {
        /// `"up"` or `"down"`.
        which: &'static str,
    },
    /// No `name` parameter.
    #[error("the share link has no user name (name=...)")]
    MissingName,
    /// A user name outside 1 to 64 of `A-Z a-z 0-9 . _ @ -`.
    #[error("the user name must be 1 to 64 characters of A-Z a-z 0-9 . _ @ -")]
    BadName,
    /// An `sni` that is neither a DNS name nor an IP address.
    #[error(
        "the TLS server name (sni=...) must be a DNS name such as vpn.example.com or an IP address"
    )]
    BadServerName,
    /// A `pin` that is not `sha256/<base64 of 32 bytes>`.
    #[error(
        "the certificate pin must be sha256/ followed by the padded standard base64 of 32 \
         bytes, as printed by 'halfpipe cert gen'"
    )]
    BadPin,
    /// A `cipher` other than `aes-256-gcm` or `chacha20-poly1305`.
    #[error("the cipher must be aes-256-gcm or chacha20-poly1305")]
    BadCipher,
    /// No fragment, or an empty one.
    #[error(
        "the share link has no user secret: it goes after '#' at the end (was the link cut short?)"
    )]
    MissingSecret,
    /// The secret is not 43 base64url characters of 32 bytes, or is all zero.
    #[error("the user secret after '#' is not 43 base64url characters encoding a 32-byte key (was the link cut or changed?)")]
    BadSecret,
    /// The psk is not 43 base64url characters of 32 bytes, or is all zero.
    #[error("the pre-shared key after the secret's '.' is not 43 base64url characters encoding a 32-byte key (was the link cut or changed?)")]
    BadPsk,
    /// A link over [`MAX_LINK_LEN`] bytes.
    #[error("the share link is {len} bytes long; share links are at most {max} bytes", max = MAX_LINK_LEN)]
    TooLong {
        /// The length found (trimmed input for `parse`, encoding for `validate`).
        len: usize,
    },
}

impl ShareLink {
    /// Writes the link in canonical form (see the module documentation).
    ///
    /// The result holds the user secret, so it is zeroized on drop; it is built in one
    /// allocation of the exact size so that no partial copy is left behind. `encode` does
    /// not check the fields: call [`ShareLink::validate`] first for a link made by hand.
    pub fn encode(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(self.encoded_len()));
        out.push_str(SCHEME);
        out.push_str(VERSION);
        out.push('/');
        b64_encode(&self.server_public, URL_SAFE, false, &mut out);
        let mut sep = '?';
        for (key, value) in self.params() {
            out.push(sep);
            sep = '&';
            out.push_str(key);
            out.push('=');
            pct_encode(value, &mut out);
        }
        out.push('#');
        b64_encode(&self.user_secret[..], URL_SAFE, false, &mut out);
        if let Some(psk) = &self.psk {
            out.push('.');
            b64_encode(&psk[..], URL_SAFE, false, &mut out);
        }
        out
    }

    /// Parses a link, refusing anything not exactly as the module documentation describes.
    pub fn parse(s: &str) -> Result<ShareLink, LinkError> {
        let s = s.trim();
        if s.len() > MAX_LINK_LEN {
            return Err(LinkError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME).ok_or(LinkError::NotAHalfpipeLink)?;
        if let Some((i, _)) = s.chars().enumerate().find(|(_, c)| !c.is_ascii_graphic()) {
            return Err(LinkError::BadCharacter { position: i + 1 });
        }
        // From here on the link is visible ASCII, so every byte index is a char boundary.
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (version, rest) = rest.split_at(end);
        if version != VERSION {
            return Err(LinkError::UnsupportedVersion(
                version.chars().take(MAX_QUOTED_VERSION).collect(),
            ));
        }
        // Without a '#' there is no telling where a secret might sit, so nothing after the
        // version is looked at (and quoted in an error) before the fragment is found.
        let (rest, fragment) = rest.split_once('#').ok_or(LinkError::MissingSecret)?;
        if fragment.is_empty() {
            return Err(LinkError::MissingSecret);
        }
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, query),
            None => (rest, ""),
        };
        let server_public = path
            .strip_prefix('/')
            .and_then(decode_key)
            .ok_or(LinkError::BadServerKey)?;

        let mut uplinks = Vec::new();
        let mut downlinks = Vec::new();
        let mut user = None;
        let mut server_name = None;
        let mut pin = None;
        let mut cipher = None;
        let segments = query.split('&').filter(|_| !query.is_empty());
        for (i, segment) in segments.enumerate() {
            let (key, raw) = match segment.split_once('=') {
                Some((key, raw)) if !key.is_empty() => (key, raw),
                _ => return Err(LinkError::MalformedQuery { index: i + 1 }),
            };
            match key {
                "up" | "down" => {
                    let (list, which) = if key == "up" {
                        (&mut uplinks, "up")
                    } else {
                        (&mut downlinks, "down")
                    };
                    if list.len() == MAX_URLS {
                        return Err(LinkError::TooManyUrls { which });
                    }
                    list.push(pct_decode(key, raw)?);
                }
                "name" => single(&mut user, key, raw)?,
                "sni" => single(&mut server_name, key, raw)?,
                "pin" => single(&mut pin, key, raw)?,
                "cipher" => single(&mut cipher, key, raw)?,
                _ => {
                    return Err(LinkError::UnknownParameter(
                        key.chars().take(MAX_QUOTED_KEY).collect(),
                    ))
                }
            }
        }
        let cipher = match cipher {
            None => CipherSuite::default(),
            Some(name) => cipher_from_name(&name).ok_or(LinkError::BadCipher)?,
        };
        if uplinks.is_empty() {
            return Err(LinkError::MissingUplink);
        }
        if downlinks.is_empty() {
            return Err(LinkError::MissingDownlink);
        }
        let user = user.ok_or(LinkError::MissingName)?;

        let (secret_text, psk_text) = match fragment.split_once('.') {
            Some((secret, psk)) => (secret, Some(psk)),
            None => (fragment, None),
        };
        let mut user_secret = Zeroizing::new([0u8; 32]);
        if !b64_decode(secret_text, URL_SAFE, &mut user_secret[..]) {
            return Err(LinkError::BadSecret);
        }
        let psk = match psk_text {
            None => None,
            Some(text) => {
                let mut psk = Zeroizing::new([0u8; 32]);
                if !b64_decode(text, URL_SAFE, &mut psk[..]) {
                    return Err(LinkError::BadPsk);
                }
                Some(psk)
            }
        };

        let link = ShareLink {
            server_public,
            uplinks,
            downlinks,
            user,
            server_name,
            pin,
            cipher,
            user_secret,
            psk,
        };
        link.check_fields()?;
        Ok(link)
    }

    /// Checks every field as [`ShareLink::parse`] would, and that the encoding fits in
    /// [`MAX_LINK_LEN`]; `ctl users add` calls this before printing a link.
    pub fn validate(&self) -> Result<(), LinkError> {
        if self.user.is_empty() {
            return Err(LinkError::MissingName);
        }
        self.check_fields()?;
        let len = self.encoded_len();
        if len > MAX_LINK_LEN {
            return Err(LinkError::TooLong { len });
        }
        Ok(())
    }

    /// The checks on decoded fields, shared by `parse` and `validate`.
    fn check_fields(&self) -> Result<(), LinkError> {
        if is_zero(&self.server_public) {
            return Err(LinkError::BadServerKey);
        }
        check_urls("up", &self.uplinks)?;
        check_urls("down", &self.downlinks)?;
        if !is_name(&self.user) {
            return Err(LinkError::BadName);
        }
        if let Some(sni) = &self.server_name {
            if !is_server_name(sni) {
                return Err(LinkError::BadServerName);
            }
        }
        if let Some(pin) = &self.pin {
            if !is_pin(pin) {
                return Err(LinkError::BadPin);
            }
        }
        if is_zero(&self.user_secret) {
            return Err(LinkError::BadSecret);
        }
        if self.psk.as_ref().is_some_and(|psk| is_zero(psk)) {
            return Err(LinkError::BadPsk);
        }
        Ok(())
    }

    /// The query parameters in canonical order.
    fn params(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let ups = self.uplinks.iter().map(|u| ("up", u.as_str()));
        let downs = self.downlinks.iter().map(|u| ("down", u.as_str()));
        let name = std::iter::once(("name", self.user.as_str()));
        let sni = self.server_name.iter().map(|s| ("sni", s.as_str()));
        let pin = self.pin.iter().map(|p| ("pin", p.as_str()));
        let cipher = (self.cipher != CipherSuite::default())
            .then_some(("cipher", self.cipher.name()))
            .into_iter();
        ups.chain(downs)
            .chain(name)
            .chain(sni)
            .chain(pin)
            .chain(cipher)
    }

    /// The exact length of [`ShareLink::encode`]'s output.
    fn encoded_len(&self) -> usize {
        let keys = 1 + usize::from(self.psk.is_some());
        let params: usize = self
            .params()
            .map(|(key, value)| 1 + key.len() + 1 + pct_len(value))
            .sum();
        SCHEME.len() + VERSION.len() + 1 + KEY_CHARS + params + keys * (1 + KEY_CHARS)
    }
}

/// Stores the decoded value of a single-valued parameter, refusing a repeat.
fn single(slot: &mut Option<String>, key: &str, raw: &str) -> Result<(), LinkError> {
    if slot.is_some() {
        return Err(LinkError::Duplicate(key.to_owned()));
    }
    *slot = Some(pct_decode(key, raw)?);
    Ok(())
}

fn cipher_from_name(name: &str) -> Option<CipherSuite> {
    [CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305]
        .into_iter()
        .find(|c| c.name() == name)
}

fn is_zero(key: &[u8; 32]) -> bool {
    key.iter().all(|&b| b == 0)
}

fn decode_key(text: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    b64_decode(text, URL_SAFE, &mut key).then_some(key)
}

// ---------------------------------------------------------------------------------------
// Field checks
// ---------------------------------------------------------------------------------------

fn check_urls(which: &'static str, urls: &[String]) -> Result<(), LinkError> {
    if urls.is_empty() {
        return Err(if which == "up" {
            LinkError::MissingUplink
        } else {
            LinkError::MissingDownlink
        });
    }
    if urls.len() > MAX_URLS {
        return Err(LinkError::TooManyUrls { which });
    }
    for (i, url) in urls.iter().enumerate() {
        let bad = |reason| LinkError::BadUrl {
            which,
            url: url.clone(),
            reason,
        };
        check_url(url).map_err(bad)?;
        if urls[..i].contains(url) {
            return Err(bad("it is listed twice"));
        }
    }
    Ok(())
}

/// Checks a leg URL; the error is the reason, for [`LinkError::BadUrl`].
fn check_url(url: &str) -> Result<(), &'static str> {
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("it contains a space, control or non-ASCII character");
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("it must be scheme://host:port, as in tls://vpn.example.com:443")?;
    let http = match scheme {
        "tcp" | "tls" | "quic" => false,
        "ws" | "wss" | "wt" => true,
        _ => return Err("the scheme must be one of tcp, tls, quic, ws, wss, wt"),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("user information (user@) is not allowed");
    }
    if authority.contains(['?', '#']) || path.contains(['?', '#']) {
        return Err("a query (?) or fragment (#) is not allowed");
    }
    match (http, path.is_empty()) {
        (true, true) => {
            return Err(
                "ws, wss and wt URLs need a path starting with '/', as in wss://host:443/api",
            )
        }
        (false, false) => {
            return Err("tcp, tls and quic URLs take no path: write scheme://host:port")
        }
        _ => {}
    }
    let port = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("an IPv6 address needs its closing ']'")?;
        if host.is_empty() {
            return Err("the host is empty");
        }
        if host.parse::<Ipv6Addr>().is_err() {
            return Err("the host in brackets is not an IPv6 address");
        }
        let port = after
            .strip_prefix(':')
            .ok_or("a port is required, as in [::1]:443")?;
        port
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or("a port is required, as in host:443")?;
        if host.is_empty() {
            return Err("the host is empty");
        }
        if host.contains(':') {
            return Err("an IPv6 address must be in brackets, as in [::1]:443");
        }
        if !is_hostname(host) {
            return Err(
                "the host is not a valid host name (labels of A-Z a-z 0-9 - _ separated by dots)",
            );
        }
        port
    };
    if !is_port(port) {
        return Err("the port must be a number from 1 to 65535 without leading zeros");
    }
    check_path(path)
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if path.contains("..") {
        return Err("'..' is not allowed in the path");
    }
    let b = path.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            match (
                b.get(i + 1).and_then(hex_value),
                b.get(i + 2).and_then(hex_value),
            ) {
                (Some(_), Some(_)) => i += 3,
                _ => return Err("a '%' in the path must be followed by two hex digits"),
            }
        } else if is_unreserved(c) || b"!$&'()*+,;=:@/".contains(&c) {
            i += 1;
        } else {
            return Err("the path has a character that must be percent-encoded");
        }
    }
    Ok(())
}

fn is_port(port: &str) -> bool {
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && !port.starts_with('0')
        && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p))
}

fn is_hostname(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn is_server_name(name: &str) -> bool {
    is_hostname(name) || name.parse::<Ipv6Addr>().is_ok()
}

fn is_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
}

fn is_pin(pin: &str) -> bool {
    let mut digest = [0u8; 32];
    pin.strip_prefix("sha256/")
        .and_then(|b64| b64.strip_suffix('='))
        .is_some_and(|b64| b64_decode(b64, STANDARD, &mut digest))
}

// ---------------------------------------------------------------------------------------
// Percent-encoding (RFC 3986 §2.1)
// ---------------------------------------------------------------------------------------

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(c: &u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn pct_encode(value: &str, out: &mut String) {
    for b in value.bytes() {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX_UPPER[usize::from(b >> 4)]));
            out.push(char::from(HEX_UPPER[usize::from(b & 15)]));
        }
    }
}

fn pct_len(value: &str) -> usize {
    value
        .bytes()
        .map(|b| if is_unreserved(b) { 1 } else { 3 })
        .sum()
}

/// Decodes a query value; every decoded byte is visible ASCII.
fn pct_decode(key: &str, raw: &str) -> Result<String, LinkError> {
    let bad = || LinkError::BadEscape {
        key: key.to_owned(),
    };
    let b = raw.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hi = b.get(i + 1).and_then(hex_value).ok_or_else(bad)?;
            let lo = b.get(i + 2).and_then(hex_value).ok_or_else(bad)?;
            let d = (hi << 4) | lo;
            if !d.is_ascii_graphic() {
                return Err(bad());
            }
            out.push(char::from(d));
            i += 3;
        } else if is_unreserved(c) {
            out.push(char::from(c));
            i += 1;
        } else {
            return Err(bad());
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Base64 (RFC 4648 §4 and §5), for the fixed-size values in links
// ---------------------------------------------------------------------------------------

const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(bytes: &[u8], alphabet: &[u8; 64], pad: bool, out: &mut String) {
    for chunk in bytes.chunks(3) {
        let mut group = [0u8; 3];
        for (g, b) in group.iter_mut().zip(chunk) {
            *g = *b;
        }
        let n = (u32::from(group[0]) << 16) | (u32::from(group[1]) << 8) | u32::from(group[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let index = (n >> (18 - 6 * i)) & 63;
                out.push(char::from(alphabet[index as usize]));
            } else if pad {
                out.push('=');
            }
        }
        group.fill(0);
    }
}

fn b64_value(alphabet: &[u8; 64], c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        _ if c == alphabet[62] => 62,
        _ if c == alphabet[63] => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Decodes unpadded base64 that must fill `out` exactly, with zero trailing bits (so each
/// value has one spelling). Returns false, with `out` cleared, on anything else.
fn b64_decode(text: &str, alphabet: &[u8; 64], out: &mut [u8]) -> bool {
    let rem = out.len() % 3;
    let want = out.len() / 3 * 4 + if rem == 0 { 0 } else { rem + 1 };
    if text.len() != want {
        return false;
    }
    let mut acc = 0u32;
    let mut bits = 0u32;
    let mut n = 0;
    let mut ok = true;
    for c in text.bytes() {
        let Some(v) = b64_value(alphabet, c) else {
            ok = false;
            break;
        };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            if let Some(slot) = out.get_mut(n) {
                *slot = (acc >> bits) as u8;
            }
            n += 1;
        }
        acc &= (1 << bits) - 1;
    }
    let ok = ok && n == out.len() && acc == 0;
    if !ok {
        out.fill(0);
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [0x11; 32];
    const SECRET: [u8; 32] = [0x22; 32];
    const PSK: [u8; 32] = [0x44; 32];

    fn b64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
        let mut s = String::new();
        b64_encode(bytes, alphabet, pad, &mut s);
        s
    }

    fn key_b64() -> String {
        b64(&KEY, URL_SAFE, false)
    }
    fn secret_b64() -> String {
        b64(&SECRET, URL_SAFE, false)
    }
    fn psk_b64() -> String {
        b64(&PSK, URL_SAFE, false)
    }

    fn pct(s: &str) -> String {
        let mut out = String::new();
        pct_encode(s, &mut out);
        out
    }

    fn sample() -> ShareLink {
        ShareLink {
            server_public: KEY,
            uplinks: vec!["wss://cdn.example.com:443/api".into()],
            downlinks: vec!["quic://exit.example.com:443".into()],
            user: "alice".into(),
            server_name: None,
            pin: None,
            cipher: CipherSuite::Aes256Gcm,
            user_secret: Zeroizing::new(SECRET),
            psk: None,
        }
    }

    fn pin_of(byte: u8) -> String {
        format!("sha256/{}", b64(&[byte; 32], STANDARD, true))
    }

    /// A link with the given query and a valid secret and psk.
    fn with_query(query: &str) -> String {
        format!(
            "halfpipe://v1/{}?{query}#{}.{}",
            key_b64(),
            secret_b64(),
            psk_b64()
        )
    }

    const OK_QUERY: &str = "up=tls%3A%2F%2Fh%3A443&down=tls%3A%2F%2Fh%3A8443&name=alice";

    /// Parses, expects an error, and checks that no message quotes the secret or the psk.
    fn err(link: &str) -> LinkError {
        let e = ShareLink::parse(link).expect_err(link);
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(&secret_b64()), "{shown}");
        assert!(!shown.contains(&psk_b64()), "{shown}");
        e
    }

    fn bad_url(url: &str) -> &'static str {
        let link = with_query(&format!("up={}&down=tls%3A%2F%2Fh%3A1&name=a", pct(url)));
        match err(&link) {
            LinkError::BadUrl {
                which,
                url: got,
                reason,
            } => {
                assert_eq!((which, got.as_str()), ("up", url));
                reason
            }
            other => panic!("{url}: {other:?}"),
        }
    }

    fn roundtrip(link: &ShareLink) {
        link.validate().unwrap();
        let text = link.encode();
        assert_eq!(text.len(), link.encoded_len());
        let parsed = ShareLink::parse(&text).unwrap();
        assert_eq!(&parsed, link);
        assert_eq!(parsed.encode(), text);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64(raw.as_bytes(), STANDARD, true), enc);
            let nopad = enc.trim_end_matches('=');
            let mut out = vec![0u8; raw.len()];
            assert!(b64_decode(nopad, STANDARD, &mut out), "{enc}");
            assert_eq!(out, raw.as_bytes());
        }
        assert_eq!(b64(&[0xfb, 0xff], URL_SAFE, false), "-_8");
        assert_eq!(b64(&[0xfb, 0xff], STANDARD, false), "+/8");
        let mut two = [0u8; 2];
        assert!(b64_decode("-_8", URL_SAFE, &mut two));
        assert_eq!(two, [0xfb, 0xff]);
        assert!(!b64_decode("+/8", URL_SAFE, &mut two));
        assert!(
            !b64_decode("-_9", URL_SAFE, &mut two),
            "non-zero trailing bits"
        );
        assert_eq!(two, [0, 0], "cleared on failure");
        assert!(!b64_decode("-_", URL_SAFE, &mut two));
        assert!(!b64_decode("-_8A", URL_SAFE, &mut two));
        assert!(!b64_decode("Zg=", STANDARD, &mut [0u8; 2]));
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(pct("wss://h:1/a b~"), "wss%3A%2F%2Fh%3A1%2Fa%20b~");
        assert_eq!(pct_decode("k", "wss%3a%2F%2Fh").unwrap(), "wss://h");
        assert_eq!(pct_decode("k", "").unwrap(), "");
        for bad in [
            "%", "%4", "%G0", "%20", "%0A", "%7F", "%C3%A9", "a:b", "a+b", "a/b",
        ] {
            assert_eq!(
                pct_decode("k", bad),
                Err(LinkError::BadEscape { key: "k".into() }),
                "{bad}"
            );
        }
    }

    #[test]
    fn doc_example_is_canonical() {
        let link = ShareLink {
            uplinks: vec![
                "wss://cdn.example.com:443/api".into(),
                "tls://[2001:db8::1]:8443".into(),
            ],
            user: "alice@corp".into(),
            server_name: Some("vpn.example.com".into()),
            pin: Some(pin_of(0x33)),
            cipher: CipherSuite::ChaCha20Poly1305,
            psk: Some(Zeroizing::new(PSK)),
            ..sample()
        };
        roundtrip(&link);
        let expected = "halfpipe://v1/ERERERERERERERERERERERERERERERERERERERERERE\
            ?up=wss%3A%2F%2Fcdn.example.com%3A443%2Fapi\
            &up=tls%3A%2F%2F%5B2001%3Adb8%3A%3A1%5D%3A8443\
            &down=quic%3A%2F%2Fexit.example.com%3A443\
            &name=alice%40corp\
            &sni=vpn.example.com\
            &pin=sha256%2FMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzM%3D\
            &cipher=chacha20-poly1305\
            #IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI\
            .REREREREREREREREREREREREREREREREREREREREREQ";
        assert_eq!(link.encode().as_str(), expected);
    }

    #[test]
    fn roundtrips() {
        // One URL each, defaults.
        roundtrip(&sample());
        // The default cipher is not written; chacha is.
        assert!(!sample().encode().contains("cipher"));
        // Several each, every scheme, IPv6 hosts.
        roundtrip(&ShareLink {
            uplinks: vec![
                "wss://cdn.example.com:443/api".into(),
                "ws://127.0.0.1:8080/".into(),
                "tcp://[::1]:443".into(),
            ],
            downlinks: vec![
                "quic://exit.example.com:443".into(),
                "wt://[::1]:443/wt/path".into(),
                "tls://[2001:db8::7]:65535".into(),
                "tcp://10.0.0.1:1".into(),
            ],
            ..sample()
        });
        // All options.
        roundtrip(&ShareLink {
            user: "bob.smith_2@corp-x".into(),
            server_name: Some("vpn.example.com".into()),
            pin: Some(pin_of(0xfe)),
            cipher: CipherSuite::ChaCha20Poly1305,
            psk: Some(Zeroizing::new(PSK)),
            ..sample()
        });
        // Options one at a time, an IP as server name.
        roundtrip(&ShareLink {
            server_name: Some("::1".into()),
            ..sample()
        });
        roundtrip(&ShareLink {
            pin: Some(pin_of(0)),
            ..sample()
        });
        roundtrip(&ShareLink {
            psk: Some(Zeroizing::new(PSK)),
            ..sample()
        });
        // Eight URLs each, the maximum.
        roundtrip(&ShareLink {
            uplinks: (1..=8).map(|p| format!("tls://h:{p}")).collect(),
            downlinks: (1..=8).map(|p| format!("wss://h:{p}/x")).collect(),
            ..sample()
        });
    }

    #[test]
    fn parse_is_lenient_only_where_documented() {
        let canonical = sample().encode();
        // Surrounding whitespace.
        let padded = format!(" \t\r\n{}\n\n", canonical.as_str());
        assert_eq!(ShareLink::parse(&padded).unwrap(), sample());
        // Any parameter order, lower-case escapes, needless escapes, explicit default cipher.
        let shuffled = with_query(
            "name=%61lice&down=quic%3a%2f%2fexit.example.com%3a443&cipher=aes-256-gcm\
             &up=wss%3A%2F%2Fcdn.example.com%3A443%2Fapi",
        );
        let parsed = ShareLink::parse(&shuffled).unwrap();
        assert_eq!(
            parsed,
            ShareLink {
                psk: Some(Zeroizing::new(PSK)),
                ..sample()
            }
        );
        assert!(parsed.encode().len() < shuffled.len());
        // The relative order of the ups is kept.
        let two = ShareLink::parse(&with_query(
            "up=tls%3A%2F%2Fb%3A1&down=tls%3A%2F%2Fh%3A1&up=tls%3A%2F%2Fa%3A1&name=a",
        ))
        .unwrap();
        assert_eq!(two.uplinks, ["tls://b:1", "tls://a:1"]);
    }

    #[test]
    fn debug_redacts_secrets() {
        let link = ShareLink {
            psk: Some(Zeroizing::new(PSK)),
            ..sample()
        };
        let shown = format!("{link:?} {link:#?}");
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains("alice"));
        for secret in [SECRET, PSK] {
            assert!(!shown.contains(&format!("{:?}", secret)), "{shown}");
            assert!(!shown.contains(&format!("{}", secret[0])), "{shown}");
            assert!(!shown.contains(&b64(&secret, URL_SAFE, false)));
        }
    }

    #[test]
    fn equality_covers_secrets() {
        let a = sample();
        let mut b = sample();
        b.user_secret[31] ^= 1;
        assert_ne!(a, b);
        let c = ShareLink {
            psk: Some(Zeroizing::new(PSK)),
            ..sample()
        };
        assert_ne!(a, c);
        assert_eq!(a, sample());
    }

    #[test]
    fn every_error_is_reachable() {
        use LinkError as E;
        let key = key_b64();
        let secret = secret_b64();
        let psk = psk_b64();

        assert_eq!(
            err(&"x".repeat(MAX_LINK_LEN + 1)),
            E::TooLong {
                len: MAX_LINK_LEN + 1
            }
        );
        let long = with_query(&format!("{OK_QUERY}&sni={}", "a".repeat(MAX_LINK_LEN)));
        assert!(matches!(err(&long), E::TooLong { .. }));

        for s in [
            "",
            "https://example.com/",
            "halfpipe:/v1/x",
            "HALFPIPE://v1/x",
            "halfpipe//v1",
        ] {
            assert_eq!(err(s), E::NotAHalfpipeLink, "{s}");
        }

        let spaced = with_query(OK_QUERY).replacen("&", " &", 1);
        let at = spaced.find(' ').unwrap() + 1;
        assert_eq!(err(&spaced), E::BadCharacter { position: at });
        assert_eq!(
            err("halfpipe://v1/\u{e9}"),
            E::BadCharacter { position: 15 }
        );

        assert_eq!(
            err(&format!("halfpipe://v2/{key}?{OK_QUERY}#{secret}")),
            E::UnsupportedVersion("v2".into())
        );
        assert_eq!(err("halfpipe://"), E::UnsupportedVersion(String::new()));
        assert_eq!(
            err(&format!("halfpipe://{}", "v".repeat(40))),
            E::UnsupportedVersion("v".repeat(MAX_QUOTED_VERSION))
        );

        for k in [
            String::new(),
            key[..42].to_owned(),
            format!("{key}A"),
            format!("{}F", &key[..42]), // non-zero trailing bits
            format!("{}+", &key[..42]), // standard alphabet
            format!("{key}/"),
            b64(&[0; 32], URL_SAFE, false),
        ] {
            assert_eq!(
                err(&format!("halfpipe://v1/{k}?{OK_QUERY}#{secret}")),
                E::BadServerKey,
                "{k}"
            );
        }
        assert_eq!(
            err(&format!("halfpipe://v1?{OK_QUERY}#{secret}")),
            E::BadServerKey
        );

        assert_eq!(err(&with_query("")), E::MissingUplink);
        assert_eq!(
            err(&with_query(&format!("{OK_QUERY}&"))),
            E::MalformedQuery { index: 4 }
        );
        assert_eq!(
            err(&with_query(&format!("{OK_QUERY}&&x"))),
            E::MalformedQuery { index: 4 }
        );
        assert_eq!(err(&with_query("name")), E::MalformedQuery { index: 1 });
        assert_eq!(err(&with_query("=x")), E::MalformedQuery { index: 1 });

        assert_eq!(
            err(&with_query(&format!("{OK_QUERY}&insecure=1"))),
            E::UnknownParameter("insecure".into())
        );
        assert_eq!(
            err(&with_query(&format!("{OK_QUERY}&UP=x"))),
            E::UnknownParameter("UP".into())
        );
        assert_eq!(
            err(&with_query(&format!("{}=1", "k".repeat(100)))),
            E::UnknownParameter("k".repeat(MAX_QUOTED_KEY))
        );

        for k in ["name", "sni", "pin", "cipher"] {
            assert_eq!(
                err(&with_query(&format!("{OK_QUERY}&{k}=a&{k}=a"))),
                E::Duplicate(k.into()),
                "{k}"
            );
        }

        assert_eq!(
            err(&with_query("up=tls://h:443&down=tls%3A%2F%2Fh%3A1&name=a")),
            E::BadEscape { key: "up".into() }
        );
        assert_eq!(
            err(&with_query(&format!("{OK_QUERY}&sni=a%2"))),
            E::BadEscape { key: "sni".into() }
        );

        assert_eq!(
            err(&with_query("down=tls%3A%2F%2Fh%3A1&name=a")),
            E::MissingUplink
        );
        assert_eq!(
            err(&with_query("up=tls%3A%2F%2Fh%3A1&name=a")),
            E::MissingDownlink
        );
        assert_eq!(
            err(&with_query("up=tls%3A%2F%2Fh%3A1&down=tls%3A%2F%2Fh%3A1")),
            E::MissingName
        );

        let nine = (1..=9)
            .map(|p| format!("down={}", pct(&format!("tls://h:{p}"))))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(
            err(&with_query(&format!("up=tls%3A%2F%2Fh%3A1&{nine}&name=a"))),
            E::TooManyUrls { which: "down" }
        );

        for name in [
            "",
            "al ice",
            "al%20ice",
            "al/ice",
            "\u{e9}",
            &"a".repeat(65),
            "a+b",
        ] {
            let q = format!(
                "up=tls%3A%2F%2Fh%3A1&down=tls%3A%2F%2Fh%3A1&name={}",
                pct(name)
            );
            assert!(
                matches!(err(&with_query(&q)), E::BadName | E::BadEscape { .. }),
                "{name}"
            );
        }
        assert_eq!(
            err(&with_query(
                "up=tls%3A%2F%2Fh%3A1&down=tls%3A%2F%2Fh%3A1&name=a%2Fb"
            )),
            E::BadName
        );
        assert_eq!(
            err(&with_query(
                "up=tls%3A%2F%2Fh%3A1&down=tls%3A%2F%2Fh%3A1&name="
            )),
            E::BadName
        );
        ShareLink::parse(&with_query(&format!(
            "up=tls%3A%2F%2Fh%3A1&down=tls%3A%2F%2Fh%3A1&name={}",
            "a".repeat(64)
        )))
        .unwrap();

        for sni in ["", "-a.com", "a..b", "a.com.", "a%2Fb", "::g", "[::1]"] {
            let e = err(&with_query(&format!("{OK_QUERY}&sni={}", pct(sni))));
            assert_eq!(e, E::BadServerName, "{sni}");
        }

        let good_pin = pin_of(7);
        for pin in [
            "sha256/AAAA".to_owned(),
            good_pin.replace("sha256/", "sha1/"),
            good_pin.trim_end_matches('=').to_owned(),
            format!("{good_pin}="),
            good_pin.replace('/', "_"),
            format!(
                "sha256/{}=",
                b64(&[7; 32], URL_SAFE, false).replace('B', "_")
            ),
            "sha256/".to_owned(),
        ] {
            let e = err(&with_query(&format!("{OK_QUERY}&pin={}", pct(&pin))));
            assert_eq!(e, E::BadPin, "{pin}");
        }

        for cipher in ["", "aes", "AES-256-GCM", "chacha20"] {
            let e = err(&with_query(&format!("{OK_QUERY}&cipher={cipher}")));
            assert_eq!(e, E::BadCipher, "{cipher}");
        }

        let head = format!("halfpipe://v1/{key}?{OK_QUERY}");
        assert_eq!(err(&head), E::MissingSecret);
        assert_eq!(err(&format!("{head}#")), E::MissingSecret);
        // Without '#' nothing in the query is quoted, even when it is wrong: the secret
        // could be anywhere.
        assert_eq!(
            err(&format!("halfpipe://v1/{key}?up=zz%3A%2F%2F{secret}")),
            E::MissingSecret
        );

        for s in [
            ".".to_owned(),
            secret[..42].to_owned(),
            format!("{secret}A"),
            format!("{}J", &secret[..42]),
            b64(&[0; 32], URL_SAFE, false),
            format!("{secret}#"),
        ] {
            assert_eq!(err(&format!("{head}#{s}")), E::BadSecret, "{s}");
            assert_eq!(err(&format!("{head}#{s}.{psk}")), E::BadSecret, "{s}");
        }

        for p in [
            String::new(),
            psk[..42].to_owned(),
            format!("{psk}.{psk}"),
            format!("{psk}."),
            b64(&[0; 32], URL_SAFE, false),
        ] {
            assert_eq!(err(&format!("{head}#{secret}.{p}")), E::BadPsk, "{p}");
        }
    }

    #[test]
    fn url_checks() {
        for ok in [
            "tcp://h:1",
            "tls://vpn.example.com:443",
            "quic://10.0.0.1:65535",
            "tls://[::1]:443",
            "tls://[::ffff:1.2.3.4]:443",
            "ws://h_x:80/",
            "wss://cdn.example.com:443/api/v1/stream",
            "wt://[2001:db8::1]:443/p%20q;x=1",
        ] {
            let link = with_query(&format!("up={}&down={}&name=a", pct(ok), pct(ok)));
            ShareLink::parse(&link).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let cases = [
            ("h:1", "scheme://"),
            ("udp://h:1", "scheme must be"),
            ("TLS://h:1", "scheme must be"),
            ("https://h:443/", "scheme must be"),
            ("tls://h:1/", "take no path"),
            ("quic://h:1/x", "take no path"),
            ("wss://h:443", "need a path"),
            ("wt://[::1]:443", "need a path"),
            ("tls://u@h:1", "user information"),
            ("wss://h:1/a?b", "query"),
            ("tls://h:1?x", "query"),
            ("wss://h:1/a#b", "query"),
            ("tls://h", "port is required"),
            ("tls://[::1]", "port is required"),
            ("tls://[::1]443", "port is required"),
            ("tls://h:", "port must be"),
            ("tls://h:0", "port must be"),
            ("tls://h:65536", "port must be"),
            ("tls://h:99999", "port must be"),
            ("tls://h:0443", "port must be"),
            ("tls://h:+443", "port must be"),
            ("tls://h:1x", "port must be"),
            ("tls://:1", "host is empty"),
            ("tls://[]:1", "host is empty"),
            ("tls://[::1:1", "closing"),
            ("tls://[vpn]:1", "not an IPv6"),
            ("tls://::1:443", "in brackets"),
            ("tls://a..b:1", "not a valid host"),
            ("tls://-a:1", "not a valid host"),
            ("tls://a!b:1", "not a valid host"),
            ("wss://h:1/a/../b", "'..'"),
            ("wss://h:1/a%2", "two hex digits"),
            ("wss://h:1/a%zz", "two hex digits"),
            ("wss://h:1/a\"b", "must be percent-encoded"),
            ("wss://h:1/a\\b", "must be percent-encoded"),
        ];
        for (url, reason) in cases {
            let got = bad_url(url);
            assert!(got.contains(reason), "{url}: {got}");
        }
        // A repeat, and the message names the URL and the direction.
        let link = with_query(&format!(
            "up={u}&down={d}&down={d}&name=a",
            u = pct("tls://h:1"),
            d = pct("tls://h:2")
        ));
        let e = err(&link);
        assert_eq!(
            e,
            LinkError::BadUrl {
                which: "down",
                url: "tls://h:2".into(),
                reason: "it is listed twice"
            }
        );
        assert_eq!(
            e.to_string(),
            "downlink URL \"tls://h:2\" is not valid: it is listed twice"
        );
    }

    #[test]
    fn validate_checks_hand_made_links() {
        use LinkError as E;
        sample().validate().unwrap();
        let cases: [(ShareLink, E); 8] = [
            (
                ShareLink {
                    uplinks: vec![],
                    ..sample()
                },
                E::MissingUplink,
            ),
            (
                ShareLink {
                    downlinks: vec![],
                    ..sample()
                },
                E::MissingDownlink,
            ),
            (
                ShareLink {
                    uplinks: (1..=9).map(|p| format!("tls://h:{p}")).collect(),
                    ..sample()
                },
                E::TooManyUrls { which: "up" },
            ),
            (
                ShareLink {
                    user: String::new(),
                    ..sample()
                },
                E::MissingName,
            ),
            (
                ShareLink {
                    user: "a b".into(),
                    ..sample()
                },
                E::BadName,
            ),
            (
                ShareLink {
                    server_public: [0; 32],
                    ..sample()
                },
                E::BadServerKey,
            ),
            (
                ShareLink {
                    user_secret: Zeroizing::new([0; 32]),
                    ..sample()
                },
                E::BadSecret,
            ),
            (
                ShareLink {
                    pin: Some("sha256/x".into()),
                    ..sample()
                },
                E::BadPin,
            ),
        ];
        for (link, want) in cases {
            assert_eq!(link.validate(), Err(want));
        }
        let long = ShareLink {
            uplinks: vec![format!("wss://h:1/{}", "p".repeat(MAX_LINK_LEN))],
            ..sample()
        };
        let len = long.encode().len();
        assert!(len > MAX_LINK_LEN);
        assert_eq!(long.validate(), Err(E::TooLong { len }));
        // encode writes even an invalid link, and parse refuses it.
        let bad = ShareLink {
            user: "a b".into(),
            ..sample()
        };
        assert_eq!(
            ShareLink::parse(&bad.encode()),
            Err(E::BadEscape { key: "name".into() })
        );
    }

    // -----------------------------------------------------------------------------------
    // Properties
    // -----------------------------------------------------------------------------------

    fn arb_key() -> impl Strategy<Value = [u8; 32]> {
        any::<[u8; 32]>().prop_filter("non-zero", |k| !is_zero(k))
    }

    fn arb_host() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]([a-z0-9_-]{0,10}[a-z0-9])?(\\.[a-z0-9]{1,8}){0,3}",
            (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
                .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
            any::<u128>().prop_map(|v| format!("[{}]", Ipv6Addr::from(v))),
            Just("[::1]".to_owned()),
        ]
    }

    fn arb_url() -> impl Strategy<Value = String> {
        let scheme = prop::sample::select(vec!["tcp", "tls", "quic", "ws", "wss", "wt"]);
        let path = "(/[A-Za-z0-9_~;=!$*+,:@-]{0,8}|/%[0-9A-F]{2}){1,3}";
        (scheme, arb_host(), 1u16..=65535, path).prop_map(|(scheme, host, port, path)| {
            if matches!(scheme, "ws" | "wss" | "wt") {
                format!("{scheme}://{host}:{port}{path}")
            } else {
                format!("{scheme}://{host}:{port}")
            }
        })
    }

    fn arb_urls() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(arb_url(), 1..=MAX_URLS).prop_map(|mut urls| {
            let mut seen = Vec::new();
            urls.retain(|u| {
                let new = !seen.contains(u);
                seen.push(u.clone());
                new
            });
            urls
        })
    }

    prop_compose! {
        fn arb_link()(
            server_public in arb_key(),
            uplinks in arb_urls(),
            downlinks in arb_urls(),
            user in "[A-Za-z0-9._@-]{1,64}",
            server_name in prop::option::of(prop_oneof![
                "[a-z]{1,10}(\\.[a-z]{1,10}){0,2}",
                Just("::1".to_owned()),
                Just("192.0.2.1".to_owned()),
            ]),
            pin in prop::option::of(any::<[u8; 32]>()),
            chacha in any::<bool>(),
            user_secret in arb_key(),
            psk in prop::option::of(arb_key()),
        ) -> ShareLink {
            ShareLink {
                server_public,
                uplinks,
                downlinks,
                user,
                server_name,
                pin: pin.map(|p| format!("sha256/{}", b64(&p, STANDARD, true))),
                cipher: if chacha { CipherSuite::ChaCha20Poly1305 } else { CipherSuite::Aes256Gcm },
                user_secret: Zeroizing::new(user_secret),
                psk: psk.map(Zeroizing::new),
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Mutation {
        Replace(usize, char),
        Insert(usize, char),
        Delete(usize),
        Truncate(usize),
        Swap(usize, usize),
    }

    fn arb_char() -> impl Strategy<Value = char> {
        prop_oneof![
            prop::sample::select(
                "#?&=%./:_-~+ \t\nAaZz09G\u{e9}\u{200b}"
                    .chars()
                    .collect::<Vec<_>>()
            ),
            any::<char>(),
        ]
    }

    fn arb_mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), arb_char()).prop_map(|(i, c)| Mutation::Replace(i, c)),
            (any::<usize>(), arb_char()).prop_map(|(i, c)| Mutation::Insert(i, c)),
            any::<usize>().prop_map(Mutation::Delete),
            any::<usize>().prop_map(Mutation::Truncate),
            (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Mutation::Swap(i, j)),
        ]
    }

    fn mutate(text: &str, mutations: &[Mutation]) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        for m in mutations {
            let n = chars.len().max(1);
            match *m {
                Mutation::Replace(i, c) => {
                    if let Some(slot) = chars.get_mut(i % n) {
                        *slot = c;
                    }
                }
                Mutation::Insert(i, c) => chars.insert(i % (chars.len() + 1), c),
                Mutation::Delete(i) => {
                    if !chars.is_empty() {
                        chars.remove(i % n);
                    }
                }
                Mutation::Truncate(i) => chars.truncate(i % n),
                Mutation::Swap(i, j) => {
                    if !chars.is_empty() {
                        chars.swap(i % n, j % n);
                    }
                }
            }
        }
        chars.into_iter().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn encoded_links_roundtrip(link in arb_link()) {
            prop_assert_eq!(link.validate(), Ok(()));
            let text = link.encode();
            prop_assert_eq!(text.len(), link.encoded_len());
            prop_assert!(text.len() <= MAX_LINK_LEN);
            prop_assert!(text.bytes().all(|b| b.is_ascii_graphic()));
            let parsed = ShareLink::parse(&text).unwrap();
            prop_assert_eq!(&parsed, &link);
            prop_assert_eq!(parsed.encode(), text);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let _ = ShareLink::parse(&s);
            let _ = ShareLink::parse(&format!("halfpipe://v1/{s}"));
        }

        #[test]
        fn link_alphabet_strings_never_panic(s in "[a-z0-9%#?&=./:_~+-]{0,200}") {
            let _ = ShareLink::parse(&format!("halfpipe://{s}"));
        }

        #[test]
        fn mutated_links_never_panic_nor_leak(
            link in arb_link(),
            mutations in prop::collection::vec(arb_mutation(), 1..4),
        ) {
            let text = link.encode();
            let mutated = mutate(&text, &mutations);
            match ShareLink::parse(&mutated) {
                Ok(parsed) => {
                    // Whatever parse accepts re-encodes to a link it accepts again, no longer.
                    let again = parsed.encode();
                    prop_assert!(again.len() <= mutated.trim().len());
                    prop_assert_eq!(ShareLink::parse(&again), Ok(parsed));
                }
                Err(e) => {
                    let shown = format!("{e} {e:?}");
                    let secret = b64(&link.user_secret[..], URL_SAFE, false);
                    prop_assert!(!shown.contains(&secret), "{}", shown);
                    if let Some(psk) = &link.psk {
                        let psk = b64(&psk[..], URL_SAFE, false);
                        prop_assert!(!shown.contains(&psk), "{}", shown);
                    }
                }
            }
        }

        #[test]
        fn errors_with_a_valid_secret_never_show_it(
            link in arb_link(),
            junk in "[A-Za-z0-9%._~-]{0,20}",
            which in 0usize..6,
        ) {
            // Break one thing before the '#' and keep a valid secret and psk after it.
            let text = link.encode();
            let (head, fragment) = text.split_once('#').unwrap();
            let broken_head = match which {
                0 => format!("{head}&up={junk}"),
                1 => format!("{head}&down=x{junk}"),
                2 => format!("{head}&{junk}=1"),
                3 => format!("{head}&name=%{junk}"),
                4 => head.replacen("/v1/", &format!("/v1/{junk}"), 1),
                _ => head.replacen("v1", &format!("v{junk}"), 1),
            };
            let broken = format!("{broken_head}#{fragment}");
            if let Err(e) = ShareLink::parse(&broken) {
                let shown = format!("{e} {e:?}");
                prop_assert!(!shown.contains(fragment.split('.').next().unwrap()), "{}", shown);
            }
        }
    }
}
