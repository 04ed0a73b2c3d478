//! Session frames and their codec.
//!
//! A record (see [`crate::record`]) carries one or more frames back to back. Frames are
//! either *sequenced* (OPEN, OPEN_RESULT, DATA, FIN, RST, CLOSE): each takes the next
//! sequence number of its direction, is kept in the sender's retransmit buffer until
//! acknowledged and is delivered exactly once; or *state* frames (ACK, MAX_DATA,
//! MAX_STREAM_DATA, RESUME, PING) that carry absolute values and are simply sent again
//! whenever a leg is replaced. The byte layout is in `docs/PROTOCOL.md`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes};

use crate::target::{ConnectStatus, TargetAddr};

/// The largest plaintext a record may carry: a hard limit for every frame, checked on decode.
pub const MAX_RECORD_PAYLOAD: usize = 64 * 1024;
/// The largest DATA payload in one frame (fits a record with its header).
pub const MAX_DATA_PER_FRAME: usize = 32 * 1024;
/// Bytes a DATA frame adds around its payload.
pub const DATA_HEADER_LEN: usize = 1 + 4 + 2;
/// The least a leg's records carry: a TLS 1.3 record's plaintext (legs whose TLS keys
/// were handed over send one frame batch per TLS record).
pub const MIN_RECORD_PAYLOAD: usize = 16 * 1024;
/// How much DATA a sender puts in one frame: one frame, with room for the acknowledgement
/// and credit frames that ride along, fills the smallest record, and four fill the largest.
pub const DATA_CHUNK: usize = MIN_RECORD_PAYLOAD - DATA_HEADER_LEN - 64;

/// A stream identifier; streams are opened by the client only, numbered 1, 2, 3, ...
pub type StreamId = u32;

/// A map keyed by stream id. Lookups happen several times per record, so it hashes with
/// `foldhash` (a few instructions for a `u32`, against about a hundred for std's SipHash),
/// seeded at random per map so that a peer choosing stream ids cannot aim for collisions;
/// a session holds at most `max_streams` of them in any case.
pub type StreamMap<V> = std::collections::HashMap<StreamId, V, foldhash::fast::RandomState>;

/// Why a stream was reset, carried in RST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ResetCode {
    /// The application on the sending side aborted the stream.
    Cancelled = 0,
    /// The exit's connection to the target failed mid-stream.
    TargetError = 1,
    /// A limit (streams per session, quota) refused the stream.
    LimitReached = 2,
    /// The peer violated the protocol on this stream.
    ProtocolError = 3,
    /// The session is going away.
    SessionClosing = 4,
}

impl ResetCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Cancelled,
            1 => Self::TargetError,
            2 => Self::LimitReached,
            3 => Self::ProtocolError,
            4 => Self::SessionClosing,
            _ => return None,
        })
    }
}

/// Why a whole session was closed, carried in CLOSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseCode {
    /// Orderly close by either side.
    Normal = 0,
    /// No stream activity for the idle timeout.
    Idle = 1,
    /// The server is shutting down or an administrator closed the session.
    Administrative = 2,
    /// The peer broke the protocol.
    ProtocolError = 3,
}

impl CloseCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Normal,
            1 => Self::Idle,
            2 => Self::Administrative,
            3 => Self::ProtocolError,
            _ => return None,
        })
    }
}

