//! A TLS 1.3 stream over TCP built on rustls' unbuffered API.
//!
//! The buffered `rustls::Connection` reads its socket 4 KiB at a time and copies every
//! record through two internal buffers; a leg moves gigabytes, so those copies and
//! syscalls were the largest cost of `tls://` legs. Here the socket is read in large
//! chunks straight into one window that rustls decrypts in place, plaintext goes straight
//! into the caller's buffer when it fits, and outgoing records are encrypted into one
//! buffer written with a single `write` per batch.
//!
//! The stream is meant for one owner at a time (a leg task reads or writes); it still
//! answers TLS housekeeping (key updates) from either side.
//!
//! A channel-bound `tls://` leg goes further once its Noise handshake is done:
//! [`TlsStream::hand_over_keys`] takes the TLS traffic keys out of rustls into the leg's
//! record layer ([`halfpipe_core::record::RecordSealer::tls13`]), which seals and opens
//! TLS records in the tunnel's own buffers; the stream then passes raw bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use halfpipe_core::handshake::ChannelBinding;
use halfpipe_core::record::{RecordOpener, RecordSealer, TlsCipher, TlsTrafficKey};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::channel_binding::ExporterSecretLog;

/// Socket bytes read at once (many TLS records per `recv`).
const READ_WINDOW: usize = 128 * 1024;
/// Plaintext encrypted per `poll_write` (four full records).
const WRITE_CHUNK: usize = 64 * 1024;
/// Largest TLS record on the wire: header, 16 KiB payload, content type, tag, padding.
const MAX_RECORD: usize = 5 + 16384 + 256;

/// The two sides of rustls' unbuffered connection, behind one interface.
pub trait TlsSide: Send + Unpin + 'static {
    /// The connection data type (client or server).
    type Data;
    /// Processes the records in `incoming` (see `UnbufferedConnectionCommon`).
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// The negotiated cipher suite, once known.
    fn suite(&self) -> Option<rustls::CipherSuite>;
    /// Ends rustls' part after the handshake, handing out both directions' traffic keys.
    fn extract_keys(self) -> Result<rustls::ExtractedSecrets, rustls::Error>;
}

impl TlsSide for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn suite(&self) -> Option<rustls::CipherSuite> {
        self.negotiated_cipher_suite().map(|s| s.suite())
    }
    fn extract_keys(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        // The kernel-connection half (key updates, tickets) is dropped: a leg that meets
        // either is replaced instead.
        self.dangerous_into_kernel_connection()
            .map(|(keys, _)| keys)
    }
}

impl TlsSide for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn suite(&self) -> Option<rustls::CipherSuite> {
        self.negotiated_cipher_suite().map(|s| s.suite())
    }
    fn extract_keys(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        // The kernel-connection half (key updates, tickets) is dropped: a leg that meets
        // either is replaced instead.
        self.dangerous_into_kernel_connection()
            .map(|(keys, _)| keys)
    }
}

