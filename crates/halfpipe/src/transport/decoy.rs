//! What an HTTP-based listener answers to anything that is not a halfpipe leg: an ordinary
//! web response, so a prober learns nothing.
//!
//! Three kinds: a fixed status and body (the default: an nginx-style 404), a static
//! directory, or a reverse proxy to an upstream `http://host:port`. Every request that is
//! not a leg gets the decoy, whatever its shape (plain GET, a WebSocket upgrade with a bad
//! key or on another path, bytes that are not HTTP at all), and the connection is closed
//! after one response, as many servers do. Decoy connections are capped in number and time.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Decoy connections served at once; beyond this, new ones are closed at once.
const MAX_DECOY_CONNECTIONS: usize = 256;
/// A decoy connection (proxied ones included) lasts at most this long.
const DECOY_LIFETIME: Duration = Duration::from_secs(120);
/// Largest file a directory decoy serves.
const MAX_FILE: u64 = 16 << 20;

/// The default decoy body: what nginx answers for a missing page.
const NGINX_404: &str = "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// The decoy a listener serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecoyKind {
    /// One fixed response.
    Fixed {
        /// HTTP status code.
        status: u16,
        /// `Content-Type` header.
        content_type: String,
        /// The body.
        body: String,
    },
    /// Files under a directory (GET/HEAD; anything else or missing: 404).
    Dir(PathBuf),
    /// Everything forwarded to an upstream HTTP server (`host:port`).
    Proxy(String),
}

impl Default for DecoyKind {
    fn default() -> Self {
        Self::Fixed {
            status: 404,
            content_type: "text/html".into(),
            body: NGINX_404.into(),
        }
    }
}

/// A decoy with its connection cap.
#[derive(Clone, Debug)]
pub struct Decoy {
    kind: Arc<DecoyKind>,
    slots: Arc<Semaphore>,
}

impl Default for Decoy {
    fn default() -> Self {
        Self::new(DecoyKind::default())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Not Allowed",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Temporarily Unavailable",
        _ => "Unknown",
    }
}

/// A complete response with `Connection: close`.
fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: nginx\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

impl Decoy {
    /// A decoy of `kind`.
    pub fn new(kind: DecoyKind) -> Self {
        Self {
            kind: Arc::new(kind),
            slots: Arc::new(Semaphore::new(MAX_DECOY_CONNECTIONS)),
        }
    }

    /// The decoy's kind.
    pub fn kind(&self) -> &DecoyKind {
        &self.kind
    }

    /// Answers a non-leg connection in the background; `head` is what was already read
    /// from it. Returns at once.
    pub fn spawn<S>(&self, stream: S, head: Vec<u8>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!("decoy connection limit hit: connection closed");
            return;
        };
        let kind = self.kind.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DECOY_LIFETIME, serve(&kind, stream, head)).await;
            drop(permit);
        });
    }
}

/// Serves one decoy response (or proxies the connection).
pub async fn serve<S>(kind: &DecoyKind, mut stream: S, head: Vec<u8>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match kind {
        DecoyKind::Fixed {
            status,
            content_type,
            body,
        } => {
            let head_only = head.starts_with(b"HEAD ");
            stream
                .write_all(&response(*status, content_type, body.as_bytes(), head_only))
                .await?;
        }
        DecoyKind::Dir(root) => {
            let reply = dir_response(root, &head).await;
            stream.write_all(&reply).await?;
        }
        DecoyKind::Proxy(upstream) => {
            let mut up = TcpStream::connect(upstream.as_str()).await?;
            up.set_nodelay(true)?;
            up.write_all(&head).await?;
            tokio::io::copy_bidirectional(&mut stream, &mut up).await?;
            return Ok(());
        }
    }
    stream.shutdown().await
}

/// The response of a directory decoy to the request in `head`.
async fn dir_response(root: &Path, head: &[u8]) -> Vec<u8> {
    let not_found = || response(404, "text/html", NGINX_404.as_bytes(), false);
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
        return response(
            400,
            "text/html",
            b"<html><body>400 Bad Request</body></html>",
            false,
        );
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return not_found();
    };
    if method != "GET" && method != "HEAD" {
        return response(
            405,
            "text/html",
            b"<html><body>405 Not Allowed</body></html>",
            false,
        );
    }
    let Some(file) = safe_join(root, path) else {
        return not_found();
    };
    let file = if file.is_dir() {
        file.join("index.html")
    } else {
        file
    };
    let mut f = match tokio::fs::File::open(&file).await {
        Ok(f) => f,
        Err(_) => return not_found(),
    };
    match f.metadata().await {
        Ok(m) if m.is_file() && m.len() <= MAX_FILE => {}
        _ => return not_found(),
    }
    let mut body = Vec::new();
    if f.read_to_end(&mut body).await.is_err() {
        return not_found();
    }
    response(200, content_type(&file), &body, method == "HEAD")
}

/// `root` joined with a request path, or `None` if the path would leave `root`.
fn safe_join(root: &Path, request_path: &str) -> Option<PathBuf> {
    let path = request_path.split(['?', '#']).next()?;
    let mut out = root.to_path_buf();
    for c in Path::new(path.trim_start_matches('/')).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "js" => "application/javascript",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_never_leave_the_root() {
        let root = Path::new("/srv/www");
        assert_eq!(safe_join(root, "/a/b.html"), Some(root.join("a/b.html")));
        assert_eq!(safe_join(root, "/a/./b?x=1"), Some(root.join("a/b")));
        assert_eq!(safe_join(root, "/../etc/passwd"), None);
        assert_eq!(safe_join(root, "/a/../../x"), None);
    }

    #[tokio::test]
    async fn directory_decoy_serves_files_and_404s() {
        let dir = std::env::temp_dir().join(format!("hp-decoy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.html"), "hello").unwrap();
        let ok = dir_response(&dir, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with(b"HTTP/1.1 200 OK\r\n") && ok.ends_with(b"hello"));
        let missing = dir_response(&dir, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(missing.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        let escape = dir_response(&dir, b"GET /../../etc/passwd HTTP/1.1\r\n\r\n").await;
        assert!(escape.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        let garbage = dir_response(&dir, b"\x16\x03\x01garbage\r\n\r\n").await;
        assert!(garbage.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
