//! The per-leg Noise IK handshake and its hello payloads.
//!
//! Every leg (uplink or downlink) runs its own handshake, `Noise_IK_25519_<AEAD>_SHA256`
//! (or `IKpsk1` with a pre-shared key, so a wrong PSK already fails message 1) through `snow`. The client's static key is its user
//! identity; the server's static key is known to the client beforehand. The first message
//! carries a [`ClientHello`] (session id, leg role, epoch, timestamp, resume point), the reply
//! a [`ServerHello`]. The handshake's split keys then become record keys (see
//! [`crate::record`]): on an uplink the client seals with the initiator→responder key, on a
//! downlink the server seals with the responder→initiator key.
//!
//! Wire: client → server `[suite u8][len u16 BE][noise message 1]`,
//! server → client `[len u16 BE][noise message 2]`.
//!
//! When the leg's transport is TLS 1.3, the client offers a [`ChannelBinding`] in its hello;
//! if the exit's own value for the connection is the same, TLS runs end to end between the
//! two (no proxy terminates it) and the exit may answer that the leg's records are
//! *channel-bound*: carried without the Noise AEAD, inside TLS's (see [`crate::record`]).
//! Both hellos are authenticated by Noise, so no one in the middle can forge the offer or
//! the answer; a proxy that terminates TLS sees different values on its two sides.

use snow::{Builder, HandshakeState};
use zeroize::Zeroizing;

use crate::record::{CipherSuite, RecordError, RecordOpener, RecordSealer};

/// The largest handshake message either side accepts.
pub const MAX_HANDSHAKE_MESSAGE: usize = 512;
/// Length of the client's preamble before message 1: suite byte and length.
pub const CLIENT_PREAMBLE_LEN: usize = 3;
/// Length of the server's preamble before message 2.
pub const SERVER_PREAMBLE_LEN: usize = 2;

const PROTOCOL_VERSION: u8 = 1;
const PROLOGUE: &[u8] = b"halfpipe leg v1";
const CLIENT_HELLO_LEN: usize = 1 + 1 + 16 + 4 + 8 + 8;
const SERVER_HELLO_LEN: usize = 1 + 8 + 8;
/// Server hello extension: the server's next static key follows (32 bytes).
const EXT_NEXT_KEY: u8 = 1;
/// Server hello extension: this leg's records are channel-bound (no body).
const EXT_BOUND_RECORDS: u8 = 2;
/// Client hello extension: the client's channel binding follows (32 bytes); on a `tls://`
/// leg its records will be the TLS records themselves (see [`crate::record`]).
const EXT_CHANNEL_BINDING: u8 = 2;
/// Client hello extension of earlier clients, whose channel-bound records were framed
/// inside the TLS stream: its binding is ignored, so such a leg keeps the Noise AEAD.
const EXT_CHANNEL_BINDING_V1: u8 = 1;

/// A value both ends of one TLS 1.3 connection derive from its exporter secret and that no
/// one can make equal on two different connections (the idea of RFC 9266's `tls-exporter`):
/// when the client's and the exit's agree, their TLS session runs end to end between them.
#[derive(Clone, Copy)]
pub struct ChannelBinding(pub [u8; 32]);

impl ChannelBinding {
    /// Constant-time equality.
    pub fn matches(&self, other: &ChannelBinding) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelBinding(..)")
    }
}

impl PartialEq for ChannelBinding {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other)
    }
}

impl Eq for ChannelBinding {}

/// A 128-bit random session identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Which direction a leg carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LegRole {
    /// Client → server.
    Up,
    /// Server → client.
    Down,
}

impl LegRole {
    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            LegRole::Up => "uplink",
            LegRole::Down => "downlink",
        }
    }
}

/// What the client says in handshake message 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// The leg's role.
    pub role: LegRole,
    /// The session this leg belongs to (new or resumed).
    pub session_id: SessionId,
    /// Increments with every new leg of this role in the session.
    pub epoch: u32,
    /// Client wall clock, Unix milliseconds: checked against replay.
    pub timestamp_ms: u64,
    /// The next server→client sequence number the client expects (its cumulative ACK).
    pub recv_next: u64,
    /// The client's value for the leg's TLS connection, offering channel-bound records;
    /// `None` on transports without TLS, or when the client wants the Noise AEAD always.
    pub channel_binding: Option<ChannelBinding>,
}