/// One session frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client asks the exit to open `stream` to `target` (sequenced).
    Open {
        /// New stream id, greater than every earlier one.
        stream: StreamId,
        /// Where to connect.
        target: TargetAddr,
    },
    /// Exit reports the outcome of its connect (sequenced).
    OpenResult {
        /// The stream concerned.
        stream: StreamId,
        /// The outcome.
        status: ConnectStatus,
    },
    /// Stream bytes (sequenced).
    Data {
        /// The stream concerned.
        stream: StreamId,
        /// At most [`MAX_DATA_PER_FRAME`] bytes.
        data: Bytes,
    },
    /// The sender will send no more on this stream (sequenced).
    Fin {
        /// The stream concerned.
        stream: StreamId,
    },
    /// Abort the stream in both directions (sequenced).
    Rst {
        /// The stream concerned.
        stream: StreamId,
        /// Why.
        code: ResetCode,
    },
    /// Close the whole session (sequenced).
    Close {
        /// Why.
        code: CloseCode,
    },
    /// Every sequenced frame below `next_seq` of the opposite direction has arrived.
    Ack {
        /// The next sequence number the sender of this ACK expects.
        next_seq: u64,
    },
    /// Session-level credit: the peer may send DATA bytes up to this absolute total.
    MaxData {
        /// Absolute byte limit over all streams.
        limit: u64,
    },
    /// Stream-level credit: the peer may send this stream's bytes up to this absolute offset.
    MaxStreamData {
        /// The stream concerned.
        stream: StreamId,
        /// Absolute byte offset limit.
        limit: u64,
    },
    /// The next sequenced frame on this leg has sequence number `seq` (first frame of a leg).
    Resume {
        /// Sequence number of the next sequenced frame on this leg.
        seq: u64,
    },
    /// Keepalive; carries nothing.
    Ping,
}

const T_OPEN: u8 = 0x01;
const T_OPEN_RESULT: u8 = 0x02;
const T_DATA: u8 = 0x03;
const T_FIN: u8 = 0x04;
const T_RST: u8 = 0x05;
const T_CLOSE: u8 = 0x06;
const T_ACK: u8 = 0x10;
const T_MAX_DATA: u8 = 0x11;
const T_MAX_STREAM_DATA: u8 = 0x12;
const T_RESUME: u8 = 0x13;
const T_PING: u8 = 0x14;

const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The record ended inside a frame.
    #[error("frame truncated: {0} needs more bytes than the record holds")]
    Truncated(&'static str),
    /// The type byte names no frame.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// OPEN names an address type other than IPv4, IPv6 or domain.
    #[error("unknown address type {0} in OPEN")]
    BadAddressType(u8),
    /// OPEN names an empty or non-UTF-8 domain.
    #[error("domain in OPEN is empty or not UTF-8")]
    BadDomain,
    /// A status, reset or close code is not one this version knows.
    #[error("unknown {kind} code {value}")]
    BadCode {
        /// Which code field.
        kind: &'static str,
        /// The value seen.
        value: u8,
    },
    /// DATA carries more than [`MAX_DATA_PER_FRAME`] bytes, or a record is too large.
    #[error("frame too large: {0} bytes")]
    Oversized(usize),
}

impl Frame {
    /// Whether this frame takes a sequence number (and is retransmitted until acknowledged).
    pub fn is_sequenced(&self) -> bool {
        matches!(
            self,
            Frame::Open { .. }
                | Frame::OpenResult { .. }
                | Frame::Data { .. }
                | Frame::Fin { .. }
                | Frame::Rst { .. }
                | Frame::Close { .. }
        )
    }

