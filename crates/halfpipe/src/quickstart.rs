//! The zero-config local quickstart: keys, a development certificate and both
//! configurations in a state directory, then an exit and a client on loopback with the
//! uplink and downlink on different ports, checked end to end.
//!
//! The same state directory also serves `halfpipe bench`, which runs the two ends as
//! separate processes from these files.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::client::{serve_inbound, Exit, Inbound};
use crate::config::{self, ClientTemplate, ConfigErrors, ServerTemplate};
use crate::keyfile::{encode_key, write_private_key, write_public_key, KeyFileError};
use crate::server::Server;

/// Why the quickstart could not run.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    /// Creating the state directory or a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Key generation or writing failed.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// Certificate generation failed.
    #[error(transparent)]
    Cert(#[from] crate::cert::CertError),
    /// The generated configuration did not load (a bug, or files edited by hand).
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// The exit could not start.
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    /// The exit's state directory could not be created.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// Noise key generation failed.
    #[error(transparent)]
    Handshake(#[from] halfpipe_core::handshake::HandshakeError),
    /// The end-to-end check failed.
    #[error("end-to-end check failed: {0}")]
    Check(String),
}

/// The files of a state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    /// The directory.
    pub dir: PathBuf,
}

impl StateDir {
    /// `server.toml`.
    pub fn server_toml(&self) -> PathBuf {
        self.dir.join("server.toml")
    }

    /// `client.toml`.
    pub fn client_toml(&self) -> PathBuf {
        self.dir.join("client.toml")
    }
}

/// Ports of a generated setup.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// Uplink listener.
    pub uplink: u16,
    /// Downlink listener.
    pub downlink: u16,
    /// SOCKS5 inbound.
    pub socks: u16,
    /// HTTP CONNECT inbound.
    pub http: u16,
}

