//! SOCKS5 server side (RFC 1928 CONNECT, RFC 1929 username/password).
//!
//! [`accept`] negotiates and reads the request; it answers protocol errors itself with the
//! matching reply code (7 command not supported, 8 address type not supported, 1 general
//! failure for malformed requests) before returning the error. [`reply`] sends the answer
//! once the exit reports its connect outcome.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use halfpipe_core::{ConnectStatus, TargetAddr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const VERSION: u8 = 5;
const METHOD_NONE: u8 = 0x00;
const METHOD_USERPASS: u8 = 0x02;
const METHOD_UNACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const REPLY_COMMAND_NOT_SUPPORTED: u8 = 7;

/// How SOCKS5 clients must authenticate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Socks5Auth {
    /// No authentication.
    None,
    /// RFC 1929 username and password.
    UserPass {
        /// Expected username.
        username: String,
        /// Expected password.
        password: String,
    },
}

/// A SOCKS5 request that could not be served.
#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    /// Not SOCKS version 5.
    #[error("not a SOCKS5 client (version byte {0:#04x})")]
    BadVersion(u8),
    /// The client offered no method we accept.
    #[error("client offered no acceptable authentication method")]
    NoAcceptableMethod,
    /// Wrong username or password.
    #[error("username/password authentication failed")]
    AuthFailed,
    /// BIND, UDP ASSOCIATE or an unknown command.
    #[error("command {0} not supported (only CONNECT)")]
    UnsupportedCommand(u8),
    /// Unknown address type.
    #[error("address type {0} not supported")]
    UnsupportedAddressType(u8),
    /// A field with an impossible value.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Socket error, including the client going away mid-request.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Negotiates authentication and reads a CONNECT request.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    auth: &Socks5Auth,
) -> Result<TargetAddr, Socks5Error> {
    let ver = s.read_u8().await?;
    if ver != VERSION {
        return Err(Socks5Error::BadVersion(ver));
    }
    let n = s.read_u8().await? as usize;
    let mut methods = [0u8; 255];
    s.read_exact(&mut methods[..n]).await?;
    let methods = &methods[..n];
    let want = match auth {
        Socks5Auth::None => METHOD_NONE,
        Socks5Auth::UserPass { .. } => METHOD_USERPASS,
    };
    if !methods.contains(&want) {
        s.write_all(&[VERSION, METHOD_UNACCEPTABLE]).await?;
        return Err(Socks5Error::NoAcceptableMethod);
    }
    s.write_all(&[VERSION, want]).await?;
    if let Socks5Auth::UserPass { username, password } = auth {
        check_user_pass(s, username, password).await?;
    }
    read_request(s).await
}

async fn check_user_pass<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    username: &str,
    password: &str,
) -> Result<(), Socks5Error> {
    let ver = s.read_u8().await?;
    if ver != 1 {
        s.write_all(&[1, 1]).await?;
        return Err(Socks5Error::Malformed(
            "username/password sub-negotiation version",
        ));
    }
    let user = read_short_string(s).await?;
    let pass = read_short_string(s).await?;
    let ok_user = constant_time_eq(&user, username.as_bytes());
    let ok_pass = constant_time_eq(&pass, password.as_bytes());
    if ok_user & ok_pass {
        s.write_all(&[1, 0]).await?;
        Ok(())
    } else {
        s.write_all(&[1, 1]).await?;
        Err(Socks5Error::AuthFailed)
    }
}

/// Compares secrets without an early exit on the first differing byte.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

async fn read_short_string<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, Socks5Error> {
    let len = s.read_u8().await? as usize;
    let mut v = vec![0u8; len];
    s.read_exact(&mut v).await?;
    Ok(v)
}

async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<TargetAddr, Socks5Error> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    let [ver, cmd, rsv, atyp] = head;
    if ver != VERSION {
        send_code(s, ConnectStatus::GeneralFailure as u8).await?;
        return Err(Socks5Error::BadVersion(ver));
    }
    if rsv != 0 {
        send_code(s, ConnectStatus::GeneralFailure as u8).await?;
        return Err(Socks5Error::Malformed("reserved byte is not zero"));
    }
    if cmd != CMD_CONNECT {
        send_code(s, REPLY_COMMAND_NOT_SUPPORTED).await?;
        return Err(Socks5Error::UnsupportedCommand(cmd));
    }
    let target = match atyp {
        1 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await?;
            TargetAddr::Ip(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(a)),
                s.read_u16().await?,
            ))
        }
        4 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await?;
            TargetAddr::Ip(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a)),
                s.read_u16().await?,
            ))
        }
        3 => {
            let name = read_short_string(s).await?;
            let port = s.read_u16().await?;
            match String::from_utf8(name) {
                Ok(n) if !n.is_empty() => TargetAddr::Domain(n, port),
                _ => {
                    send_code(s, ConnectStatus::GeneralFailure as u8).await?;
                    return Err(Socks5Error::Malformed("domain is empty or not UTF-8"));
                }
            }
        }
        other => {
            send_code(s, ConnectStatus::AddressTypeNotSupported as u8).await?;
            return Err(Socks5Error::UnsupportedAddressType(other));
        }
    };
    Ok(target)
}

async fn send_code<S: AsyncWrite + Unpin>(s: &mut S, code: u8) -> std::io::Result<()> {
    write_reply(s, code, None).await
}

