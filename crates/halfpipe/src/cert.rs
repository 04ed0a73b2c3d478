//! Development certificates: a self-signed certificate and key, and its public-key pin.

use std::path::Path;

use crate::keyfile::{write_secret_file, KeyFileError};
use crate::tls::{spki_pin, TlsError};

/// A freshly generated certificate.
pub struct DevCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (secret).
    pub key_pem: zeroize::Zeroizing<String>,
    /// `sha256/<base64>` pin of its public key.
    pub pin: String,
}

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters.
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Pin computation failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Writing a file failed.
    #[error(transparent)]
    Write(#[from] KeyFileError),
}

/// A self-signed certificate (ECDSA P-256) for `names` (DNS names or IP literals).
pub fn generate_self_signed(names: &[String]) -> Result<DevCert, CertError> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())?;
    let pin = spki_pin(ck.cert.der())?;
    Ok(DevCert {
        cert_pem: ck.cert.pem(),
        key_pem: zeroize::Zeroizing::new(ck.key_pair.serialize_pem()),
        pin,
    })
}

/// Writes the certificate (0644) and key (0600).
pub fn write_dev_cert(cert: &DevCert, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
    std::fs::write(cert_path, &cert.cert_pem).map_err(|source| KeyFileError::Io {
        path: cert_path.to_owned(),
        source,
    })?;
    write_secret_file(key_path, cert.key_pem.as_bytes())?;
    Ok(())
}

/// Test support: fresh `localhost` development certificates in a new temporary directory.
#[cfg(test)]
pub(crate) struct TestCerts {
    /// The directory holding the files.
    pub dir: std::path::PathBuf,
}

#[cfg(test)]
impl TestCerts {
    /// A new, empty directory named after `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "hp-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    /// Writes a new certificate as `name.pem` and `name.key`; returns both paths and the pin.
    pub fn write(&self, name: &str) -> (std::path::PathBuf, std::path::PathBuf, String) {
        let cert = generate_self_signed(&["localhost".into()]).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        write_dev_cert(&cert, &c, &k).unwrap();
        (c, k, cert.pin)
    }
}
