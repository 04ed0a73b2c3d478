//! # halfpipe-state: the exit server's persistent state
//!
//! One redb database ([`StateDb`]) holds everything the exit must remember across
//! restarts: the service clock, rate-limit budgets, bans, capability tokens (as keyed
//! hashes), runtime-managed users, per-user policies and transfer quotas. The token
//! pepper lives in its own file.
//!
//! | module | job |
//! | --- | --- |
//! | [`db`] | [`StateDb`]: open (create 0600, check, load), flush, tables |
//! | [`clock`] | [`ServiceClock`]: served milliseconds, persisted; the wall clock is never an input |
//! | [`ratelimit`] | [`Limiter`]: GCRA per string key, in memory, persisted by flush |
//! | [`ban`] | [`Bans`]: committed at once, read from memory, only ever extended |
//! | [`token`] | [`Tokens`], [`Pepper`]: `hpt_<id>_<secret>`, stored as HMAC-SHA256 |
//! | [`users`] | [`Users`]: runtime users by name and public key; every user's policy |
//! | [`policy`] | [`UserPolicy`]: expiry, sessions, speed limits, [`Quota`], destinations ([`Network`]) |
//! | [`quota`] | [`Quotas`]: bytes per user per UTC day and month (wall clock), persisted by flush |
//! | [`error`] | [`StateError`]: every error names its file and says what to do |
//!
//! Fail closed throughout: a file that does not open, fails its checksums or holds a
//! value that does not decode refuses the open ([`StateError::CorruptFile`],
//! [`StateError::Corrupt`]) and the server refuses to start; a change that restricts
//! (ban, disable, remove) applies in memory even when its commit fails.
//!
//! Handles are `Send + Sync` and cheap: the data path ([`Limiter::check`],
//! [`Bans::banned`], [`Users::get_by_key`], [`Users::policy`], [`Quotas::charge`]) takes
//! one lock and never touches the disk.
//!
//! ```no_run
//! use halfpipe_state::{RateSpec, StateDb};
//! # fn main() -> Result<(), halfpipe_state::StateError> {
//! let db = StateDb::open("/var/lib/halfpipe/state.redb")?;
//! let now = db.now_ms();
//! if db.bans().banned("src:192.0.2.7", now).is_none()
//!     && db.limiter().check("src:192.0.2.7", RateSpec::new(5, 20), 1, now).is_ok()
//! {
//!     // go on with the handshake
//! }
//! db.flush()?; // every second, and at shutdown
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ban;
pub mod clock;
pub mod db;
pub mod error;
pub mod policy;
pub mod quota;
pub mod ratelimit;
pub mod token;
pub mod users;

pub use ban::{Ban, Bans};
pub use clock::{ManualClock, Monotonic, ServiceClock, SystemMonotonic};
pub use db::{StateDb, StateOptions};
pub use error::StateError;
pub use policy::{Network, Quota, QuotaPeriod, UserPolicy};
pub use quota::{QuotaExceeded, Quotas, Usage};
pub use ratelimit::{Limiter, RateSpec, RetryAfter};
pub use token::{Pepper, SecretToken, TokenError, TokenInfo, Tokens};
pub use users::{UserRecord, Users};

#[cfg(test)]
mod send_sync {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_are_send_and_sync() {
        assert_send_sync::<crate::StateDb>();
        assert_send_sync::<crate::Tokens>();
        assert_send_sync::<crate::StateError>();
        assert_send_sync::<crate::TokenError>();
        assert_send_sync::<crate::SecretToken>();
        assert_send_sync::<crate::Quotas>();
        assert_send_sync::<crate::QuotaExceeded>();
    }
}
