//! Issuing share links: what the exit puts in a `halfpipe://` link for a new user (the
//! format itself is [`halfpipe_core::link`]), and drawing it as a QR code in a terminal.

use halfpipe_core::link::{LinkError, ShareLink};
use halfpipe_core::record::CipherSuite;
use zeroize::Zeroizing;

/// The public side of the exit as clients should reach it: `[links]` in the server config,
/// or the listen URLs when they name a reachable host.
#[derive(Clone, Debug, Default)]
pub struct LinkTemplate {
    /// Uplink URLs in order of preference.
    pub uplinks: Vec<String>,
    /// Downlink URLs in order of preference.
    pub downlinks: Vec<String>,
    /// Name the TLS certificate must carry, when not each URL's host.
    pub server_name: Option<String>,
    /// The certificate's public-key pin (for self-hosted certificates).
    pub pin: Option<String>,
    /// The cipher.
    pub cipher: CipherSuite,
}

impl LinkTemplate {
    /// The link of `user`, whose private key is `secret`, for an exit whose static public
    /// key is `server_public`. Checked before it is returned.
    pub fn issue(
        &self,
        server_public: [u8; 32],
        user: &str,
        secret: Zeroizing<[u8; 32]>,
        psk: Option<Zeroizing<[u8; 32]>>,
    ) -> Result<ShareLink, LinkError> {
        let link = ShareLink {
            server_public,
            uplinks: self.uplinks.clone(),
            downlinks: self.downlinks.clone(),
            user: user.to_string(),
            server_name: self.server_name.clone(),
            pin: self.pin.clone(),
            cipher: self.cipher,
            user_secret: secret,
            psk,
        };
        link.validate()?;
        Ok(link)
    }
}

/// `text` as a QR code drawn with Unicode half blocks (two modules per character cell),
/// with a quiet zone; `None` when it does not fit a QR code.
pub fn qr(text: &str) -> Option<String> {
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::L).ok()?;
    let width = code.width();
    let dark = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < width
            && (y as usize) < width
            && code[(x as usize, y as usize)] == qrcode::Color::Dark
    };
    let quiet = 2isize;
    let mut out = String::new();
    let mut y = -quiet;
    while y < width as isize + quiet {
        for x in -quiet..width as isize + quiet {
            // Light text on a dark terminal reads inverted, so draw light modules.
            out.push(match (!dark(x, y), !dark(x, y + 1)) {
                (true, true) => '█',
                (true, false) => '▀',
                (false, true) => '▄',
                (false, false) => ' ',
            });
        }
        out.push('\n');
        y += 2;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_link_parses_back_and_draws() {
        let t = LinkTemplate {
            uplinks: vec!["tls://127.0.0.1:8443".into()],
            downlinks: vec!["quic://127.0.0.1:8444".into()],
            server_name: Some("localhost".into()),
            pin: None,
            cipher: CipherSuite::Aes256Gcm,
        };
        let link = t
            .issue([7; 32], "bob", Zeroizing::new([9; 32]), None)
            .unwrap();
        let text = link.encode();
        let back = ShareLink::parse(&text).unwrap();
        assert_eq!(back.user, "bob");
        assert_eq!(*back.user_secret, [9; 32]);
        let q = qr(&text).unwrap();
        assert!(q.lines().count() > 10 && q.contains('█'));
        // No URL, no link.
        let empty = LinkTemplate::default();
        assert!(empty
            .issue([7; 32], "bob", Zeroizing::new([9; 32]), None)
            .is_err());
    }
}
