//! TLS 1.3 configurations for `tls://` legs (rustls with the aws-lc-rs provider).
//!
//! Clients verify the server by the bundled web roots, a CA file, or a pinned SHA-256 of the
//! certificate's public key (`sha256/<base64>`); there is no way to turn verification off.

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::keyfile::{check_private_permissions, KeyFileError};

/// A TLS setup problem, naming the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The private key file is readable by others.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// No certificate or key in the PEM file.
    #[error("{0}: no PEM certificate or private key found (make one with 'halfpipe cert gen')")]
    EmptyPem(PathBuf),
    /// rustls rejected the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A pin that is not `sha256/<base64 of 32 bytes>`.
    #[error("pin {0:?} is not of the form sha256/<base64>, as printed by 'halfpipe cert gen'")]
    BadPin(String),
    /// A certificate that cannot be parsed.
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    /// The client CA file cannot serve for client authentication.
    #[error("client_ca_file cannot verify client certificates: {0}")]
    ClientAuth(String),
}

/// How a client trusts the server's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerTrust {
    /// The Mozilla root set bundled with halfpipe.
    WebRoots,
    /// Certificates in a PEM file.
    CaFile(PathBuf),
    /// SHA-256 of the server certificate's SubjectPublicKeyInfo, `sha256/<base64>`.
    Pin(String),
    /// No certificate check (`insecure = true`): warned about at every start.
    Insecure,
}

/// aws-lc-rs' provider (rustls' default), whose TLS 1.3 suites come AES-256-GCM first:
/// the same library as `halfpipe_core::record`, which seals a channel-bound `tls://` leg's
/// records itself under the keys this handshake derives. On a channel-bound leg TLS is the
/// only encryption layer (see `crate::channel_binding`), so it is as strong as the Noise
/// layer's default AES-256-GCM it stands in for.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let f = fs::File::open(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(f))
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Io {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::EmptyPem(path.to_owned()));
    }
    Ok(certs)
}

/// The server configuration from a certificate chain and a private key (PEM, key 0600).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with(cert, key, None)
}

/// Reads a PEM private key (refused when others can read the file).
fn read_key(key: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    check_private_permissions(key)?;
    let f = fs::File::open(key).map_err(|source| TlsError::Io {
        path: key.to_owned(),
        source,
    })?;
    rustls_pemfile::private_key(&mut BufReader::new(f))
        .map_err(|source| TlsError::Io {
            path: key.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::EmptyPem(key.to_owned()))
}

/// Like [`server_config`]; with `client_ca`, mutual TLS: clients must present a
/// certificate issued by (or equal to) one in that PEM file, or the handshake fails.
pub fn server_config_with(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let key_der = read_key(key)?;
    let certs = read_certs(cert)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::ClientAuth(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key_der)?;
    // Legs never resume TLS sessions (each leg authenticates in its Noise handshake).
    cfg.send_tls13_tickets = 0;
    // A channel-bound `tls://` leg takes its traffic keys into its record layer.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// The client configuration for a trust choice.
pub fn client_config(trust: &ServerTrust) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with(trust, None)
}

/// Like [`client_config`]; with `identity` (certificate chain, key), the client presents
/// a certificate to servers that require mutual TLS.
pub fn client_config_with(
    trust: &ServerTrust,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let roots = |extra: Option<&Path>| -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        match extra {
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(path) => {
                for c in read_certs(path)? {
                    roots.add(c)?;
                }
            }
        }
        Ok(roots)
    };
    let builder = match trust {
        ServerTrust::WebRoots => builder.with_root_certificates(roots(None)?),
        ServerTrust::CaFile(path) => builder.with_root_certificates(roots(Some(path))?),
        ServerTrust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                want: Some(parse_pin(pin)?),
                algorithms: provider().signature_verification_algorithms,
            })),
        ServerTrust::Insecure => {
            tracing::warn!(
                target: "security",
                "TLS certificate checks are OFF (insecure = true): anyone on the path can impersonate the exit's TLS layer; set ca_file or pin"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    want: None,
                    algorithms: provider().signature_verification_algorithms,
                }))
        }
    };
    let mut cfg = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(read_certs(cert)?, read_key(key)?)?,
    };
    // A channel-bound `tls://` leg takes its traffic keys into its record layer.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// The public-key pin (`sha256/<base64>`) of the first certificate in a PEM file.
pub fn pin_of_cert_file(path: &Path) -> Result<String, TlsError> {
    let certs = read_certs(path)?;
    spki_pin(&certs[0])
}

/// Decodes `sha256/<base64>` into the 32-byte digest.
pub fn parse_pin(pin: &str) -> Result<[u8; 32], TlsError> {
    let b64 = pin
        .strip_prefix("sha256/")
        .ok_or_else(|| TlsError::BadPin(pin.to_owned()))?;
    let bytes = B64
        .decode(b64)
        .map_err(|_| TlsError::BadPin(pin.to_owned()))?;
    bytes
        .try_into()
        .map_err(|_| TlsError::BadPin(pin.to_owned()))
}

