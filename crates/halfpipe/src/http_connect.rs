//! HTTP CONNECT proxy, server side: one `CONNECT host:port HTTP/1.x` request with a
//! bounded head, optional Basic proxy authentication, and replies that map the exit's
//! connect outcome onto HTTP status codes.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use halfpipe_core::{ConnectStatus, TargetAddr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;

/// A CONNECT request that could not be served (the client got the status shown).
#[derive(Debug, thiserror::Error)]
pub enum HttpConnectError {
    /// Head larger than [`MAX_HEAD`] (431).
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// Not a well-formed request (400).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A method other than CONNECT (405).
    #[error("method {0} not allowed (only CONNECT)")]
    Method(String),
    /// Missing or wrong credentials (407).
    #[error("proxy authentication required or wrong")]
    Auth,
    /// Socket error or the client going away.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    extra: &str,
    body: &str,
) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(msg.as_bytes()).await?;
    s.flush().await
}

/// Reads a CONNECT request; returns the target and any bytes sent after the head.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    auth: Option<&(String, String)>,
) -> Result<(TargetAddr, Vec<u8>), HttpConnectError> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() >= MAX_HEAD {
            respond(
                s,
                "431 Request Header Fields Too Large",
                "",
                "request head too large\n",
            )
            .await?;
            return Err(HttpConnectError::HeadTooLarge);
        }
        let mut chunk = [0u8; 1024];
        let want = chunk.len().min(MAX_HEAD + 4 - buf.len());
        let n = s.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(HttpConnectError::Io(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let rest = buf.split_off(head_end);
    match parse_head(&buf, auth) {
        Ok(target) => Ok((target, rest)),
        Err(e) => {
            let (status, extra) = match &e {
                HttpConnectError::Method(_) => ("405 Method Not Allowed", "Allow: CONNECT\r\n"),
                HttpConnectError::Auth => (
                    "407 Proxy Authentication Required",
                    "Proxy-Authenticate: Basic realm=\"halfpipe\"\r\n",
                ),
                _ => ("400 Bad Request", ""),
            };
            respond(s, status, extra, &format!("{e}\n")).await?;
            Err(e)
        }
    }
}

fn parse_head(
    head: &[u8],
    auth: Option<&(String, String)>,
) -> Result<TargetAddr, HttpConnectError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(HttpConnectError::Malformed("not an HTTP/1.x request head")),
    }
    let method = req.method.unwrap_or_default();
    if !method.eq_ignore_ascii_case("CONNECT") {
        return Err(HttpConnectError::Method(method.chars().take(16).collect()));
    }
    let authority = req
        .path
        .ok_or(HttpConnectError::Malformed("missing host:port"))?;
    if let Some((user, pass)) = auth {
        let want = format!("Basic {}", B64.encode(format!("{user}:{pass}")));
        let ok = req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("proxy-authorization")
                && crate::socks5::constant_time_eq(h.value, want.as_bytes())
        });
        if !ok {
            return Err(HttpConnectError::Auth);
        }
    }
    parse_authority(authority)
}

fn parse_authority(a: &str) -> Result<TargetAddr, HttpConnectError> {
    let bad = HttpConnectError::Malformed("target must be host:port");
    let (host, port) = if let Some(v6) = a.strip_prefix('[') {
        let (h, p) = v6.split_once("]:").ok_or(bad)?;
        (h, p)
    } else {
        a.rsplit_once(':').ok_or(bad)?
    };
    let port: u16 = port
        .parse()
        .map_err(|_| HttpConnectError::Malformed("port must be 1..65535"))?;
    if host.is_empty() || host.len() > 255 || port == 0 {
        return Err(HttpConnectError::Malformed(
            "empty or overlong host, or port 0",
        ));
    }
    Ok(match host.parse::<std::net::IpAddr>() {
        Ok(ip) => TargetAddr::Ip(std::net::SocketAddr::new(ip, port)),
        Err(_) => TargetAddr::Domain(host.to_owned(), port),
    })
}