    /// Exact encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Open { target, .. } => {
                1 + 4
                    + match target {
                        TargetAddr::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
                        TargetAddr::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
                        TargetAddr::Domain(d, _) => 1 + 1 + d.len() + 2,
                    }
            }
            Frame::OpenResult { .. } | Frame::Rst { .. } => 1 + 4 + 1,
            Frame::Data { data, .. } => DATA_HEADER_LEN + data.len(),
            Frame::Fin { .. } => 1 + 4,
            Frame::Close { .. } => 1 + 1,
            Frame::Ack { .. } | Frame::MaxData { .. } | Frame::Resume { .. } => 1 + 8,
            Frame::MaxStreamData { .. } => 1 + 4 + 8,
            Frame::Ping => 1,
        }
    }

    /// Appends the encoding to `out`. Callers keep DATA within [`MAX_DATA_PER_FRAME`] and
    /// domains within 255 bytes (the session layer guarantees both).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Open { stream, target } => {
                out.put_u8(T_OPEN);
                out.put_u32(*stream);
                encode_target(target, out);
            }
            Frame::OpenResult { stream, status } => {
                out.put_u8(T_OPEN_RESULT);
                out.put_u32(*stream);
                out.put_u8(*status as u8);
            }
            Frame::Data { stream, data } => {
                out.put_u8(T_DATA);
                out.put_u32(*stream);
                out.put_u16(data.len() as u16);
                out.extend_from_slice(data);
            }
            Frame::Fin { stream } => {
                out.put_u8(T_FIN);
                out.put_u32(*stream);
            }
            Frame::Rst { stream, code } => {
                out.put_u8(T_RST);
                out.put_u32(*stream);
                out.put_u8(*code as u8);
            }
            Frame::Close { code } => {
                out.put_u8(T_CLOSE);
                out.put_u8(*code as u8);
            }
            Frame::Ack { next_seq } => {
                out.put_u8(T_ACK);
                out.put_u64(*next_seq);
            }
            Frame::MaxData { limit } => {
                out.put_u8(T_MAX_DATA);
                out.put_u64(*limit);
            }
            Frame::MaxStreamData { stream, limit } => {
                out.put_u8(T_MAX_STREAM_DATA);
                out.put_u32(*stream);
                out.put_u64(*limit);
            }
            Frame::Resume { seq } => {
                out.put_u8(T_RESUME);
                out.put_u64(*seq);
            }
            Frame::Ping => out.put_u8(T_PING),
        }
    }
}

fn encode_target(target: &TargetAddr, out: &mut Vec<u8>) {
    match target {
        TargetAddr::Ip(SocketAddr::V4(a)) => {
            out.put_u8(ATYP_V4);
            out.extend_from_slice(&a.ip().octets());
            out.put_u16(a.port());
        }
        TargetAddr::Ip(SocketAddr::V6(a)) => {
            out.put_u8(ATYP_V6);
            out.extend_from_slice(&a.ip().octets());
            out.put_u16(a.port());
        }
        TargetAddr::Domain(d, port) => {
            out.put_u8(ATYP_DOMAIN);
            out.put_u8(d.len() as u8);
            out.extend_from_slice(d.as_bytes());
            out.put_u16(*port);
        }
    }
}

/// Iterates over the frames of one decrypted record without copying DATA payloads.
pub struct FrameDecoder {
    buf: Bytes,
}

impl FrameDecoder {
    /// Starts decoding a record's plaintext.
    pub fn new(record: Bytes) -> Result<Self, FrameError> {
        if record.len() > MAX_RECORD_PAYLOAD {
            return Err(FrameError::Oversized(record.len()));
        }
        Ok(Self { buf: record })
    }
}

impl Iterator for FrameDecoder {
    type Item = Result<Frame, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let r = decode_one(&mut self.buf);
        if r.is_err() {
            self.buf.clear();
        }
        Some(r)
    }
}

fn need(buf: &Bytes, n: usize, what: &'static str) -> Result<(), FrameError> {
    if buf.remaining() < n {
        Err(FrameError::Truncated(what))
    } else {
        Ok(())
    }
}

