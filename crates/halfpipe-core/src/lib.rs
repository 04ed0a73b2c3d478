//! # halfpipe-core: the sans-io wire core
//!
//! No sockets and no async runtime live here: every type takes bytes and time in and gives
//! bytes and events out, so the whole protocol is tested deterministically.
//!
//! - [`aead`]: the record AEAD, from the library (aws-lc or ring) faster on this CPU.
//! - [`frame`]: the session frames and their codec, with a hard size limit.
//! - [`record`]: the per-leg record layer (length header + AEAD with counter nonces).
//! - [`handshake`]: the per-leg Noise IK handshake and its hello payloads.
//! - [`link`]: share links (`halfpipe://v1/...`): everything a client needs in one string.
//! - [`replay`]: the bounded replay cache for handshakes.
//! - [`session`]: streams, sequencing, acks, retransmission and flow control.
//! - [`target`]: destination addresses and connect outcomes.

pub mod aead;
pub mod frame;
pub mod handshake;
pub mod link;
pub mod record;
pub mod recv_queue;
pub mod replay;
pub mod session;
pub mod target;

pub use target::{ConnectStatus, TargetAddr};
