//! A client's sealed key store: its user key (and the exit's pre-shared key) from a share
//! link, sealed into one file next to a config that holds no secret.
//!
//! `halfpipe client --link LINK --save client.toml` writes both; `halfpipe client
//! --config client.toml` then unseals the store at start.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use halfpipe_core::link::ShareLink;
use halfpipe_keystore::{KeyKind, KeyStore, KeyStoreError, Sealer};
use zeroize::Zeroizing;

/// A 32-byte secret (a key or the pre-shared key), wiped when dropped.
pub type Secret32 = Zeroizing<[u8; 32]>;

/// The label of the client's own key in its store.
pub const OWN_KEY_LABEL: &str = "self";

/// Why a link could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveLinkError {
    /// The config (or the store) is already there.
    #[error("{0} already exists: refusing to overwrite it (choose another --save path, or remove it first)")]
    Exists(PathBuf),
    /// The key store failed.
    #[error("key store: {0}")]
    Store(#[from] KeyStoreError),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What [`save_link`] wrote.
#[derive(Debug)]
pub struct SavedLink {
    /// The client config (no secrets).
    pub config: PathBuf,
    /// The sealed store.
    pub store: PathBuf,
    /// The sealer spec written into the config.
    pub sealer: String,
}

/// Seals `link`'s user key (and pre-shared key) into `<config stem>.hpks` next to
/// `config`, sealed by `sealer` (default: a new random key file
/// `<config stem>-store.key`, mode 0600; a relative `keyfile:` path is relative to the
/// config's directory, as the config reads it), and writes `config` with the link's exit, legs
/// and TLS trust and a `[keystore]` section. Refuses to replace either file.
pub fn save_link(
    link: &ShareLink,
    socks: &str,
    config: &Path,
    sealer: Option<&str>,
    now_ms: u64,
) -> Result<SavedLink, SaveLinkError> {
    let dir = config.parent().unwrap_or(Path::new("."));
    let stem = config
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("client")
        .to_owned();
    let store_path = dir.join(format!("{stem}.hpks"));
    for p in [config, store_path.as_path()] {
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(SaveLinkError::Exists(p.to_owned()));
        }
    }
    // What the config says (key-file paths relative to the config, as it reads them) and
    // what this process opens now.
    let (sealer, sealer_here) = match sealer {
        Some(s) => (s.to_owned(), resolve_sealer(s, dir)),
        None => {
            let name = format!("{stem}-store.key");
            let key = dir.join(&name);
            if std::fs::symlink_metadata(&key).is_err() {
                halfpipe_keystore::create_key_file(&key)?;
            }
            (
                format!("keyfile:{name}"),
                format!("keyfile:{}", key.display()),
            )
        }
    };
    let mut store = KeyStore::create(
        &store_path,
        &Sealer::from_spec(&sealer_here)?,
        Default::default(),
        now_ms,
    )?;
    store.import(
        KeyKind::UserStatic,
        Some(OWN_KEY_LABEL),
        &link.user_secret,
        now_ms,
    )?;
    if let Some(psk) = &link.psk {
        store.import(KeyKind::PreSharedKey, None, psk, now_ms)?;
    }
    let mut text = super::client_link_text(link, socks);
    text.push_str(&format!(
        "\n# The user key{} is sealed in this store, not in this file.\n[keystore]\nfile = {:?}\nsealer = {:?}\n",
        if link.psk.is_some() { " and the pre-shared key" } else { "" },
        format!("{stem}.hpks"),
        sealer,
    ));
    let io = |source| SaveLinkError::Io {
        path: config.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(config)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(SavedLink {
        config: config.to_owned(),
        store: store_path,
        sealer,
    })
}

/// `spec` with a relative `keyfile:` path made relative to `dir` (where the config is).
pub fn resolve_sealer(spec: &str, dir: &Path) -> String {
    match spec.strip_prefix("keyfile:") {
        Some(p) => format!("keyfile:{}", dir.join(p).display()),
        None => spec.to_owned(),
    }
}

/// The client's own key and the pre-shared key (if any) from its store.
pub fn open_client_store(
    file: &Path,
    sealer: &str,
) -> Result<(Secret32, Option<Secret32>), KeyStoreError> {
    let store = KeyStore::open(file, &Sealer::from_spec(sealer)?)?;
    let own = store
        .active_labelled(KeyKind::UserStatic, OWN_KEY_LABEL)
        .ok_or(KeyStoreError::NoActiveKey {
            kind: KeyKind::UserStatic,
            label: Some(OWN_KEY_LABEL.into()),
        })?;
    let key = store.with_secret(&own.id, |s| Zeroizing::new(*s))?;
    let psk = match store.active(KeyKind::PreSharedKey) {
        Some(p) => Some(store.with_secret(&p.id, |s| Zeroizing::new(*s))?),
        None => None,
    };
    Ok((key, psk))
}