/// Sends the reply for the exit's connect outcome.
pub async fn reply<S: AsyncWrite + Unpin>(s: &mut S, status: ConnectStatus) -> std::io::Result<()> {
    match status {
        ConnectStatus::Succeeded => {
            s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            s.flush().await
        }
        ConnectStatus::NotAllowed => {
            respond(s, "403 Forbidden", "", &format!("{}\n", status.describe())).await
        }
        ConnectStatus::TimedOut => {
            respond(
                s,
                "504 Gateway Timeout",
                "",
                &format!("{}\n", status.describe()),
            )
            .await
        }
        other => respond(s, "502 Bad Gateway", "", &format!("{}\n", other.describe())).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    async fn run(
        input: &[u8],
        auth: Option<(String, String)>,
    ) -> (Result<(TargetAddr, Vec<u8>), HttpConnectError>, String) {
        let (mut client, mut server) = duplex(64 * 1024);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let r = accept(&mut server, auth.as_ref()).await;
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (r, String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn connect_with_pipelined_bytes() {
        let (r, out) = run(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nHELLO",
            None,
        )
        .await;
        let (t, rest) = r.unwrap();
        assert_eq!(t, TargetAddr::Domain("example.com".into(), 443));
        assert_eq!(rest, b"HELLO");
        assert!(out.is_empty());
        let (r, _) = run(b"CONNECT [::1]:8080 HTTP/1.1\r\n\r\n", None).await;
        assert_eq!(r.unwrap().0, TargetAddr::Ip("[::1]:8080".parse().unwrap()));
    }

    #[tokio::test]
    async fn errors_get_their_status() {
        let (r, out) = run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None).await;
        assert!(matches!(r, Err(HttpConnectError::Method(_))));
        assert!(
            out.starts_with("HTTP/1.1 405") && out.contains("Allow: CONNECT"),
            "{out}"
        );
        let (r, out) = run(b"CONNECT nohost HTTP/1.1\r\n\r\n", None).await;
        assert!(matches!(r, Err(HttpConnectError::Malformed(_))));
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        let (r, out) = run(b"\x00\x01garbage\r\n\r\n", None).await;
        assert!(matches!(r, Err(HttpConnectError::Malformed(_))));
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        let huge = [b"CONNECT a:1 HTTP/1.1\r\nX: ".to_vec(), vec![b'a'; 9000]].concat();
        let (r, out) = run(&huge, None).await;
        assert!(matches!(r, Err(HttpConnectError::HeadTooLarge)));
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        let (r, _) = run(b"CONNECT a:1 HTTP/1.1\r\n", None).await;
        assert!(matches!(r, Err(HttpConnectError::Io(_))));
    }

    #[tokio::test]
    async fn basic_auth() {
        let creds = Some(("u".to_string(), "p".to_string()));
        let (r, out) = run(b"CONNECT a:1 HTTP/1.1\r\n\r\n", creds.clone()).await;
        assert!(matches!(r, Err(HttpConnectError::Auth)));
        assert!(
            out.starts_with("HTTP/1.1 407") && out.contains("Proxy-Authenticate"),
            "{out}"
        );
        let ok = format!(
            "CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
            B64.encode("u:p")
        );
        let (r, _) = run(ok.as_bytes(), creds).await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn replies_map_status() {
        for (st, want) in [
            (ConnectStatus::Succeeded, "HTTP/1.1 200"),
            (ConnectStatus::NotAllowed, "HTTP/1.1 403"),
            (ConnectStatus::TimedOut, "HTTP/1.1 504"),
            (ConnectStatus::ConnectionRefused, "HTTP/1.1 502"),
        ] {
            let mut out = Vec::new();
            reply(&mut out, st).await.unwrap();
            assert!(String::from_utf8_lossy(&out).starts_with(want), "{st:?}");
        }
    }
}
