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
