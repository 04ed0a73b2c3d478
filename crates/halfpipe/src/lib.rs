//! temp
pub mod cert;
pub mod keyfile;
pub mod leg;
pub mod leg_url;
pub mod tls;
pub mod transport;
pub mod tunnel;
