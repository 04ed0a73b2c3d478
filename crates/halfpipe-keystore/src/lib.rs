//! # halfpipe-keystore: keys sealed at rest, zeroized in memory, never exported
//!
//! One file per server (and one per client) holds every long-term secret of that
//! process: its X25519 static key(s), the user keys it issued, the Ed25519 seed that
//! signs its audit log (or a [`KeyReference`] to where that key lives, with its public
//! key), the pepper of its capability tokens, and on a client its own key and the exit's
//! pre-shared key. Keys have versioned ids
//! (`server-static-v3`), are rotated with an overlap window, and every change is a
//! [`KeyEvent`] for the audit log.
//!
//! ```no_run
//! use halfpipe_keystore::{harden_process, KdfParams, KeyKind, KeyStore, Sealer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! harden_process()?; // no core dumps, no same-user ptrace
//! let sealer = Sealer::from_spec("credential:halfpipe-store")?;
//! let now_ms = 1_700_000_000_000;
//! let mut store = match KeyStore::open("/var/lib/halfpipe/keys.hpks", &sealer) {
//!     Ok(s) => s,
//!     Err(e) => {
//!         // audit: "unseal failure", e.code(); then refuse to start
//!         return Err(e.into());
//!     }
//! };
//! if store.active(KeyKind::ServerStatic).is_none() {
//!     store.generate(KeyKind::ServerStatic, None, now_ms)?;
//! }
//! let id = store.active(KeyKind::ServerStatic).map(|k| k.id).unwrap();
//! let private = store.x25519_private_zeroizing(&id)?; // straight into snow's builder
//! # drop(private);
//! for event in store.take_events() {
//!     // audit log: event (Serialize) or event.to_string()
//! #   let _ = event;
//! }
//! # Ok(()) }
//! ```
//!
//! ## The file
//!
//! ```text
//! offset len  field
//!  0      6   magic "HPKS1\n"
//!  6      1   format version (1)
//!  7      1   sealer kind: 1 passphrase (Argon2id), 2 raw key
//!  8      1   AEAD id: 1 AES-256-GCM
//!  9      1   KDF version: 0x13 (Argon2 v1.3) for a passphrase, 0 for a raw key
//! 10      4   Argon2id m_cost in KiB   (u32, big endian; 0 for a raw key)
//! 14      4   Argon2id t_cost          (0 for a raw key)
//! 18      4   Argon2id p_cost          (0 for a raw key)
//! 22     16   Argon2id salt            (zero for a raw key; fixed for the store's life)
//! 38     32   HKDF salt                (fresh at every save)
//! 70     12   AES-GCM nonce            (fresh at every save)
//! 82      4   body length = payload length + 16
//! 86      …   AES-256-GCM(payload) ‖ 16-byte tag, associated data = bytes 0..86
//! ```
//!
//! - **Master key**: Argon2id(passphrase, salt, m, t, p) → 32 bytes, or the raw 32-byte
//!   key. **File key**: HKDF-SHA256(salt = the save's HKDF salt, ikm = master key,
//!   info = `"halfpipe keystore v1 aes-256-gcm"`). Every save draws a new HKDF salt, so
//!   every save encrypts under a new key and the random nonce can never repeat under one
//!   key, however many times a raw-key store is saved.
//! - The **whole header, magic included, is the associated data**: a change to any byte
//!   of the file — magic, version, sealer kind, KDF parameters, either salt, nonce,
//!   length, body or tag — is detected. Bytes that can be checked without the key are
//!   checked first, for a precise error: magic ([`KeyStoreError::NotAKeyStore`]),
//!   version ([`KeyStoreError::UnsupportedVersion`]), length
//!   ([`KeyStoreError::Truncated`]; trailing bytes are [`KeyStoreError::Malformed`]),
//!   field values ([`KeyStoreError::Malformed`]), Argon2id parameters
//!   ([`KeyStoreError::ParamsOutOfRange`]: m ≤ 1 GiB, t ≤ 10, p ≤ 16, refused before
//!   Argon2id runs, so a hostile header cannot make the process allocate 4 GiB).
//!   Everything else is [`KeyStoreError::WrongKeyOrTampered`]: with an AEAD, a wrong
//!   key and a modified file cannot be told apart.
//! - The **payload** is JSON: the creation time, the last version handed out per kind,
//!   and the entries (id, kind, version, created, state, label, public key, secret as
//!   an array of 32 numbers, or `null` once revoked). It is serialised into and parsed
//!   from zeroizing buffers; after decryption it is checked (ids match kinds and
//!   versions, public keys match secrets, revoked keys hold no secret, at most one
//!   active key per kind or user) or refused.
//! - **Writes are atomic**: a temporary file (mode 0600, `create_new`) in the same
//!   directory, written, fsynced, renamed over the store, then the directory fsynced.
//!   [`KeyStore::create`] hard-links instead of renaming, so it never replaces a file.
//!   A store readable by group or others is refused at open
//!   ([`KeyStoreError::Permissions`]).
//!
//! ## Sealers: where the sealing key comes from
//!
//! [`Sealer::from_spec`] parses the `KIND:VALUE` form of a config file.
//!
//! - **Passphrase** (`passphrase-env:VAR` or `passphrase-file:PATH`): stretched with
//!   Argon2id, by default m = 64 MiB, t = 3, p = 1 ([`KdfParams`]), stored in the header.
//!   For an operator who types a passphrase at start; the variable or file should be
//!   set only for that start (a passphrase file must be mode 0600; one trailing newline
//!   is dropped).
//! - **Key file** (`keyfile:PATH`): 32 random bytes, as 64 hex characters, base64, or
//!   raw. Make one with [`create_key_file`] or
//!   `(umask 077; head -c 32 /dev/urandom > /etc/halfpipe/store.key)`. The
//!   file must be mode 0600 or stricter: a key file readable by group or others is
//!   refused with [`KeyStoreError::Permissions`] (`chmod 600 PATH`). Keep it apart from
//!   the store's backups: whoever has both has the keys.
//! - **Environment** (`env:VAR`): the same key, 64 hex characters or base64, in `$VAR`.
//!   For containers whose secret store injects variables. The variable stays in the
//!   process environment (readable through `/proc/PID/environ` by the same user unless
//!   [`harden_process`] ran), so prefer a credential where there is systemd.
//! - **systemd credential** (`credential:NAME`): the key is read from
//!   `$CREDENTIALS_DIRECTORY/NAME`. In the unit:
//!   `LoadCredential=halfpipe-store:/etc/halfpipe/store.key`, or better, encrypted with
//!   the host's TPM2 or credential secret:
//!   `systemd-creds encrypt --name=halfpipe-store store.key store.cred` and
//!   `LoadCredentialEncrypted=halfpipe-store:/etc/halfpipe/store.cred`. systemd places
//!   the (decrypted) key in a per-service directory in memory (ramfs where available,
//!   which never swaps), readable only by the service, and removes it when it stops.
//!
//! A store sealed with a passphrase is opened only with a passphrase and a raw-key store
//! only with a raw key ([`KeyStoreError::SealerMismatch`]); the three raw-key sealers are
//! interchangeable (the same key from a file today, from a credential tomorrow).
//!
//! ## Threat model
//!
//! - **Protected against**: theft of the file or of a backup (AES-256-GCM under a key
//!   from a 32-byte random key or an Argon2id-stretched passphrase); any modification or
//!   truncation of the file (refused with a typed error, never a partial unseal); a
//!   hostile header asking for absurd Argon2id costs; secrets leaking through the API,
//!   `Debug`, error messages or logs (there is no function that returns a private key
//!   for export; `Debug` shows ids, kinds and states; errors show paths, names and ids);
//!   secrets left in freed memory by this crate (zeroizing containers throughout); core
//!   dumps and same-user `ptrace` ([`harden_process`]).
//! - **Not protected against**: an attacker who runs as root or as the service's user
//!   before [`harden_process`], or who reads the process's memory by other means, while
//!   the store is open; a weak passphrase (Argon2id only slows guessing); an attacker
//!   who has the key file (or credential, or environment) and the store; rollback to an
//!   older copy of the file (each copy is authentic on its own: a revoked key comes back
//!   — keep the audit log, which records the revocation); swap (see below); short-lived
//!   copies on the stack inside the cryptographic libraries (`x25519-dalek`, `ring`'s
//!   Ed25519, which does not wipe its expanded key) and in the Noise library once it has
//!   the key.
//!
//! ## Core dumps, `ptrace` and `mlock`
//!
//! [`harden_process`] sets `RLIMIT_CORE` to 0 (soft and hard) and, on Linux,
//! `PR_SET_DUMPABLE` to 0. Memory is **not** locked with `mlock`; its documentation says
//! why (the default lock limit is smaller than Argon2id's working memory, and the
//! allocator does not keep keys on pages of their own). Run with encrypted swap or none.
//!
//! | module | job |
//! | --- | --- |
//! | [`KeyStore`] | create, open, generate, rotate, revoke, expire, list, use in place |
//! | [`Sealer`] | passphrase, key file, environment, systemd credential |
//! | [`KdfParams`] | Argon2id costs and their accepted ranges |
//! | [`KeyId`], [`KeyKind`], [`KeyState`], [`KeyInfo`] | metadata, never secrets |
//! | [`KeyEvent`] | what the audit log records |
//! | [`KeyStoreError`] | typed errors, each naming the file or key and what to do |
//! | [`harden_process`] | `RLIMIT_CORE`, `PR_SET_DUMPABLE`, and why not `mlock` |

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod format;
mod fsutil;
mod harden;
mod key;
mod sealer;
mod store;

pub use error::{KeyStoreError, Result};
pub use format::{KdfParams, FORMAT_VERSION, HEADER_LEN, MAGIC};
pub use harden::{harden_process, HardenError};
pub use key::{KeyAction, KeyEvent, KeyId, KeyInfo, KeyKind, KeyState};
pub use sealer::{create_key_file, Sealer};
pub use store::{KeyReference, KeyStore};
