//! Test helpers: a private temporary directory and databases on a manual clock.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use halfpipe_state::{ManualClock, StateDb, StateOptions};

/// A fresh directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "halfpipe-state-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn db(&self) -> PathBuf {
        self.0.join("state.redb")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens `path` on a new manual clock (a new process: monotonic time starts at 0).
pub fn open(path: &Path) -> (StateDb, Arc<ManualClock>) {
    open_capped(path, 1_000)
}

/// As [`open`], with a cap on limiter keys.
pub fn open_capped(path: &Path, max_limiter_keys: usize) -> (StateDb, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let db = StateDb::open_with(
        path,
        StateOptions {
            max_limiter_keys,
            monotonic: clock.clone(),
            ..StateOptions::default()
        },
    )
    .unwrap();
    (db, clock)
}