impl Ports {
    /// The preferred ports, each replaced by a free one when taken.
    pub fn pick(preferred: [u16; 4]) -> Result<Self, QuickstartError> {
        let mut got = Vec::new();
        // Hold every probe listener until all are chosen so the four ports differ.
        let mut held = Vec::new();
        for p in preferred {
            let l = StdListener::bind(("127.0.0.1", p))
                .or_else(|_| StdListener::bind(("127.0.0.1", 0)))
                .map_err(|source| QuickstartError::Io {
                    path: PathBuf::from("127.0.0.1"),
                    source,
                })?;
            got.push(l.local_addr().map(|a| a.port()).unwrap_or(p));
            held.push(l);
        }
        Ok(Self {
            uplink: got[0],
            downlink: got[1],
            socks: got[2],
            http: got[3],
        })
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> QuickstartError + '_ {
    move |source| QuickstartError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates keys, certificate and configurations in `dir` unless `server.toml` exists,
/// with `tls://` legs. Returns whether files were created.
pub fn prepare(dir: &Path, ports: Ports) -> Result<bool, QuickstartError> {
    prepare_with(dir, ports, ["tls", "tls"])
}

/// Like [`prepare`], with the uplink and downlink schemes given (`tls`, `tcp`, `quic`).
pub fn prepare_with(dir: &Path, ports: Ports, schemes: [&str; 2]) -> Result<bool, QuickstartError> {
    let state = StateDir {
        dir: dir.to_owned(),
    };
    if state.server_toml().exists() && state.client_toml().exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_at(dir))?;
    let (server_private, server_public) = halfpipe_core::handshake::generate_keypair()?;
    let (user_private, user_public) = halfpipe_core::handshake::generate_keypair()?;
    write_private_key(&dir.join("server.key"), &server_private)?;
    write_public_key(&dir.join("server.pub"), &server_public)?;
    write_private_key(&dir.join("client.key"), &user_private)?;
    write_public_key(&dir.join("client.pub"), &user_public)?;
    let cert =
        crate::cert::generate_self_signed(&["localhost".into(), "127.0.0.1".into(), "::1".into()])?;
    crate::cert::write_dev_cert(&cert, &dir.join("cert.pem"), &dir.join("cert.key"))?;
    let up = format!("{}://127.0.0.1:{}", schemes[0], ports.uplink);
    let down = format!("{}://127.0.0.1:{}", schemes[1], ports.downlink);
    let server = config::server_toml(&ServerTemplate {
        listen: &[up.clone(), down.clone()],
        users: &[("quickstart".into(), encode_key(&user_public))],
        allow: &["127.0.0.0/8".into(), "::1/128".into()],
        allow_comment: "QUICKSTART ONLY: loopback is allowed so the local demo can reach local pages. Remove for real use.",
    });
    let client = config::client_toml(&ClientTemplate {
        server_public_key: &encode_key(&server_public),
        uplink: &up,
        downlink: &down,
        server_name: "localhost",
        ca_file: "cert.pem",
        socks: &format!("127.0.0.1:{}", ports.socks),
        http: &format!("127.0.0.1:{}", ports.http),
    });
    std::fs::write(state.server_toml(), server).map_err(io_at(&state.server_toml()))?;
    std::fs::write(state.client_toml(), client).map_err(io_at(&state.client_toml()))?;
    let settings = config::load_server(&state.server_toml(), &config::process_env)?;
    crate::control::init::init(&settings.control, None)?;
    Ok(true)
}

/// A running in-process exit and client built from a state directory.
pub struct Running {
    /// SOCKS5 address.
    pub socks: SocketAddr,
    /// HTTP CONNECT address.
    pub http: Option<SocketAddr>,
    /// Leg URLs of the exit.
    pub legs: Vec<String>,
    /// The client's connection to the exit.
    pub exit: Arc<Exit>,
}

/// Starts the exit and the client from the configurations in `dir`.
pub async fn start(dir: &Path) -> Result<Running, QuickstartError> {
    let state = StateDir {
        dir: dir.to_owned(),
    };
    let server = config::load_server(&state.server_toml(), &config::process_env)?;
    let client = config::load_client(&state.client_toml(), &config::process_env)?;
    if !server.control.paths.db.exists() {
        // A directory made before the exit had a control plane: give it one.
        crate::control::init::init(&server.control, None)?;
    }
    let server = Server::bind(server).await?;
    let legs = server.urls().iter().map(ToString::to_string).collect();
    tokio::spawn(server.run());
    let exit = Exit::new(client.exit);
    let (mut socks, mut http) = (None, None);
    for (addr, inbound) in client.inbounds {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| QuickstartError::Io {
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
        match inbound {
            Inbound::Socks5(_) => socks = Some(addr),
            Inbound::HttpConnect(_) => http = Some(addr),
            Inbound::Forward(_) => {}
        }
        tokio::spawn(serve_inbound(l, inbound, exit.clone()));
    }
    let socks = socks
        .ok_or_else(|| QuickstartError::Check("client.toml has no [socks5] section".into()))?;
    Ok(Running {
        socks,
        http,
        legs,
        exit,
    })
}

/// Fetches a page served on loopback through the SOCKS5 inbound and checks its body.
pub async fn self_check(socks: SocketAddr) -> Result<(), QuickstartError> {
    const BODY: &str = "halfpipe quickstart check";
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| QuickstartError::Check(e.to_string()))?;
    let page = l
        .local_addr()
        .map_err(|e| QuickstartError::Check(e.to_string()))?;
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{BODY}",
                BODY.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    let check = async {
        let mut s = TcpStream::connect(socks).await?;
        s.write_all(&[5, 1, 0]).await?;
        let mut m = [0u8; 2];
        s.read_exact(&mut m).await?;
        let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
        req.extend_from_slice(&page.port().to_be_bytes());
        s.write_all(&req).await?;
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).await?;
        if reply[1] != 0 {
            return Err(std::io::Error::other(format!(
                "SOCKS5 reply code {}",
                reply[1]
            )));
        }
        s.write_all(b"GET / HTTP/1.1\r\nHost: check\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        if String::from_utf8_lossy(&body).ends_with(BODY) {
            Ok(())
        } else {
            Err(std::io::Error::other("unexpected page content"))
        }
    };
    tokio::time::timeout(Duration::from_secs(20), check)
        .await
        .map_err(|_| QuickstartError::Check("timed out after 20 s".into()))?
        .map_err(|e| QuickstartError::Check(e.to_string()))
}