fn decode_one(buf: &mut Bytes) -> Result<Frame, FrameError> {
    let t = buf.get_u8();
    Ok(match t {
        T_OPEN => {
            need(buf, 5, "OPEN")?;
            let stream = buf.get_u32();
            let target = decode_target(buf)?;
            Frame::Open { stream, target }
        }
        T_OPEN_RESULT => {
            need(buf, 5, "OPEN_RESULT")?;
            let stream = buf.get_u32();
            let v = buf.get_u8();
            let status = ConnectStatus::from_u8(v).ok_or(FrameError::BadCode {
                kind: "connect status",
                value: v,
            })?;
            Frame::OpenResult { stream, status }
        }
        T_DATA => {
            need(buf, 6, "DATA")?;
            let stream = buf.get_u32();
            let len = buf.get_u16() as usize;
            if len > MAX_DATA_PER_FRAME {
                return Err(FrameError::Oversized(len));
            }
            need(buf, len, "DATA payload")?;
            Frame::Data {
                stream,
                data: buf.split_to(len),
            }
        }
        T_FIN => {
            need(buf, 4, "FIN")?;
            Frame::Fin {
                stream: buf.get_u32(),
            }
        }
        T_RST => {
            need(buf, 5, "RST")?;
            let stream = buf.get_u32();
            let v = buf.get_u8();
            let code = ResetCode::from_u8(v).ok_or(FrameError::BadCode {
                kind: "reset",
                value: v,
            })?;
            Frame::Rst { stream, code }
        }
        T_CLOSE => {
            need(buf, 1, "CLOSE")?;
            let v = buf.get_u8();
            let code = CloseCode::from_u8(v).ok_or(FrameError::BadCode {
                kind: "close",
                value: v,
            })?;
            Frame::Close { code }
        }
        T_ACK => {
            need(buf, 8, "ACK")?;
            Frame::Ack {
                next_seq: buf.get_u64(),
            }
        }
        T_MAX_DATA => {
            need(buf, 8, "MAX_DATA")?;
            Frame::MaxData {
                limit: buf.get_u64(),
            }
        }
        T_MAX_STREAM_DATA => {
            need(buf, 12, "MAX_STREAM_DATA")?;
            Frame::MaxStreamData {
                stream: buf.get_u32(),
                limit: buf.get_u64(),
            }
        }
        T_RESUME => {
            need(buf, 8, "RESUME")?;
            Frame::Resume { seq: buf.get_u64() }
        }
        T_PING => Frame::Ping,
        other => return Err(FrameError::UnknownType(other)),
    })
}

