//! # halfpipe-core: the sans-io wire core
//!
//! No sockets and no async runtime live here: every type takes bytes and time in and gives
//! bytes and events out, so the whole protocol is tested deterministically.
//!
//! - [`frame`]: the session frames and their codec, with a hard size limit.
//! - [`record`]: the per-leg record layer (length header + AEAD with counter nonces).
//! - [`handshake`]: the per-leg Noise IK handshake and its hello payload.
//! - [`replay`]: the bounded replay cache for handshakes.
//! - [`session`]: streams, sequence numbers, acks, retransmission and flow control.
//! - [`target`]: destination addresses and connect outcomes.

pub mod target;

pub use target::{ConnectStatus, TargetAddr};