async fn write_reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    code: u8,
    bound: Option<SocketAddr>,
) -> std::io::Result<()> {
    let bound = bound.unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    let mut out = Vec::with_capacity(22);
    out.extend_from_slice(&[VERSION, code, 0]);
    match bound.ip() {
        IpAddr::V4(v4) => {
            out.push(1);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(4);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    s.write_all(&out).await?;
    s.flush().await
}

/// Sends the reply for the exit's connect outcome.
pub async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: ConnectStatus,
    bound: Option<SocketAddr>,
) -> std::io::Result<()> {
    write_reply(s, status as u8, bound).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::duplex;

    async fn run(input: &[u8], auth: Socks5Auth) -> (Result<TargetAddr, Socks5Error>, Vec<u8>) {
        let (mut client, mut server) = duplex(4096);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let r = accept(&mut server, &auth).await;
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (r, out)
    }

    const OK_METHOD: [u8; 2] = [5, 0];

    #[tokio::test]
    async fn every_address_type() {
        let cases: Vec<(Vec<u8>, TargetAddr)> = vec![
            (
                vec![1, 10, 0, 0, 1, 0, 80],
                TargetAddr::Ip("10.0.0.1:80".parse().unwrap()),
            ),
            (
                [vec![4], vec![0; 15], vec![1, 1, 187]].concat(),
                TargetAddr::Ip("[::1]:443".parse().unwrap()),
            ),
            (
                [vec![3, 11], b"example.com".to_vec(), vec![0x1f, 0x90]].concat(),
                TargetAddr::Domain("example.com".into(), 8080),
            ),
        ];
        for (addr, want) in cases {
            let input = [vec![5, 1, 0, 5, 1, 0], addr].concat();
            let (r, out) = run(&input, Socks5Auth::None).await;
            assert_eq!(r.unwrap(), want);
            assert_eq!(out, OK_METHOD);
        }
    }

    #[tokio::test]
    async fn user_pass_right_and_wrong() {
        let auth = Socks5Auth::UserPass {
            username: "u".into(),
            password: "secret".into(),
        };
        let good = [
            &[5, 1, 2, 1, 1, b'u', 6][..],
            b"secret",
            &[5, 1, 0, 1, 1, 2, 3, 4, 0, 80],
        ]
        .concat();
        let (r, out) = run(&good, auth.clone()).await;
        assert!(r.is_ok());
        assert_eq!(out, vec![5, 2, 1, 0]);
        let bad = [&[5, 1, 2, 1, 1, b'u', 5][..], b"wrong"].concat();
        let (r, out) = run(&bad, auth.clone()).await;
        assert!(matches!(r, Err(Socks5Error::AuthFailed)));
        assert_eq!(out, vec![5, 2, 1, 1]);
        // Offering only no-auth when a password is required.
        let (r, out) = run(&[5, 1, 0], auth).await;
        assert!(matches!(r, Err(Socks5Error::NoAcceptableMethod)));
        assert_eq!(out, vec![5, 0xff]);
    }

    fn reply_bytes(code: u8) -> Vec<u8> {
        vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0]
    }

    #[tokio::test]
    async fn errors_get_the_right_reply_code() {
        let (r, out) = run(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80], Socks5Auth::None).await;
        assert!(matches!(r, Err(Socks5Error::UnsupportedCommand(2))));
        assert_eq!(out, [OK_METHOD.to_vec(), reply_bytes(7)].concat());
        let (r, out) = run(&[5, 1, 0, 5, 3, 0, 1, 1, 2, 3, 4, 0, 80], Socks5Auth::None).await;
        assert!(matches!(r, Err(Socks5Error::UnsupportedCommand(3))));
        assert_eq!(out, [OK_METHOD.to_vec(), reply_bytes(7)].concat());
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 9], Socks5Auth::None).await;
        assert!(matches!(r, Err(Socks5Error::UnsupportedAddressType(9))));
        assert_eq!(out, [OK_METHOD.to_vec(), reply_bytes(8)].concat());
        let (r, out) = run(&[5, 1, 0, 5, 1, 1, 1], Socks5Auth::None).await;
        assert!(matches!(r, Err(Socks5Error::Malformed(_))));
        assert_eq!(out, [OK_METHOD.to_vec(), reply_bytes(1)].concat());
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 3, 0, 0, 80], Socks5Auth::None).await;
        assert!(matches!(r, Err(Socks5Error::Malformed(_))));
        assert_eq!(out, [OK_METHOD.to_vec(), reply_bytes(1)].concat());
        let (r, out) = run(&[4, 1, 0, 80], Socks5Auth::None).await;
        assert!(matches!(r, Err(Socks5Error::BadVersion(4))));
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn truncated_requests_are_errors() {
        let full = [5u8, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0, 80];
        for cut in 0..full.len() {
            let (r, _) = run(&full[..cut], Socks5Auth::None).await;
            assert!(matches!(r, Err(Socks5Error::Io(_))), "cut at {cut}: {r:?}");
        }
    }

    #[tokio::test]
    async fn reply_encodes_status_and_bound_address() {
        let mut out = Vec::new();
        reply(&mut out, ConnectStatus::NotAllowed, None)
            .await
            .unwrap();
        assert_eq!(out, reply_bytes(2));
        let mut out = Vec::new();
        reply(
            &mut out,
            ConnectStatus::Succeeded,
            Some("[::1]:5".parse().unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(out, [vec![5, 0, 0, 4], vec![0; 15], vec![1, 0, 5]].concat());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let _ = run(&bytes, Socks5Auth::None).await;
            });
        }
    }
}
