//! The async side of a leg: the Noise handshake over a transport, then record I/O.
//!
//! The protocol logic lives in `halfpipe_core::handshake` and `halfpipe_core::record`; this
//! module only moves their bytes with bounded reads and timeouts.

use std::time::Duration;

use halfpipe_core::handshake::{
    client_preamble, server_preamble_len, AcceptedHello, ClientHello, HandshakeError,
    HandshakeKeys, Initiator, LegKeys, Responder, ServerHello, CLIENT_PREAMBLE_LEN,
    SERVER_PREAMBLE_LEN,
};
use halfpipe_core::record::CipherSuite;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::transport::BoxedLeg;

/// A leg handshake that failed.
#[derive(Debug, thiserror::Error)]
pub enum LegError {
    /// Socket error.
    #[error("leg I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake did not finish in time.
    #[error("leg handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The Noise handshake or hello was rejected.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// Client side: sends message 1 and reads message 2.
pub async fn client_handshake(
    io: &mut BoxedLeg,
    keys: &HandshakeKeys,
    server_public: &[u8; 32],
    hello: &ClientHello,
    timeout: Duration,
) -> Result<(ServerHello, LegKeys), LegError> {
    let fut = async {
        let (init, msg1) = Initiator::start(keys, server_public, hello)?;
        io.write_all(&msg1).await?;
        io.flush().await?;
        let mut pre = [0u8; SERVER_PREAMBLE_LEN];
        io.read_exact(&mut pre).await?;
        let len = server_preamble_len(pre)?;
        let mut msg2 = vec![0u8; len];
        io.read_exact(&mut msg2).await?;
        Ok::<_, LegError>(init.finish(&msg2)?)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| LegError::Timeout(timeout))?
}

/// Server side, step 1: reads and authenticates message 1.
pub async fn server_read_hello(
    io: &mut BoxedLeg,
    keys: &[&HandshakeKeys],
) -> Result<(Responder, AcceptedHello, usize), LegError> {
    let mut pre = [0u8; CLIENT_PREAMBLE_LEN];
    io.read_exact(&mut pre).await?;
    let (suite, len): (CipherSuite, usize) = client_preamble(pre)?;
    let mut msg1 = vec![0u8; len];
    io.read_exact(&mut msg1).await?;
    Ok(Responder::accept_any(keys, suite, &msg1)?)
}

/// Server side, step 2: answers with message 2.
pub async fn server_reply(
    io: &mut BoxedLeg,
    responder: Responder,
    hello: &ServerHello,
) -> Result<LegKeys, LegError> {
    let (msg2, keys) = responder.reply(hello)?;
    io.write_all(&msg2).await?;
    io.flush().await?;
    Ok(keys)
}

/// The wall clock in Unix milliseconds, as handshake timestamps carry it (0 before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