/// The server's verdict on a leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum HelloStatus {
    /// The leg is attached.
    Accepted = 0,
    /// The server holds its maximum number of sessions.
    SessionLimit = 1,
    /// This user holds its maximum number of sessions.
    UserSessionLimit = 2,
    /// The session named is unknown or expired: start a new one.
    UnknownSession = 3,
    /// A newer leg of this role is already attached.
    StaleEpoch = 4,
    /// The server's control plane refuses new sessions for this user now (RESTRICTED or
    /// LOCKDOWN mode, a disabled user, or a rate limit); retrying later may succeed.
    Refused = 5,
    /// The server key the client used was retired after its overlap window: the client
    /// must get a new link (or the new key) from the operator.
    ServerKeyRetired = 6,
}

impl HelloStatus {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Accepted,
            1 => Self::SessionLimit,
            2 => Self::UserSessionLimit,
            3 => Self::UnknownSession,
            4 => Self::StaleEpoch,
            5 => Self::Refused,
            6 => Self::ServerKeyRetired,
            _ => return None,
        })
    }

    /// What it means, for the client's error message.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::SessionLimit => "the server is at its session limit",
            Self::UserSessionLimit => "this user is at its session limit",
            Self::UnknownSession => "the server no longer knows this session",
            Self::StaleEpoch => "a newer leg of this role is attached",
            Self::Refused => {
                "the server refuses new sessions for this user now (restricted or lockdown mode, disabled user, or rate limit)"
            }
            Self::ServerKeyRetired => {
                "server key changed; get a new link (or the new server_public_key) from the operator"
            }
        }
    }
}

/// What the server says in handshake message 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerHello {
    /// The verdict.
    pub status: HelloStatus,
    /// The next client→server sequence number the server expects (its cumulative ACK).
    pub recv_next: u64,
    /// Server wall clock, Unix milliseconds (for the client's skew diagnostics).
    pub server_time_ms: u64,
    /// During a key rotation's overlap window: the server's new static public key. It rides
    /// in message 2, which only the holder of the key the client dialled can produce (IK's
    /// `es` and `ss`), so the old key vouches for the new one; the client should persist
    /// it and dial with it from now on.
    pub next_key: Option<[u8; 32]>,
    /// The leg's records are channel-bound (no Noise AEAD): only after the client offered
    /// a binding that matched the exit's own (enforced by [`Responder::reply`] and
    /// [`Initiator::finish`]).
    pub bound_records: bool,
}

