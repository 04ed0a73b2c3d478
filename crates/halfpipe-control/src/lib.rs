//! # halfpipe-control: the sans-io control plane
//!
//! Everything here is pure logic over an injected clock (milliseconds passed in by the
//! caller); the server drives it. There is no async runtime and no socket here; the only file
//! I/O is the persistence of the mode ([`mode::ModeFile`]).
//!
//! | module | job |
//! | --- | --- |
//! | [`capability`] | what an admin token may do |
//! | [`mode`] | the modes OPEN, RESTRICTED, LOCKDOWN, the rules for moving between them, and the fail-closed mode file |
//! | [`tripwire`] | sliding-window tripwires that fire once per episode, and the clock-jump watch |
//! | [`endpoint`] | the admin API's endpoint table: routes, and the one capability each endpoint needs |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod capability;
pub mod endpoint;
pub mod mode;
pub mod tripwire;
