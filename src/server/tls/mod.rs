//! TLS for NBD (NBD_OPT_STARTTLS) with rustls: `config` loads the
//! certificates and policy once at start-up; `stream` carries one
//! connection's bytes through TLS.

mod config;
mod stream;

pub use config::{TlsError, TlsOptions, TlsServer};
pub use stream::{ConnTls, Decrypted, StreamError, TlsStream};
