//! # halfpipe: a hardened split-path tunnel
//!
//! The protocol core (frames, handshake, records, session) is the sans-io crate
//! `halfpipe-core`; this crate drives it with tokio and adds everything around it.
//!
//! | module | job |
//! | --- | --- |
//! | [`transport`], [`tls_stream`] | dial/accept `tcp://` and `tls://` leg pipes |
//! | [`leg`] | the Noise handshake over a pipe |
//! | [`tunnel`] | the async session driver shared by client and exit |
//! | `timer` | long-lived deadlines on a thread of their own, off the runtime's timer |
//! | [`client`] | session upkeep and local inbounds (SOCKS5, HTTP CONNECT, forwards) |
//! | [`server`] | leg admission, session table, outbound connects |
//! | [`control`] | the control plane driven: modes, tripwires, rate limits, tokens, audit |
//! | [`admin`], [`ctl`] | the admin API over a Unix socket, metrics, and its client |
//! | [`egress`], [`outbound`] | the exit's egress policy and connector |
//! | [`socks5`], [`http_connect`] | inbound protocol parsers |
//! | [`config`], [`keyfile`], [`tls`], [`cert`], [`leg_url`] | configuration and key material |
//! | [`links`] | share links for new users (and their QR codes) |
//! | [`quickstart`] | the zero-config local demo |
//! | [`bench`] | the loopback benchmark |

pub mod admin;
mod audit_view;
pub mod bench;
pub mod cert;
pub mod channel_binding;
pub mod client;
pub mod config;
pub mod control;
pub mod ctl;
pub mod egress;
pub mod http_connect;
pub mod keyfile;
pub mod leg;
pub mod leg_url;
pub mod links;
mod locks;
pub mod outbound;
pub mod quickstart;

pub mod server;
pub mod socks5;
mod timer;
pub mod tls;
pub mod tls_stream;
pub mod transport;
pub mod tunnel;

pub use audit_view::{audit_report_json, render_audit_json, render_audit_report};
