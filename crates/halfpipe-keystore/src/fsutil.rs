//! File helpers: private-mode checks, bounded reads into zeroizing buffers, atomic writes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::error::{KeyStoreError, Result};

/// Refuses a file that group or others can access in any way (`mode & 0o077 != 0`).
#[cfg(unix)]
pub(crate) fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyStoreError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Permission bits are a Unix notion; elsewhere the check is a no-op.
#[cfg(not(unix))]
pub(crate) fn check_private(_path: &Path, _meta: &std::fs::Metadata) -> Result<()> {
    Ok(())
}

/// What [`read_private`] found.
pub(crate) enum ReadOutcome {
    /// The whole file, in a zeroizing buffer.
    Data(Zeroizing<Vec<u8>>),
    /// The file is longer than the limit (its length).
    TooLarge(u64),
}

/// Opens `path` (following symlinks), checks that it is a regular file private to its
/// owner, and reads at most `max` bytes into a zeroizing buffer allocated once, so no
/// reallocation leaves a copy of the contents behind in freed memory.
pub(crate) fn read_private(path: &Path, max: usize) -> Result<ReadOutcome> {
    let mut file = File::open(path).map_err(|e| KeyStoreError::io(path, e))?;
    let meta = file.metadata().map_err(|e| KeyStoreError::io(path, e))?;
    if !meta.is_file() {
        return Err(KeyStoreError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    check_private(path, &meta)?;
    let len = meta.len();
    if len > max as u64 {
        return Ok(ReadOutcome::TooLarge(len));
    }
    // One byte more than the file's length: a file that grew since `metadata` is seen.
    let cap = (len as usize).saturating_add(1).min(max.saturating_add(1));
    let mut buf = Zeroizing::new(vec![0u8; cap]);
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(KeyStoreError::io(path, e)),
        }
    }
    if n > max {
        return Ok(ReadOutcome::TooLarge(n as u64));
    }
    buf.truncate(n);
    Ok(ReadOutcome::Data(buf))
}

fn temp_path(path: &Path) -> Result<PathBuf> {
    let mut tag = [0u8; 8];
    SystemRandom::new()
        .fill(&mut tag)
        .map_err(|_| KeyStoreError::Random)?;
    let name = path
        .file_name()
        .ok_or_else(|| {
            KeyStoreError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
            )
        })?
        .to_string_lossy()
        .into_owned();
    Ok(path.with_file_name(format!(".{name}.tmp-{}", hex::encode(tag))))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn write_temp(tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| KeyStoreError::io(dir, e))?;
        d.sync_all().map_err(|e| KeyStoreError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file (mode 0600, `create_new`) in the
/// same directory, written and fsynced, then renamed over `path`, then the directory
/// fsynced. A crash leaves either the old file or the new one, never a mix.
///
/// With `no_replace`, an existing `path` is never replaced: the temporary file is
/// hard-linked to `path` (which fails atomically if it exists) instead of renamed.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8], no_replace: bool) -> Result<()> {
    let tmp = temp_path(path)?;
    if let Err(e) = write_temp(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(KeyStoreError::io(&tmp, e));
    }
    let placed = if no_replace {
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {
                let _ = std::fs::remove_file(&tmp);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(&tmp);
                return Err(KeyStoreError::Exists {
                    path: path.to_path_buf(),
                });
            }
            // A file system without hard links: check, then rename (a narrow race).
            Err(_) if std::fs::symlink_metadata(path).is_err() => std::fs::rename(&tmp, path),
            Err(_) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(KeyStoreError::Exists {
                    path: path.to_path_buf(),
                });
            }
        }
    } else {
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(KeyStoreError::io(path, e));
    }
    sync_dir(parent_dir(path))
}
