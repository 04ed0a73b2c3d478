//! [`harden_process`]: no core dumps, no same-user ptrace, and why there is no `mlock`.

#![allow(unsafe_code)]

/// What [`harden_process`] could not do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardenError {
    /// `setrlimit(RLIMIT_CORE, 0)` failed.
    #[error("cannot disable core dumps (setrlimit RLIMIT_CORE): {0}")]
    CoreLimit(#[source] std::io::Error),
    /// `prctl(PR_SET_DUMPABLE, 0)` failed.
    #[error("cannot mark the process non-dumpable (prctl PR_SET_DUMPABLE): {0}")]
    Dumpable(#[source] std::io::Error),
    /// This platform has neither call.
    #[error("process hardening is not supported on this platform")]
    Unsupported,
}

/// Makes the process's memory — and so the unsealed keys in it — harder to read out.
///
/// Call it first thing in `main` of a process that opens a key store, before any key
/// is unsealed (the server and the client both do).
///
/// - **`setrlimit(RLIMIT_CORE, {0, 0})`** (all Unix): a crash writes no core file, so a
///   key cannot end up on disk in a core dump. The hard limit is lowered too, so the
///   process cannot raise it again later.
/// - **`prctl(PR_SET_DUMPABLE, 0)`** (Linux): also covers core handlers that pipe the
///   dump to a program (`/proc/sys/kernel/core_pattern = |…`, which ignore
///   `RLIMIT_CORE`), and forbids other processes of the same user from attaching with
///   `ptrace` or reading `/proc/PID/mem`; only a process with `CAP_SYS_PTRACE` (root)
///   still can. Side effect: `/proc/PID/*` files become owned by root, so same-user
///   tools such as `gdb -p`, `strace -p` or `ls /proc/PID/fd` stop working on the
///   process — which is the point.
///
/// **Why no `mlock`.** Locking pages would keep keys out of swap, but it is not used:
/// the default `RLIMIT_MEMLOCK` (64 KiB to 8 MiB) is far below the Argon2id working
/// memory (64 MiB by default) and a tunnel's buffers, so `mlockall` would fail or need
/// extra privileges on most systems; locking only the pages that hold keys is not
/// possible from safe Rust, because keys live in ordinary heap allocations that the
/// allocator places and moves freely (a `Vec`'s pages hold other data too, and copies
/// exist briefly on the stack). What is done instead: every key, passphrase and
/// decrypted payload is held in a zeroizing buffer and wiped when dropped, so a key is
/// in memory only while the store is open. Against swap, run with encrypted swap or
/// none.
///
/// Returns the first failure; on a platform without these calls,
/// [`HardenError::Unsupported`].
pub fn harden_process() -> Result<(), HardenError> {
    imp::harden()
}

#[cfg(unix)]
mod imp {
    use super::HardenError;

    pub(super) fn harden() -> Result<(), HardenError> {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `setrlimit` reads one `struct rlimit` through the pointer, which points
        // to a live, initialised local for the whole call; it has no other effect on
        // memory. RLIMIT_CORE is a valid resource on every Unix.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
        if rc != 0 {
            return Err(HardenError::CoreLimit(std::io::Error::last_os_error()));
        }
        not_dumpable()
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn not_dumpable() -> Result<(), HardenError> {
        // SAFETY: PR_SET_DUMPABLE takes one integer argument (0 or 1) and no pointers;
        // the unused variadic arguments are passed as zero as prctl(2) recommends. It
        // changes only the dumpable attribute of this process.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_DUMPABLE,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc != 0 {
            return Err(HardenError::Dumpable(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn not_dumpable() -> Result<(), HardenError> {
        Ok(())
    }
}

#[cfg(not(unix))]
mod imp {
    use super::HardenError;

    pub(super) fn harden() -> Result<(), HardenError> {
        Err(HardenError::Unsupported)
    }
}