/// The `sha256/<base64>` pin of a certificate's public key.
pub fn spki_pin(cert_der: &[u8]) -> Result<String, TlsError> {
    let der = CertificateDer::from(cert_der.to_vec());
    let ee = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| TlsError::BadCertificate(format!("{e:?}")))?;
    let spki = ee.subject_public_key_info();
    Ok(format!(
        "sha256/{}",
        B64.encode(Sha256::digest(spki.as_ref()))
    ))
}

/// Accepts exactly the certificate whose public key matches the pin (or, without a pin,
/// any certificate: the explicit insecure mode); the TLS 1.3 handshake signature is still
/// verified with the presented key.
#[derive(Debug)]
struct PinVerifier {
    want: Option<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(want) = self.want else {
            return Ok(ServerCertVerified::assertion());
        };
        let got = spki_pin(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        let want = format!("sha256/{}", B64.encode(want));
        if got == want {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate pin mismatch: expected {want}, server presented {got}"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS server on 127.0.0.1 with a fresh dev certificate; returns its address, the
    /// certificate path and the certificate's pin.
    async fn dev_server() -> (std::net::SocketAddr, PathBuf, String) {
        let (c, k, pin) = crate::cert::TestCerts::new("tls").write("cert");
        let config = server_config(&c, &k).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let config = config.clone();
                tokio::spawn(async move {
                    if let Ok(mut t) = crate::tls_stream::accept(config, s).await {
                        let _ = t.write_all(b"ok").await;
                        let _ = t.shutdown().await;
                    }
                });
            }
        });
        (addr, c, pin)
    }

    async fn fetch(addr: std::net::SocketAddr, trust: &ServerTrust) -> Result<Vec<u8>, String> {
        let cfg = client_config(trust).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut s = crate::tls_stream::connect(cfg, name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        // Both ends prefer AES-256-GCM: on a channel-bound leg TLS is the only layer.
        assert_eq!(
            s.connection()
                .and_then(|c| c.negotiated_cipher_suite())
                .map(|c| c.suite()),
            Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
        );
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[tokio::test]
    async fn ca_file_and_right_pin_connect_wrong_pin_and_web_roots_refuse() {
        let (addr, cert, pin) = dev_server().await;
        assert_eq!(
            fetch(addr, &ServerTrust::CaFile(cert)).await.unwrap(),
            b"ok"
        );
        assert_eq!(
            fetch(addr, &ServerTrust::Pin(pin.clone())).await.unwrap(),
            b"ok"
        );
        let wrong = format!("sha256/{}", B64.encode([7u8; 32]));
        let e = fetch(addr, &ServerTrust::Pin(wrong.clone()))
            .await
            .unwrap_err();
        assert!(
            e.contains("pin mismatch") && e.contains(&wrong) && e.contains(&pin),
            "{e}"
        );
        // A self-signed certificate is not trusted by the bundled web roots.
        assert!(fetch(addr, &ServerTrust::WebRoots).await.is_err());
        // Malformed pins are refused before any connection.
        assert!(matches!(parse_pin("md5/abc"), Err(TlsError::BadPin(_))));
        assert!(matches!(parse_pin("sha256/AAAA"), Err(TlsError::BadPin(_))));
    }

    #[tokio::test]
    async fn mutual_tls_refuses_a_client_without_a_certificate() {
        let certs = crate::cert::TestCerts::new("mtls");
        let write = |name: &str| {
            let (c, k, _) = certs.write(name);
            (c, k)
        };
        let (server_cert, server_key) = write("server");
        let (client_cert, client_key) = write("client");
        let (stranger_cert, stranger_key) = write("stranger");
        let cfg = server_config_with(&server_cert, &server_key, Some(&client_cert)).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let cfg = cfg.clone();
                tokio::spawn(async move {
                    if let Ok(mut t) = crate::tls_stream::accept(cfg, s).await {
                        let _ = t.write_all(b"ok").await;
                        let _ = t.shutdown().await;
                    }
                });
            }
        });
        let trust = ServerTrust::CaFile(server_cert.clone());
        let attempt = |identity: Option<(PathBuf, PathBuf)>| {
            let trust = trust.clone();
            async move {
                let ids = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
                let cfg = client_config_with(&trust, ids).unwrap();
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = ServerName::try_from("localhost").unwrap();
                let mut s = crate::tls_stream::connect(cfg, name, tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(out)
            }
        };
        assert_eq!(
            attempt(Some((client_cert, client_key))).await.unwrap(),
            b"ok"
        );
        let e = attempt(None).await.unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        assert!(attempt(Some((stranger_cert, stranger_key))).await.is_err());
        let _ = std::fs::remove_dir_all(&certs.dir);
    }

    #[tokio::test]
    async fn insecure_mode_accepts_an_unknown_certificate() {
        let (addr, _cert, _pin) = dev_server().await;
        assert_eq!(fetch(addr, &ServerTrust::Insecure).await.unwrap(), b"ok");
    }

    #[test]
    fn readable_key_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hp-tls-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = crate::cert::generate_self_signed(&["localhost".into()]).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("cert.key"));
        crate::cert::write_dev_cert(&cert, &c, &k).unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = server_config(&c, &k).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