fn decode_target(buf: &mut Bytes) -> Result<TargetAddr, FrameError> {
    need(buf, 1, "OPEN address")?;
    match buf.get_u8() {
        ATYP_V4 => {
            need(buf, 6, "OPEN IPv4 address")?;
            let ip = Ipv4Addr::from(buf.get_u32());
            Ok(TargetAddr::Ip(SocketAddr::new(
                IpAddr::V4(ip),
                buf.get_u16(),
            )))
        }
        ATYP_V6 => {
            need(buf, 18, "OPEN IPv6 address")?;
            let ip = Ipv6Addr::from(buf.get_u128());
            Ok(TargetAddr::Ip(SocketAddr::new(
                IpAddr::V6(ip),
                buf.get_u16(),
            )))
        }
        ATYP_DOMAIN => {
            need(buf, 1, "OPEN domain length")?;
            let len = buf.get_u8() as usize;
            if len == 0 {
                return Err(FrameError::BadDomain);
            }
            need(buf, len + 2, "OPEN domain")?;
            let name = buf.split_to(len);
            let name = std::str::from_utf8(&name).map_err(|_| FrameError::BadDomain)?;
            Ok(TargetAddr::Domain(name.to_owned(), buf.get_u16()))
        }
        other => Err(FrameError::BadAddressType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame) {
        let mut out = Vec::new();
        f.encode(&mut out);
        assert_eq!(out.len(), f.encoded_len(), "{f:?}");
        let got: Vec<_> = FrameDecoder::new(Bytes::from(out)).unwrap().collect();
        assert_eq!(got, vec![Ok(f)]);
    }

    #[test]
    fn every_frame_roundtrips() {
        let frames = vec![
            Frame::Open {
                stream: 7,
                target: TargetAddr::Ip("10.1.2.3:80".parse().unwrap()),
            },
            Frame::Open {
                stream: 8,
                target: TargetAddr::Ip("[2001:db8::1]:443".parse().unwrap()),
            },
            Frame::Open {
                stream: 9,
                target: TargetAddr::Domain("example.com".into(), 8080),
            },
            Frame::OpenResult {
                stream: 1,
                status: ConnectStatus::ConnectionRefused,
            },
            Frame::Data {
                stream: 3,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Fin { stream: 3 },
            Frame::Rst {
                stream: 3,
                code: ResetCode::TargetError,
            },
            Frame::Close {
                code: CloseCode::Idle,
            },
            Frame::Ack { next_seq: u64::MAX },
            Frame::MaxData { limit: 1 << 40 },
            Frame::MaxStreamData {
                stream: 2,
                limit: 99,
            },
            Frame::Resume { seq: 12 },
            Frame::Ping,
        ];
        for f in frames {
            roundtrip(f);
        }
    }

    #[test]
    fn malformed_frames_are_precise_errors() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (vec![0x7f], FrameError::UnknownType(0x7f)),
            (vec![T_FIN, 0, 0], FrameError::Truncated("FIN")),
            (vec![T_OPEN, 0, 0, 0, 1, 9], FrameError::BadAddressType(9)),
            (vec![T_OPEN, 0, 0, 0, 1, 3, 0, 0, 80], FrameError::BadDomain),
            (
                vec![T_OPEN, 0, 0, 0, 1, 3, 2, 0xff, 0xfe, 0, 80],
                FrameError::BadDomain,
            ),
            (
                vec![T_OPEN_RESULT, 0, 0, 0, 1, 7],
                FrameError::BadCode {
                    kind: "connect status",
                    value: 7,
                },
            ),
            (
                vec![T_DATA, 0, 0, 0, 1, 0x80, 0x01],
                FrameError::Oversized(0x8001),
            ),
            (
                vec![T_DATA, 0, 0, 0, 1, 0, 10, 1, 2],
                FrameError::Truncated("DATA payload"),
            ),
        ];
        for (bytes, want) in cases {
            let got: Vec<_> = FrameDecoder::new(Bytes::from(bytes.clone()))
                .unwrap()
                .collect();
            assert_eq!(got.last(), Some(&Err(want)), "input {bytes:?}");
        }
    }

    #[test]
    fn oversized_record_is_refused() {
        let big = Bytes::from(vec![T_PING; MAX_RECORD_PAYLOAD + 1]);
        assert!(matches!(
            FrameDecoder::new(big),
            Err(FrameError::Oversized(_))
        ));
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u32>(), any::<[u8; 4]>(), any::<u16>()).prop_map(|(s, ip, p)| Frame::Open {
                stream: s,
                target: TargetAddr::Ip(SocketAddr::new(IpAddr::from(ip), p))
            }),
            (any::<u32>(), "[a-z0-9.-]{1,255}", any::<u16>()).prop_map(|(s, d, p)| {
                Frame::Open {
                    stream: s,
                    target: TargetAddr::Domain(d, p),
                }
            }),
            (
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..2048)
            )
                .prop_map(|(s, d)| Frame::Data {
                    stream: s,
                    data: Bytes::from(d)
                }),
            any::<u32>().prop_map(|s| Frame::Fin { stream: s }),
            any::<u64>().prop_map(|n| Frame::Ack { next_seq: n }),
            (any::<u32>(), any::<u64>()).prop_map(|(s, l)| Frame::MaxStreamData {
                stream: s,
                limit: l
            }),
            any::<u64>().prop_map(|s| Frame::Resume { seq: s }),
        ]
    }

    proptest! {
        #[test]
        fn sequences_of_frames_roundtrip(frames in proptest::collection::vec(arb_frame(), 1..16)) {
            let mut out = Vec::new();
            for f in &frames { f.encode(&mut out); }
            let got: Result<Vec<_>, _> = FrameDecoder::new(Bytes::from(out)).unwrap().collect();
            prop_assert_eq!(got.unwrap(), frames);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for f in FrameDecoder::new(Bytes::from(bytes)).unwrap() {
                let _ = f;
            }
        }
    }
}