fn encode_need(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_need(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn tls_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn handed_over() -> io::Error {
    io::Error::other("the TLS keys of this connection were handed over to its record layer")
}

/// A leg's TLS connection after [`TlsStream::hand_over_keys`]: the record layer for each
/// direction, and what was received but not yet opened.
pub struct HandedOver {
    /// Seals what this end sends, continuing rustls' sequence numbers.
    pub sealer: RecordSealer,
    /// Opens what this end receives.
    pub opener: RecordOpener,
    /// TLS bytes already read from the socket, to be opened before any others.
    pub unread: BytesMut,
}

/// One direction's key as the record layer takes it.
fn record_key(
    (seq, secrets): &(u64, rustls::ConnectionTrafficSecrets),
) -> io::Result<TlsTrafficKey<'_>> {
    use rustls::ConnectionTrafficSecrets as S;
    let (cipher, key, iv) = match secrets {
        S::Aes128Gcm { key, iv } => (TlsCipher::Aes128Gcm, key, iv),
        S::Aes256Gcm { key, iv } => (TlsCipher::Aes256Gcm, key, iv),
        S::Chacha20Poly1305 { key, iv } => (TlsCipher::ChaCha20Poly1305, key, iv),
        _ => {
            return Err(tls_err(
                "TLS cipher suite not supported by the record layer",
            ))
        }
    };
    let iv: [u8; 12] = iv
        .as_ref()
        .try_into()
        .map_err(|_| tls_err("TLS IV is not 12 bytes"))?;
    Ok(TlsTrafficKey {
        cipher,
        key: key.as_ref(),
        iv,
        seq: *seq,
    })
}

/// Received TLS bytes: `buf[start..end]` is not yet processed by rustls.
struct Incoming {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Incoming {
    fn new() -> Self {
        Self {
            buf: vec![0; READ_WINDOW],
            start: 0,
            end: 0,
        }
    }

    /// No window at all (after a key hand-over, when nothing is read through it).
    fn empty() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    fn discard(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space to read into, moving an unprocessed tail to the front when the end is
    /// near (at most one partial record is ever moved).
    fn spare(&mut self) -> &mut [u8] {
        if self.buf.len() - self.end < MAX_RECORD {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }
}

/// Encrypted bytes waiting for the socket: `buf[pos..]`.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    pos: usize,
}

impl Outgoing {
    fn pending(&self) -> bool {
        self.pos < self.buf.len()
    }

    /// Writes what is pending; `Ready(Ok)` once all of it is on the socket.
    fn poll_flush(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.buf[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.buf.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Appends the output of `fill` (which reports the size it needs when short).
    fn append<E>(
        &mut self,
        mut fill: impl FnMut(&mut [u8]) -> Result<usize, E>,
        required: fn(&E) -> Option<usize>,
    ) -> Result<(), E> {
        let at = self.buf.len();
        let mut room = 4096;
        loop {
            self.buf.resize(at + room, 0);
            match fill(&mut self.buf[at..]) {
                Ok(n) => {
                    self.buf.truncate(at + n);
                    return Ok(());
                }
                Err(e) => match required(&e) {
                    Some(need) if need > room => room = need,
                    _ => {
                        self.buf.truncate(at);
                        return Err(e);
                    }
                },
            }
        }
    }
}

/// Decrypted bytes not yet delivered: `buf[pos..]`.
#[derive(Default)]
struct Plain {
    buf: Vec<u8>,
    pos: usize,
}

impl Plain {
    fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.is_empty() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Moves as much as fits into `dst`.
    fn take_into(&mut self, dst: &mut ReadBuf<'_>) {
        let n = (self.buf.len() - self.pos).min(dst.remaining());
        dst.put_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
    }
}

/// What one step of the TLS state machine asks for.
enum Step {
    /// Application data was delivered (into the caller's buffer or the plaintext queue).
    Data,
    /// Handshake or housekeeping records were queued for sending.
    Send,
    /// Nothing to do until more bytes arrive.
    NeedInput,
    /// The handshake is done and application data may be written.
    Writable,
    /// The peer sent close_notify.
    PeerClosed,
}

/// A TLS stream over TCP (client or server side).
pub struct TlsStream<C: TlsSide> {
    io: TcpStream,
    /// rustls' connection; `None` once the keys were handed over (raw pass-through).
    conn: Option<C>,
    incoming: Incoming,
    outgoing: Outgoing,
    plain: Plain,
    peer_closed: bool,
    handshake_done: bool,
    channel_binding: Option<ChannelBinding>,
}

/// The client side.
pub type ClientTlsStream = TlsStream<UnbufferedClientConnection>;
/// The server side.
pub type ServerTlsStream = TlsStream<UnbufferedServerConnection>;

/// Runs a client handshake on `io` for `name`.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    io: TcpStream,
) -> io::Result<ClientTlsStream> {
    // A configuration of this connection's own, so that its key log sees only its secret.
    let log = Arc::new(ExporterSecretLog::default());
    let mut config = (*config).clone();
    config.key_log = log.clone();
    let conn = UnbufferedClientConnection::new(Arc::new(config), name).map_err(tls_err)?;
    TlsStream::new(io, conn).handshake(&log).await
}

/// Runs a server handshake on an accepted `io`.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    io: TcpStream,
) -> io::Result<ServerTlsStream> {
    let log = Arc::new(ExporterSecretLog::default());
    let mut config = (*config).clone();
    config.key_log = log.clone();
    let conn = UnbufferedServerConnection::new(Arc::new(config)).map_err(tls_err)?;
    TlsStream::new(io, conn).handshake(&log).await
}

impl<C: TlsSide> TlsStream<C> {
    fn new(io: TcpStream, conn: C) -> Self {
        Self {
            io,
            conn: Some(conn),
            incoming: Incoming::new(),
            outgoing: Outgoing::default(),
            plain: Plain::default(),
            peer_closed: false,
            handshake_done: false,
            channel_binding: None,
        }
    }

    /// This connection's channel binding (its TLS 1.3 exporter value for halfpipe legs).
    pub fn channel_binding(&self) -> Option<ChannelBinding> {
        self.channel_binding
    }

    /// The TCP socket underneath.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    /// The rustls connection (negotiated parameters, peer certificates); `None` once the
    /// keys were handed over.
    pub fn connection(&self) -> Option<&C> {
        self.conn.as_ref()
    }

    /// Takes the traffic keys out of rustls for a record layer that seals and opens TLS
    /// records itself; from then on this stream passes raw bytes. Refused while decrypted
    /// bytes wait for the reader (the peer sent data in the same record as the handshake's
    /// last message) or records wait to be sent.
    pub fn hand_over_keys(&mut self) -> io::Result<HandedOver> {
        if !self.plain.is_empty() {
            return Err(tls_err(
                "application data arrived in the record of the leg handshake",
            ));
        }
        if self.outgoing.pending() {
            return Err(tls_err("TLS records still wait to be sent"));
        }
        let keys = self
            .conn
            .take()
            .ok_or_else(handed_over)?
            .extract_keys()
            .map_err(tls_err)?;
        let sealer = RecordSealer::tls13(&record_key(&keys.tx)?).map_err(tls_err)?;
        let opener = RecordOpener::tls13(&record_key(&keys.rx)?).map_err(tls_err)?;
        let unread = BytesMut::from(self.incoming.window() as &[u8]);
        self.incoming = Incoming::empty();
        Ok(HandedOver {
            sealer,
            opener,
            unread,
        })
    }

    /// One step of the state machine. Application data goes into `dst` while it has
    /// room, the rest into the plaintext queue.
    fn step(&mut self, mut dst: Option<&mut ReadBuf<'_>>) -> io::Result<Step> {
        let conn = self.conn.as_mut().ok_or_else(handed_over)?;
        let UnbufferedStatus { mut discard, state } = conn.process(self.incoming.window());
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                // What rustls consumed before failing goes even on an error: fed again,
                // the failed bytes would fail again (and rustls sends one fatal alert).
                self.incoming.discard(discard);
                return Err(tls_err(e));
            }
        };
        let step = match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_err)?;
                    discard += record.discard;
                    let mut payload = record.payload;
                    if let Some(dst) = dst.as_deref_mut() {
                        let n = payload.len().min(dst.remaining());
                        dst.put_slice(&payload[..n]);
                        payload = &payload[n..];
                    }
                    if !payload.is_empty() {
                        // Decrypt no further than the record that overflows: what follows
                        // stays in `incoming`, where a key hand-over finds it.
                        self.plain.push(payload);
                        break;
                    }
                }
                Step::Data
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                self.outgoing
                    .append(|out| encode.encode(out), encode_need)
                    .map_err(tls_err)?;
                Step::Send
            }
            ConnectionState::TransmitTlsData(transmit) => {
                // The encoded records are in `outgoing`; the caller flushes them.
                transmit.done();
                Step::Send
            }
            ConnectionState::BlockedHandshake => Step::NeedInput,
            ConnectionState::WriteTraffic(_) => {
                self.handshake_done = true;
                Step::Writable
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                self.peer_closed = true;
                Step::PeerClosed
            }
            ConnectionState::ReadEarlyData(_) => {
                return Err(tls_err("unexpected TLS early data"));
            }
            _ => return Err(tls_err("unknown TLS connection state")),
        };
        self.incoming.discard(discard);
        Ok(step)
    }

    /// Reads more TLS bytes from the socket; `Ready(Ok(0))` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let spare = self.incoming.spare();
        if spare.is_empty() {
            return Poll::Ready(Err(tls_err("TLS message larger than the receive window")));
        }
        let mut rb = ReadBuf::new(spare);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.incoming.end += n;
        Poll::Ready(Ok(n))
    }

    /// Runs the handshake; `log` is this connection's key log, which receives the exporter
    /// secret the channel binding is derived from.
    async fn handshake(mut self, log: &ExporterSecretLog) -> io::Result<Self> {
        match self.drive_handshake().await {
            Ok(()) => {
                let suite = self.conn.as_ref().and_then(|c| c.suite());
                self.channel_binding = log.take_binding(suite);
                Ok(self)
            }
            Err(e) => {
                // Tell the peer why (rustls queues a fatal alert), best effort. Stop once
                // the alert is encoded: the next call would go on deframing the bytes
                // that failed, fail again and try a second fatal alert.
                let before = self.outgoing.buf.len();
                while self.outgoing.buf.len() == before {
                    if !matches!(self.step(None), Ok(Step::Send)) {
                        break;
                    }
                }
                let _ = self.flush_outgoing().await;
                Err(e)
            }
        }
    }

    async fn drive_handshake(&mut self) -> io::Result<()> {
        loop {
            match self.step(None)? {
                Step::Data | Step::Send => {}
                Step::Writable => {
                    self.flush_outgoing().await?;
                    return Ok(());
                }
                Step::NeedInput => {
                    self.flush_outgoing().await?;
                    let n = std::future::poll_fn(|cx| self.poll_fill(cx)).await?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed the connection during the TLS handshake",
                        ));
                    }
                }
                Step::PeerClosed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection during the TLS handshake",
                    ))
                }
            }
        }
    }

    async fn flush_outgoing(&mut self) -> io::Result<()> {
        let (out, io) = (&mut self.outgoing, &mut self.io);
        std::future::poll_fn(|cx| out.poll_flush(io, cx)).await?;
        self.io.flush().await
    }

    /// Drives the state machine (keeping records that arrive for the reader, queueing
    /// housekeeping records) until application data may be written, then runs `write`.
    fn with_write_traffic(
        &mut self,
        write: impl FnOnce(&mut WriteTraffic<'_, C::Data>, &mut Outgoing) -> Result<(), EncryptError>,
    ) -> io::Result<()> {
        let mut write = Some(write);
        loop {
            let conn = self.conn.as_mut().ok_or_else(handed_over)?;
            let UnbufferedStatus { mut discard, state } = conn.process(self.incoming.window());
            let mut done = false;
            match state.map_err(tls_err)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some(write) = write.take() {
                        write(&mut traffic, &mut self.outgoing).map_err(tls_err)?;
                    }
                    done = true;
                }
                ConnectionState::ReadTraffic(mut traffic) => {
                    // Records that arrived while writing: keep them for the reader.
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(tls_err)?;
                        discard += record.discard;
                        self.plain.push(record.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    self.outgoing
                        .append(|out| encode.encode(out), encode_need)
                        .map_err(tls_err)?;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                _ => return Err(tls_err("TLS connection cannot send now")),
            }
            self.incoming.discard(discard);
            if done {
                return Ok(());
            }
        }
    }

    /// Sends queued housekeeping records if the socket takes them now; never blocks
    /// the read side on the write side.
    fn try_flush(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.outgoing.poll_flush(&mut self.io, cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }
}

impl<C: TlsSide> AsyncRead for TlsStream<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.plain.is_empty() {
            this.plain.take_into(buf);
            return Poll::Ready(Ok(()));
        }
        if this.conn.is_none() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if this.peer_closed {
            return Poll::Ready(Ok(())); // close_notify seen (rustls reports it only once)
        }
        let before = buf.filled().len();
        loop {
            match this.step(Some(buf))? {
                Step::Data => {
                    // Keep decrypting whole records while the caller has room.
                    if buf.remaining() == 0 || !this.plain.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Step::Send => this.try_flush(cx)?,
                Step::PeerClosed => return Poll::Ready(Ok(())),
                Step::NeedInput | Step::Writable => {
                    if buf.filled().len() > before {
                        return Poll::Ready(Ok(()));
                    }
                    let n = ready!(this.poll_fill(cx))?;
                    if n == 0 {
                        // The peer closed without close_notify: a truncation, not an end.
                        let what = if this.incoming.start == this.incoming.end {
                            "peer closed the connection without TLS close_notify"
                        } else {
                            "connection closed inside a TLS record"
                        };
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            what,
                        )));
                    }
                }
            }
        }
    }
}