/// A handshake that failed. The server answers none of these on the wire.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The suite byte names no cipher this side accepts.
    #[error("cipher suite {0} not accepted")]
    Suite(u8),
    /// The length prefix is zero or above [`MAX_HANDSHAKE_MESSAGE`].
    #[error("handshake message length {0} out of range")]
    Length(usize),
    /// Noise rejected the message: wrong keys, wrong PSK, or tampering.
    #[error("noise handshake failed: {0}")]
    Noise(#[from] snow::Error),
    /// The decrypted hello is malformed.
    #[error("malformed hello: {0}")]
    Hello(&'static str),
    /// The record layer rejected the derived keys.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Static configuration of one side's handshakes.
#[derive(Clone)]
pub struct HandshakeKeys {
    /// The AEAD for the handshake and the records.
    pub suite: CipherSuite,
    /// Our static X25519 private key.
    pub private_key: Zeroizing<[u8; 32]>,
    /// Optional pre-shared key mixed in as `psk1`.
    pub psk: Option<Zeroizing<[u8; 32]>>,
}

impl HandshakeKeys {
    fn builder(&self) -> Result<Builder<'_>, HandshakeError> {
        let aead = match self.suite {
            CipherSuite::Aes256Gcm => "AESGCM",
            CipherSuite::ChaCha20Poly1305 => "ChaChaPoly",
        };
        let pattern = if self.psk.is_some() { "IKpsk1" } else { "IK" };
        let params = format!("Noise_{pattern}_25519_{aead}_SHA256")
            .parse()
            .map_err(HandshakeError::Noise)?;
        let mut b = Builder::new(params)
            .prologue(PROLOGUE)?
            .local_private_key(&self.private_key[..])?;
        if let Some(psk) = &self.psk {
            b = b.psk(1, psk)?;
        }
        Ok(b)
    }
}

/// Computes the X25519 public key of a private key.
pub fn public_key_of(private_key: &[u8; 32]) -> Result<[u8; 32], HandshakeError> {
    // snow exposes no scalar multiplication; a throwaway IK handshake with ourselves as
    // responder reveals our public key as the remote static it learns.
    let keys = HandshakeKeys {
        suite: CipherSuite::Aes256Gcm,
        private_key: Zeroizing::new(*private_key),
        psk: None,
    };
    let probe = Builder::new(
        "Noise_IK_25519_AESGCM_SHA256"
            .parse()
            .map_err(HandshakeError::Noise)?,
    )
    .generate_keypair()?;
    let mut tmp = [0u8; 32];
    tmp.copy_from_slice(&probe.private);
    let probe_keys = HandshakeKeys {
        suite: CipherSuite::Aes256Gcm,
        private_key: Zeroizing::new(tmp),
        psk: None,
    };
    let mut probe_public = [0u8; 32];
    probe_public.copy_from_slice(&probe.public);
    let mut init = keys
        .builder()?
        .remote_public_key(&probe_public)?
        .build_initiator()?;
    let mut resp = probe_keys.builder()?.build_responder()?;
    let mut msg = [0u8; 128];
    let n = init.write_message(&[], &mut msg)?;
    let mut payload = [0u8; 16];
    resp.read_message(&msg[..n], &mut payload)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(
        resp.get_remote_static()
            .ok_or(HandshakeError::Hello("no static"))?,
    );
    Ok(out)
}

/// Generates a fresh X25519 key pair `(private, public)`.
pub fn generate_keypair() -> Result<(Zeroizing<[u8; 32]>, [u8; 32]), HandshakeError> {
    let kp = Builder::new(
        "Noise_IK_25519_AESGCM_SHA256"
            .parse()
            .map_err(HandshakeError::Noise)?,
    )
    .generate_keypair()?;
    let mut private = Zeroizing::new([0u8; 32]);
    private.copy_from_slice(&kp.private);
    let mut public = [0u8; 32];
    public.copy_from_slice(&kp.public);
    Ok((private, public))
}

/// The record keys a finished handshake yields.
pub struct LegKeys {
    suite: CipherSuite,
    initiator_to_responder: Zeroizing<[u8; 32]>,
    responder_to_initiator: Zeroizing<[u8; 32]>,
    bound: bool,
}

impl LegKeys {
    fn from_split(suite: CipherSuite, hs: &mut HandshakeState, bound: bool) -> Self {
        let (a, b) = hs.dangerously_get_raw_split();
        Self {
            suite,
            initiator_to_responder: Zeroizing::new(a),
            responder_to_initiator: Zeroizing::new(b),
            bound,
        }
    }

    /// Whether the leg's records are channel-bound (carried inside TLS without the Noise
    /// AEAD).
    pub fn is_bound(&self) -> bool {
        self.bound
    }

    fn sealer(&self, key: &[u8; 32]) -> Result<RecordSealer, RecordError> {
        if self.bound {
            return Ok(RecordSealer::bound());
        }
        RecordSealer::new(self.suite, key)
    }

    fn opener(&self, key: &[u8; 32]) -> Result<RecordOpener, RecordError> {
        if self.bound {
            return Ok(RecordOpener::bound());
        }
        RecordOpener::new(self.suite, key)
    }

    /// The sealer for the client's sending direction (uplink).
    pub fn client_sealer(&self) -> Result<RecordSealer, RecordError> {
        self.sealer(&self.initiator_to_responder)
    }

    /// The opener for the client's receiving direction (downlink).
    pub fn client_opener(&self) -> Result<RecordOpener, RecordError> {
        self.opener(&self.responder_to_initiator)
    }

    /// The sealer for the server's sending direction (downlink).
    pub fn server_sealer(&self) -> Result<RecordSealer, RecordError> {
        self.sealer(&self.responder_to_initiator)
    }

    /// The opener for the server's receiving direction (uplink).
    pub fn server_opener(&self) -> Result<RecordOpener, RecordError> {
        self.opener(&self.initiator_to_responder)
    }
}

/// The client side of a handshake in progress.
pub struct Initiator {
    hs: HandshakeState,
    suite: CipherSuite,
    offered_binding: bool,
}

impl Initiator {
    /// Builds message 1 (with its preamble) for `hello` to the server key `server_public`.
    pub fn start(
        keys: &HandshakeKeys,
        server_public: &[u8; 32],
        hello: &ClientHello,
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        let mut hs = keys
            .builder()?
            .remote_public_key(server_public)?
            .build_initiator()?;
        let payload = encode_client_hello(hello);
        let mut msg = vec![0u8; MAX_HANDSHAKE_MESSAGE];
        let n = hs.write_message(&payload, &mut msg)?;
        let mut wire = Vec::with_capacity(CLIENT_PREAMBLE_LEN + n);
        wire.push(keys.suite.id());
        wire.extend_from_slice(&(n as u16).to_be_bytes());
        wire.extend_from_slice(&msg[..n]);
        Ok((
            Self {
                hs,
                suite: keys.suite,
                offered_binding: hello.channel_binding.is_some(),
            },
            wire,
        ))
    }

    /// Reads message 2 (without its preamble) and returns the server's hello and the keys.
    pub fn finish(mut self, msg2: &[u8]) -> Result<(ServerHello, LegKeys), HandshakeError> {
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
        let n = self.hs.read_message(msg2, &mut payload)?;
        let hello = decode_server_hello(&payload[..n])?;
        if hello.bound_records && !self.offered_binding {
            return Err(HandshakeError::Hello(
                "server chose channel-bound records that were not offered",
            ));
        }
        let bound = hello.bound_records;
        Ok((hello, LegKeys::from_split(self.suite, &mut self.hs, bound)))
    }
}

/// Parses the server's 2-byte preamble into the length of message 2.
pub fn server_preamble_len(preamble: [u8; SERVER_PREAMBLE_LEN]) -> Result<usize, HandshakeError> {
    checked_len(u16::from_be_bytes(preamble) as usize)
}

/// Parses the client's 3-byte preamble into the suite and the length of message 1.
pub fn client_preamble(
    preamble: [u8; CLIENT_PREAMBLE_LEN],
) -> Result<(CipherSuite, usize), HandshakeError> {
    let suite = CipherSuite::from_id(preamble[0]).ok_or(HandshakeError::Suite(preamble[0]))?;
    let len = checked_len(u16::from_be_bytes([preamble[1], preamble[2]]) as usize)?;
    Ok((suite, len))
}

fn checked_len(len: usize) -> Result<usize, HandshakeError> {
    if len == 0 || len > MAX_HANDSHAKE_MESSAGE {
        return Err(HandshakeError::Length(len));
    }
    Ok(len)
}

/// What the server learned from a valid message 1.
pub struct AcceptedHello {
    /// The decrypted hello.
    pub hello: ClientHello,
    /// The client's static public key: its user identity.
    pub client_static: [u8; 32],
    /// Identity of this handshake for the replay cache (its ephemeral key).
    pub replay_id: [u8; 32],
}

/// The server side of a handshake in progress, after message 1.
pub struct Responder {
    hs: HandshakeState,
    suite: CipherSuite,
    offered_binding: Option<ChannelBinding>,
    binding_matched: bool,
}

impl Responder {
    /// Reads message 1 (without preamble) sent with `suite`. Fails on any authentication error.
    pub fn accept(
        keys: &HandshakeKeys,
        suite: CipherSuite,
        msg1: &[u8],
    ) -> Result<(Self, AcceptedHello), HandshakeError> {
        if suite != keys.suite {
            return Err(HandshakeError::Suite(suite.id()));
        }
        let mut hs = keys.builder()?.build_responder()?;
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
        let n = hs.read_message(msg1, &mut payload)?;
        let hello = decode_client_hello(&payload[..n])?;
        let mut client_static = [0u8; 32];
        client_static.copy_from_slice(
            hs.get_remote_static()
                .ok_or(HandshakeError::Hello("no client static key"))?,
        );
        let mut replay_id = [0u8; 32];
        replay_id.copy_from_slice(&msg1[..32]);
        Ok((
            Self {
                hs,
                suite,
                offered_binding: hello.channel_binding,
                binding_matched: false,
            },
            AcceptedHello {
                hello,
                client_static,
                replay_id,
            },
        ))
    }

    /// Like [`Responder::accept`] with the first of `keys` that opens message 1 (a server
    /// during a key rotation holds its new key and the retiring ones); also returns which.
    /// Each candidate costs one failed DH-and-decrypt, so keep the list short.
    pub fn accept_any(
        keys: &[&HandshakeKeys],
        suite: CipherSuite,
        msg1: &[u8],
    ) -> Result<(Self, AcceptedHello, usize), HandshakeError> {
        let mut last = HandshakeError::Hello("no server key configured");
        for (i, k) in keys.iter().enumerate() {
            match Self::accept(k, suite, msg1) {
                Ok((r, a)) => return Ok((r, a, i)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Compares the client's channel binding with ours for the same connection (`None`:
    /// this transport has no TLS of ours). True when they match: the leg may then be
    /// answered with [`ServerHello::bound_records`].
    pub fn check_binding(&mut self, ours: Option<&ChannelBinding>) -> bool {
        self.binding_matched = match (&self.offered_binding, ours) {
            (Some(theirs), Some(ours)) => theirs.matches(ours),
            _ => false,
        };
        self.binding_matched
    }

    /// Writes message 2 (with preamble) carrying `hello` and returns the keys. Refuses
    /// `bound_records` unless [`Responder::check_binding`] matched.
    pub fn reply(mut self, hello: &ServerHello) -> Result<(Vec<u8>, LegKeys), HandshakeError> {
        if hello.bound_records && !self.binding_matched {
            return Err(HandshakeError::Hello(
                "channel-bound records need a matching channel binding",
            ));
        }
        let payload = encode_server_hello(hello);
        let mut msg = vec![0u8; MAX_HANDSHAKE_MESSAGE];
        let n = self.hs.write_message(&payload, &mut msg)?;
        let mut wire = Vec::with_capacity(SERVER_PREAMBLE_LEN + n);
        wire.extend_from_slice(&(n as u16).to_be_bytes());
        wire.extend_from_slice(&msg[..n]);
        let bound = hello.bound_records;
        Ok((wire, LegKeys::from_split(self.suite, &mut self.hs, bound)))
    }
}

fn encode_client_hello(h: &ClientHello) -> Vec<u8> {
    let mut out = vec![0u8; CLIENT_HELLO_LEN];
    out[0] = PROTOCOL_VERSION;
    out[1] = match h.role {
        LegRole::Up => 0,
        LegRole::Down => 1,
    };
    out[2..18].copy_from_slice(&h.session_id.0);
    out[18..22].copy_from_slice(&h.epoch.to_be_bytes());
    out[22..30].copy_from_slice(&h.timestamp_ms.to_be_bytes());
    out[30..38].copy_from_slice(&h.recv_next.to_be_bytes());
    if let Some(b) = &h.channel_binding {
        out.push(EXT_CHANNEL_BINDING);
        out.extend_from_slice(&b.0);
    }
    out
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn decode_client_hello(b: &[u8]) -> Result<ClientHello, HandshakeError> {
    let channel_binding = match b.len() {
        CLIENT_HELLO_LEN => None,
        n if n == CLIENT_HELLO_LEN + 33 && b[CLIENT_HELLO_LEN] == EXT_CHANNEL_BINDING => {
            let mut v = [0u8; 32];
            v.copy_from_slice(&b[CLIENT_HELLO_LEN + 1..]);
            Some(ChannelBinding(v))
        }
        n if n == CLIENT_HELLO_LEN + 33 && b[CLIENT_HELLO_LEN] == EXT_CHANNEL_BINDING_V1 => None,
        _ => return Err(HandshakeError::Hello("client hello has the wrong length")),
    };
    if b[0] != PROTOCOL_VERSION {
        return Err(HandshakeError::Hello("unsupported protocol version"));
    }
    let role = match b[1] {
        0 => LegRole::Up,
        1 => LegRole::Down,
        _ => return Err(HandshakeError::Hello("unknown leg role")),
    };
    let mut sid = [0u8; 16];
    sid.copy_from_slice(&b[2..18]);
    Ok(ClientHello {
        role,
        session_id: SessionId(sid),
        epoch: u32::from_be_bytes([b[18], b[19], b[20], b[21]]),
        timestamp_ms: be_u64(&b[22..30]),
        recv_next: be_u64(&b[30..38]),
        channel_binding,
    })
}

fn encode_server_hello(h: &ServerHello) -> Vec<u8> {
    let mut out = Vec::with_capacity(SERVER_HELLO_LEN + 33);
    out.push(h.status as u8);
    out.extend_from_slice(&h.recv_next.to_be_bytes());
    out.extend_from_slice(&h.server_time_ms.to_be_bytes());
    if let Some(k) = &h.next_key {
        out.push(EXT_NEXT_KEY);
        out.extend_from_slice(k);
    }
    if h.bound_records {
        out.push(EXT_BOUND_RECORDS);
    }
    out
}

fn decode_server_hello(b: &[u8]) -> Result<ServerHello, HandshakeError> {
    if b.len() < SERVER_HELLO_LEN {
        return Err(HandshakeError::Hello("server hello has the wrong length"));
    }
    // Extensions follow the fixed part, each at most once and in ascending tag order.
    let (mut next_key, mut bound_records) = (None, false);
    let mut rest = &b[SERVER_HELLO_LEN..];
    let mut last_tag = 0u8;
    while let Some((&tag, body)) = rest.split_first() {
        if tag <= last_tag {
            return Err(HandshakeError::Hello(
                "server hello extensions out of order",
            ));
        }
        last_tag = tag;
        rest = match tag {
            EXT_NEXT_KEY if body.len() >= 32 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(&body[..32]);
                next_key = Some(k);
                &body[32..]
            }
            EXT_BOUND_RECORDS => {
                bound_records = true;
                body
            }
            _ => {
                return Err(HandshakeError::Hello(
                    "server hello has a malformed extension",
                ))
            }
        };
    }
    Ok(ServerHello {
        status: HelloStatus::from_u8(b[0]).ok_or(HandshakeError::Hello("unknown status"))?,
        recv_next: be_u64(&b[1..9]),
        server_time_ms: be_u64(&b[9..17]),
        next_key,
        bound_records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{ReplayCache, ReplayError};
    use bytes::BytesMut;

    fn keys(suite: CipherSuite, psk: Option<[u8; 32]>) -> (HandshakeKeys, [u8; 32]) {
        let (private_key, public) = generate_keypair().unwrap();
        (
            HandshakeKeys {
                suite,
                private_key,
                psk: psk.map(Zeroizing::new),
            },
            public,
        )
    }

    fn hello(role: LegRole) -> ClientHello {
        ClientHello {
            role,
            session_id: SessionId::random(),
            epoch: 3,
            timestamp_ms: 1_000_000,
            recv_next: 42,
            channel_binding: None,
        }
    }

    fn split_client(wire: &[u8]) -> (CipherSuite, &[u8]) {
        let (suite, len) = client_preamble([wire[0], wire[1], wire[2]]).unwrap();
        assert_eq!(len, wire.len() - CLIENT_PREAMBLE_LEN);
        (suite, &wire[CLIENT_PREAMBLE_LEN..])
    }

    #[test]
    fn full_handshake_yields_matching_record_keys() {
        for suite in [CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305] {
            for psk in [None, Some([5u8; 32])] {
                let (ck, cpub) = keys(suite, psk);
                let (sk, spub) = keys(suite, psk);
                let h = hello(LegRole::Down);
                let (init, m1) = Initiator::start(&ck, &spub, &h).unwrap();
                let (s, body) = split_client(&m1);
                let (resp, acc) = Responder::accept(&sk, s, body).unwrap();
                assert_eq!(acc.hello, h);
                assert_eq!(acc.client_static, cpub);
                let sh = ServerHello {
                    status: HelloStatus::Accepted,
                    recv_next: 7,
                    server_time_ms: 9,
                    next_key: psk.map(|_| [8u8; 32]),
                    bound_records: false,
                };
                let (m2, skeys) = resp.reply(&sh).unwrap();
                let len = server_preamble_len([m2[0], m2[1]]).unwrap();
                let (got, ckeys) = init.finish(&m2[2..2 + len]).unwrap();
                assert_eq!(got, sh);
                // Downlink: the server seals, the client opens.
                let mut out = Vec::new();
                let mut sealer = skeys.server_sealer().unwrap();
                let start = sealer.begin(&mut out);
                out.extend_from_slice(b"down");
                sealer.seal(&mut out, start).unwrap();
                let mut buf = BytesMut::from(&out[..]);
                let p = ckeys.client_opener().unwrap().open_next(&mut buf).unwrap();
                assert_eq!(p.as_deref(), Some(&b"down"[..]));
                assert_eq!(public_key_of(&ck.private_key).unwrap(), cpub);
            }
        }
    }

    #[test]
    fn a_rotating_server_opens_with_whichever_key_the_client_dialled() {
        let (ck, _) = keys(CipherSuite::Aes256Gcm, None);
        let (old, old_pub) = keys(CipherSuite::Aes256Gcm, None);
        let (new, new_pub) = keys(CipherSuite::Aes256Gcm, None);
        let (stranger, _) = keys(CipherSuite::Aes256Gcm, None);
        for (dialled, want) in [(old_pub, 1), (new_pub, 0)] {
            let (init, m1) = Initiator::start(&ck, &dialled, &hello(LegRole::Up)).unwrap();
            let (s, body) = split_client(&m1);
            let (resp, _, which) = Responder::accept_any(&[&new, &old], s, body).unwrap();
            assert_eq!(which, want);
            // The old key announces the new one in message 2.
            let sh = ServerHello {
                status: HelloStatus::Accepted,
                recv_next: 0,
                server_time_ms: 0,
                next_key: (which == 1).then_some(new_pub),
                bound_records: false,
            };
            let (m2, _) = resp.reply(&sh).unwrap();
            let (got, _) = init.finish(&m2[2..]).unwrap();
            assert_eq!(got.next_key, (want == 1).then_some(new_pub));
        }
        let (_, m1) = Initiator::start(&ck, &old_pub, &hello(LegRole::Up)).unwrap();
        let (s, body) = split_client(&m1);
        assert!(Responder::accept_any(&[&stranger], s, body).is_err());
        assert!(Responder::accept_any(&[], s, body).is_err());
        // A server hello with a malformed extension is refused.
        let mut bad = encode_server_hello(&ServerHello {
            status: HelloStatus::Accepted,
            recv_next: 0,
            server_time_ms: 0,
            next_key: Some([1; 32]),
            bound_records: false,
        });
        bad[SERVER_HELLO_LEN] = 9;
        assert!(decode_server_hello(&bad).is_err());
        assert!(decode_server_hello(&bad[..SERVER_HELLO_LEN + 5]).is_err());
    }

    #[test]
    fn wrong_server_key_wrong_psk_and_wrong_suite_fail() {
        let (ck, _) = keys(CipherSuite::Aes256Gcm, None);
        let (sk, spub) = keys(CipherSuite::Aes256Gcm, None);
        let (_, other_pub) = keys(CipherSuite::Aes256Gcm, None);
        let (_, m1) = Initiator::start(&ck, &other_pub, &hello(LegRole::Up)).unwrap();
        let (s, body) = split_client(&m1);
        assert!(matches!(
            Responder::accept(&sk, s, body),
            Err(HandshakeError::Noise(_))
        ));

        let (ck_psk, _) = keys(CipherSuite::Aes256Gcm, Some([1; 32]));
        let mut sk_psk = sk.clone();
        sk_psk.psk = Some(Zeroizing::new([2; 32]));
        let (_, m1) = Initiator::start(&ck_psk, &spub, &hello(LegRole::Up)).unwrap();
        let (s, body) = split_client(&m1);
        assert!(Responder::accept(&sk_psk, s, body).is_err());

        let (ck_cc, _) = keys(CipherSuite::ChaCha20Poly1305, None);
        let (_, m1) = Initiator::start(&ck_cc, &spub, &hello(LegRole::Up)).unwrap();
        let (s, body) = split_client(&m1);
        assert!(matches!(
            Responder::accept(&sk, s, body),
            Err(HandshakeError::Suite(2))
        ));
        assert!(matches!(
            client_preamble([9, 0, 10]),
            Err(HandshakeError::Suite(9))
        ));
        assert!(matches!(
            client_preamble([1, 0xff, 0xff]),
            Err(HandshakeError::Length(0xffff))
        ));
    }

    #[test]
    fn tampered_message_and_replay_are_refused() {
        let (ck, _) = keys(CipherSuite::Aes256Gcm, None);
        let (sk, spub) = keys(CipherSuite::Aes256Gcm, None);
        let h = hello(LegRole::Up);
        let (_, m1) = Initiator::start(&ck, &spub, &h).unwrap();
        for i in CLIENT_PREAMBLE_LEN..m1.len() {
            let mut bad = m1.clone();
            bad[i] ^= 0x80;
            let (s, body) = split_client(&bad);
            assert!(Responder::accept(&sk, s, body).is_err(), "byte {i}");
        }
        // A verbatim replay decrypts fine; the replay cache is what refuses it.
        let mut cache = ReplayCache::new(120_000, 1024);
        for attempt in 0..2 {
            let (s, body) = split_client(&m1);
            let (_, acc) = Responder::accept(&sk, s, body).unwrap();
            let r = cache.check_and_insert(acc.replay_id, acc.hello.timestamp_ms, 1_000_500);
            if attempt == 0 {
                assert_eq!(r, Ok(()));
            } else {
                assert_eq!(r, Err(ReplayError::Replayed));
            }
        }
    }

    /// One handshake where the client offers `offer` and the exit holds `ours` for the
    /// connection and answers bound when they match; returns both sides' keys.
    fn bound_handshake(
        offer: Option<ChannelBinding>,
        ours: Option<ChannelBinding>,
    ) -> (ClientHello, LegKeys, LegKeys) {
        let (ck, _) = keys(CipherSuite::Aes256Gcm, None);
        let (sk, spub) = keys(CipherSuite::Aes256Gcm, None);
        let h = ClientHello {
            channel_binding: offer,
            ..hello(LegRole::Up)
        };
        let (init, m1) = Initiator::start(&ck, &spub, &h).unwrap();
        let (s, body) = split_client(&m1);
        let (mut resp, acc) = Responder::accept(&sk, s, body).unwrap();
        let bound = resp.check_binding(ours.as_ref());
        let sh = ServerHello {
            status: HelloStatus::Accepted,
            recv_next: 0,
            server_time_ms: 0,
            next_key: Some([4; 32]),
            bound_records: bound,
        };
        let (m2, skeys) = resp.reply(&sh).unwrap();
        let (got, ckeys) = init.finish(&m2[2..]).unwrap();
        assert_eq!(got, sh);
        (acc.hello, ckeys, skeys)
    }

    #[test]
    fn a_matching_channel_binding_makes_both_ends_carry_bound_records() {
        let b = ChannelBinding([7; 32]);
        let (seen, ckeys, skeys) = bound_handshake(Some(b), Some(b));
        assert_eq!(seen.channel_binding, Some(b), "the offer crosses intact");
        assert!(ckeys.is_bound() && skeys.is_bound());
        let mut sealer = ckeys.client_sealer().unwrap();
        assert!(sealer.is_bound() && skeys.server_opener().unwrap().is_bound());
        // The uplink record is the plaintext behind its length, and the exit reads it.
        let mut out = Vec::new();
        let start = sealer.begin(&mut out);
        out.extend_from_slice(b"up");
        sealer.seal(&mut out, start).unwrap();
        assert_eq!(out, b"\0\0\0\x02up");
        let mut buf = BytesMut::from(&out[..]);
        let p = skeys.server_opener().unwrap().open_next(&mut buf).unwrap();
        assert_eq!(p.as_deref(), Some(&b"up"[..]));
    }

    #[test]
    fn without_a_matching_binding_the_leg_keeps_its_noise_aead() {
        let a = ChannelBinding([7; 32]);
        let mut other = [7; 32];
        other[31] ^= 1;
        // A proxy terminating TLS: each side sees its own connection's value.
        for (offer, ours) in [
            (Some(a), Some(ChannelBinding(other))),
            (Some(a), None),
            (None, Some(a)),
            (None, None),
        ] {
            let (_, ckeys, skeys) = bound_handshake(offer, ours);
            assert!(!ckeys.is_bound() && !skeys.is_bound(), "{offer:?} {ours:?}");
            assert!(!ckeys.client_sealer().unwrap().is_bound());
        }
    }

    #[test]
    fn neither_end_accepts_bound_records_that_were_not_agreed() {
        let (ck, _) = keys(CipherSuite::Aes256Gcm, None);
        let (sk, spub) = keys(CipherSuite::Aes256Gcm, None);
        let bound_hello = ServerHello {
            status: HelloStatus::Accepted,
            recv_next: 0,
            server_time_ms: 0,
            next_key: None,
            bound_records: true,
        };
        // The exit cannot answer bound without a matched binding.
        let b = ChannelBinding([1; 32]);
        let h = ClientHello {
            channel_binding: Some(b),
            ..hello(LegRole::Down)
        };
        let (_, m1) = Initiator::start(&ck, &spub, &h).unwrap();
        let (s, body) = split_client(&m1);
        let (mut resp, _) = Responder::accept(&sk, s, body).unwrap();
        assert!(!resp.check_binding(Some(&ChannelBinding([2; 32]))));
        assert!(matches!(
            resp.reply(&bound_hello),
            Err(HandshakeError::Hello(_))
        ));
        // A client that offered nothing refuses a bound answer (here from an exit whose
        // check was forced, as a broken or hostile one would).
        let (init, m1) = Initiator::start(&ck, &spub, &hello(LegRole::Down)).unwrap();
        let (s, body) = split_client(&m1);
        let (mut resp, _) = Responder::accept(&sk, s, body).unwrap();
        resp.binding_matched = true;
        let (m2, _) = resp.reply(&bound_hello).unwrap();
        assert!(matches!(
            init.finish(&m2[2..]),
            Err(HandshakeError::Hello(_))
        ));
    }

    #[test]
    fn hellos_decode_with_and_without_their_extensions_and_refuse_malformed_ones() {
        let plain = hello(LegRole::Up);
        let enc = encode_client_hello(&plain);
        assert_eq!(
            enc.len(),
            CLIENT_HELLO_LEN,
            "no extension: the version-1 layout"
        );
        assert_eq!(decode_client_hello(&enc).unwrap(), plain);
        let with = ClientHello {
            channel_binding: Some(ChannelBinding([3; 32])),
            ..plain
        };
        let enc = encode_client_hello(&with);
        assert_eq!(decode_client_hello(&enc).unwrap(), with);
        let mut bad = enc.clone();
        bad[CLIENT_HELLO_LEN] = 3;
        assert!(decode_client_hello(&bad).is_err(), "unknown extension");
        // An earlier client's binding (stream-framed bound records) is heard but not
        // taken up: its leg keeps the Noise AEAD.
        let mut earlier = enc.clone();
        earlier[CLIENT_HELLO_LEN] = EXT_CHANNEL_BINDING_V1;
        assert_eq!(decode_client_hello(&earlier).unwrap(), plain);
        assert!(
            decode_client_hello(&enc[..enc.len() - 1]).is_err(),
            "short binding"
        );
        let both = ServerHello {
            status: HelloStatus::Accepted,
            recv_next: 1,
            server_time_ms: 2,
            next_key: Some([5; 32]),
            bound_records: true,
        };
        let enc = encode_server_hello(&both);
        assert_eq!(decode_server_hello(&enc).unwrap(), both);
        // Out of order or repeated extensions are refused.
        let mut twice = enc.clone();
        twice.push(EXT_BOUND_RECORDS);
        assert!(decode_server_hello(&twice).is_err());
        let mut swapped = encode_server_hello(&ServerHello {
            next_key: None,
            ..both
        });
        swapped.push(EXT_NEXT_KEY);
        swapped.extend_from_slice(&[5; 32]);
        assert!(decode_server_hello(&swapped).is_err());
        assert!(decode_server_hello(&enc[..SERVER_HELLO_LEN - 1]).is_err());
    }
}
