//! temp
pub mod bench;
pub mod cert;
pub mod client;
pub mod egress;
pub mod http_connect;
pub mod keyfile;
pub mod leg;
pub mod leg_url;
pub mod outbound;
pub mod server;
pub mod socks5;
pub mod tls;
pub mod transport;
pub mod tunnel;