impl<C: TlsSide> AsyncWrite for TlsStream<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.outgoing.poll_flush(&mut this.io, cx))?;
        if this.conn.is_none() {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(WRITE_CHUNK)];
        this.with_write_traffic(|traffic, out| {
            out.append(|buf| traffic.encrypt(data, buf), encrypt_need)
        })?;
        // Start the write now; the next call finishes it.
        this.try_flush(cx)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.outgoing.poll_flush(&mut this.io, cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.handshake_done && this.conn.is_some() {
            this.handshake_done = false; // queue close_notify once
            this.with_write_traffic(|traffic, out| {
                out.append(|buf| traffic.queue_close_notify(buf), encrypt_need)
            })?;
        }
        ready!(this.outgoing.poll_flush(&mut this.io, cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected client/server pair over loopback with a fresh dev certificate.
    async fn pair() -> (ClientTlsStream, ServerTlsStream) {
        let certs = crate::cert::TestCerts::new("tls-stream");
        let (c, k, _) = certs.write("cert");
        let server_cfg = crate::tls::server_config(&c, &k).unwrap();
        let client_cfg = crate::tls::client_config(&crate::tls::ServerTrust::CaFile(c)).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            accept(server_cfg, s).await.unwrap()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client = connect(client_cfg, name, tcp).await.unwrap();
        let _ = std::fs::remove_dir_all(&certs.dir);
        (client, server.await.unwrap())
    }

    /// Deterministic test bytes.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[0] ^ seed)
            .collect()
    }

    /// Writes `data` in uneven pieces, then closes with close_notify.
    async fn send_all<W: AsyncWrite + Unpin>(mut w: W, data: Vec<u8>) -> W {
        let mut at = 0;
        let mut step = 1;
        while at < data.len() {
            let n = step.min(data.len() - at);
            w.write_all(&data[at..at + n]).await.unwrap();
            at += n;
            step = (step * 7 + 13) % 200_000 + 1;
        }
        w.shutdown().await.unwrap();
        w
    }

    /// Reads to the end with reads of `chunk` bytes and hashes what came.
    async fn hash_all<R: AsyncRead + Unpin>(mut r: R, chunk: usize) -> ([u8; 32], usize, R) {
        let mut h = Sha256::new();
        let mut buf = vec![0; chunk];
        let mut total = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            h.update(&buf[..n]);
        }
        (h.finalize().into(), total, r)
    }

    #[tokio::test]
    async fn bulk_both_ways_with_large_and_tiny_reads() {
        let (client, server) = pair().await;
        let up = pattern(24 << 20, 1);
        let want: [u8; 32] = Sha256::digest(&up).into();
        let sender = tokio::spawn(send_all(client, up));
        let (got, n, server) = hash_all(server, 256 * 1024).await;
        assert_eq!((got, n), (want, 24 << 20));
        let client = sender.await.unwrap();

        // The other direction, read a few bytes at a time (records larger than the
        // reader's buffer are kept and handed out in order).
        let down = pattern(3 << 20, 2);
        let want: [u8; 32] = Sha256::digest(&down).into();
        let sender = tokio::spawn(send_all(server, down));
        let (got, n, _client) = hash_all(client, 7).await;
        assert_eq!((got, n), (want, 3 << 20));
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn handed_over_keys_seal_and_open_records_rustls_itself_reads_and_writes() {
        use halfpipe_core::record::TLS_MAX_PLAINTEXT;
        let (mut client, mut server) = pair().await;
        // Traffic through rustls first, so the handed-over sequence numbers are not zero;
        // the server sends a bulk right behind its reply, part of which the client will
        // already have read (and must open after the hand-over).
        client.write_all(b"hello").await.unwrap();
        client.flush().await.unwrap();
        let mut five = [0u8; 5];
        server.read_exact(&mut five).await.unwrap();
        let down = pattern(300_000, 5);
        server.write_all(b"reply").await.unwrap();
        server.write_all(&down).await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"reply");

        let mut h = client.hand_over_keys().expect("hand-over");
        assert!(
            client.hand_over_keys().is_err(),
            "the keys are handed over once"
        );
        let mut buf = h.unread;
        let mut got = Vec::new();
        while got.len() < down.len() {
            while let Some(p) = h.opener.open_next(&mut buf).unwrap() {
                got.extend_from_slice(&p);
            }
            if got.len() < down.len() {
                buf.reserve(64 * 1024);
                assert!(client.read_buf(&mut buf).await.unwrap() > 0);
            }
        }
        assert_eq!(got, down);

        // The other way: records sealed by the client, read by rustls on the server.
        let up = pattern(200_000, 6);
        let mut wire = Vec::new();
        for chunk in up.chunks(TLS_MAX_PLAINTEXT) {
            let start = h.sealer.begin(&mut wire);
            wire.extend_from_slice(chunk);
            h.sealer.seal(&mut wire, start).unwrap();
        }
        client.write_all(&wire).await.unwrap();
        client.flush().await.unwrap();
        let mut back = vec![0u8; up.len()];
        server.read_exact(&mut back).await.unwrap();
        assert_eq!(back, up);
    }

    #[tokio::test]
    async fn keys_are_not_handed_over_while_decrypted_bytes_wait_for_the_reader() {
        let (mut client, mut server) = pair().await;
        // Data packed into the record of the last handshake message would be lost to a
        // record layer that starts after it: refused instead.
        server.write_all(b"replyEXTRA").await.unwrap();
        server.flush().await.unwrap();
        let mut five = [0u8; 5];
        client.read_exact(&mut five).await.unwrap();
        let e = client.hand_over_keys().err().expect("refused");
        assert!(e.to_string().contains("record of the leg handshake"), "{e}");
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors_not_panics() {
        // Random bytes where a ServerHello should be.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            // The ClientHello is one record: its header says how long it is.
            let mut header = [0u8; 5];
            s.read_exact(&mut header).await.unwrap();
            let mut hello = vec![0u8; u16::from_be_bytes([header[3], header[4]]) as usize];
            s.read_exact(&mut hello).await.unwrap();
            let _ = s.write_all(&pattern(4096, 9)).await;
            // What the client answers before it closes.
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
            answer
        });
        let cfg = crate::tls::client_config(&crate::tls::ServerTrust::WebRoots).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let e = connect(cfg, ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .err()
            .expect("garbage accepted as a handshake");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // The client told the peer why, once: one fatal alert record (type 21, level 2).
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), peer)
            .await
            .expect("the client closed within 5 s")
            .unwrap();
        assert_eq!(answer.len(), 7, "one alert record: {answer:?}");
        assert_eq!((answer[0], answer[5]), (21, 2), "a fatal alert: {answer:?}");

        // A peer that vanishes in the middle of a record: an application-data header
        // announcing 16 KiB, 500 bytes of it, then end of stream.
        let (mut client, mut server) = pair().await;
        let mut cut = vec![23, 3, 3, 0x40, 0x00];
        cut.extend(pattern(500, 4));
        server.io.write_all(&cut).await.unwrap();
        server.io.shutdown().await.unwrap();
        let mut buf = [0u8; 64];
        let r = client.read(&mut buf).await;
        assert!(r.is_err(), "a record cut short must be an error: {r:?}");
    }

    #[tokio::test]
    async fn both_ends_of_a_connection_share_its_binding_and_no_other_connection_has_it() {
        let (c1, s1) = pair().await;
        let (c2, s2) = pair().await;
        let b1 = c1
            .channel_binding()
            .expect("a TLS 1.3 client has a binding");
        assert_eq!(Some(b1), s1.channel_binding());
        assert_eq!(c2.channel_binding(), s2.channel_binding());
        assert_ne!(Some(b1), c2.channel_binding(), "fresh per connection");
    }

    #[tokio::test]
    async fn the_binding_is_the_tls_exporter_value_rustls_itself_computes_in_every_suite() {
        use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
        let certs = crate::cert::TestCerts::new("tls-binding");
        let (c, k, _) = certs.write("cert");
        let base = crate::tls::server_config(&c, &k).unwrap();
        let client_cfg = crate::tls::client_config(&crate::tls::ServerTrust::CaFile(c)).unwrap();
        for suite in [
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            // A buffered rustls server (which has an exporter call) limited to `suite`.
            let mut provider = default_provider();
            provider.cipher_suites = vec![suite];
            let server_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(base.cert_resolver.clone());
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                let tls = acceptor.accept(s).await.unwrap();
                tls.get_ref()
                    .1
                    .export_keying_material(
                        [0u8; 32],
                        crate::channel_binding::EXPORTER_LABEL,
                        Some(b""),
                    )
                    .unwrap()
            });
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let client = connect(client_cfg.clone(), name, tcp).await.unwrap();
            assert_eq!(
                client
                    .connection()
                    .unwrap()
                    .negotiated_cipher_suite()
                    .map(|s| s.suite()),
                Some(suite.suite())
            );
            let theirs = server.await.unwrap();
            assert_eq!(
                client.channel_binding().map(|b| b.0),
                Some(theirs),
                "{:?}",
                suite.suite()
            );
        }
        let _ = std::fs::remove_dir_all(&certs.dir);
    }
}
