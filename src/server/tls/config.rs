//! The server's TLS settings: certificates, keys and client CAs loaded
//! once at start-up, and the policy each transport gets.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;
use tracing::info;

use crate::nbd::TlsMode;
use crate::server::listener::Transport;

/// TLS settings as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Policy on TCP listeners; Unix sockets offer TLS but never require it.
    pub mode: TlsMode,
    /// The server's certificate chain (PEM), its own certificate first.
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) for client certificates; when given, every
    /// TLS client must present one they signed.
    pub ca: Option<PathBuf>,
}

/// Why the TLS settings cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// TLS is on but the certificate or key is missing.
    #[error(
        "--tls={0} needs the server's certificate and key: give --tls-cert FILE and --tls-key FILE (PEM)"
    )]
    NoCertificate(&'static str),
    /// Certificate options were given with TLS off.
    #[error("--tls-cert, --tls-key and --tls-ca take effect only with --tls=on or --tls=require")]
    NotEnabled,
    /// A file could not be read.
    #[error("cannot read {what} {}", path.display())]
    Read {
        /// Which file (certificate, key, CA file).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file is not PEM of the expected kind.
    #[error("{what} {} is not usable: {detail}", path.display())]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The key does not match the certificate.
    #[error(
        "the private key {} does not belong to the certificate {}: give the key the certificate was issued for",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate's path.
        cert: PathBuf,
        /// The key's path.
        key: PathBuf,
    },
    /// The key is PEM, but not a kind or size TLS can sign with here.
    #[error(
        "private key {} cannot sign TLS handshakes: use RSA of 2048 to 8192 bits, ECDSA on P-256, P-384 or P-521, or Ed25519",
        key.display()
    )]
    UnsupportedKey {
        /// The key's path.
        key: PathBuf,
        /// What the crypto provider said.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the certificate and key.
    #[error("certificate {} with key {} cannot be used", cert.display(), key.display())]
    BadCertificate {
        /// The certificate's path.
        cert: PathBuf,
        /// The key's path.
        key: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The CA file cannot build a client verifier.
    #[error("CA file {} cannot verify clients: {detail}", path.display())]
    BadCa {
        /// The CA file's path.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// rustls could not be configured.
    #[error("TLS setup failed")]
    Setup(#[source] rustls::Error),
}

fn mode_name(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::Off => "off",
        TlsMode::On => "on",
        TlsMode::Require => "require",
    }
}

/// Certificates and policy shared by every connection of a server.
#[derive(Debug)]
pub struct TlsServer {
    pub(super) config: Arc<ServerConfig>,
    mode: TlsMode,
    pub(super) client_auth: bool,
}

impl TlsServer {
    /// Loads and checks the files; `None` when TLS is off.
    pub fn load(opts: &TlsOptions) -> Result<Option<Arc<TlsServer>>, TlsError> {
        let any_file = opts.cert.is_some() || opts.key.is_some() || opts.ca.is_some();
        let (cert, key) = match (opts.mode, &opts.cert, &opts.key) {
            (TlsMode::Off, ..) if any_file => return Err(TlsError::NotEnabled),
            (TlsMode::Off, ..) => return Ok(None),
            (_, Some(cert), Some(key)) => (cert, key),
            (mode, ..) => return Err(TlsError::NoCertificate(mode_name(mode))),
        };
        // Chosen explicitly, so no process-wide default is needed. aws-lc-rs
        // (already built for object_store's S3 client) loads every RSA key
        // of 2048 to 8192 bits; ring refused those whose primes are not a
        // multiple of 512 bits, such as 2432-bit keys that OpenSSL accepts.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain = read_certs("certificate", cert)?;
        let key_der = read_key(key)?;
        // Loaded once here only to tell an unusable key from a mismatch.
        if let Err(source) = provider.key_provider.load_private_key(key_der.clone_key()) {
            return Err(TlsError::UnsupportedKey {
                key: key.clone(),
                source,
            });
        }
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?;
        let builder = match &opts.ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let bad = |detail: String| TlsError::BadCa {
                    path: ca.clone(),
                    detail,
                };
                let mut roots = RootCertStore::empty();
                for c in read_certs("CA file", ca)? {
                    roots.add(c).map_err(|e| bad(e.to_string()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| bad(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key_der)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    TlsError::KeyMismatch {
                        cert: cert.clone(),
                        key: key.clone(),
                    }
                }
                source => TlsError::BadCertificate {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                },
            })?;
        info!(
            tcp = mode_name(opts.mode),
            client_certificates = opts.ca.is_some(),
            "TLS enabled (Unix sockets offer it without requiring it)"
        );
        Ok(Some(Arc::new(TlsServer {
            config: Arc::new(config),
            mode: opts.mode,
            client_auth: opts.ca.is_some(),
        })))
    }

    /// The policy for connections arriving on `transport`: Unix sockets are
    /// guarded by their file mode, so local clients may stay in plaintext.
    pub fn mode(&self, transport: Transport) -> TlsMode {
        match transport {
            Transport::Tcp => self.mode,
            Transport::Unix => TlsMode::On,
        }
    }

    /// The URI schemes clients use on TCP listeners.
    pub fn tcp_schemes(server: Option<&TlsServer>) -> &'static [&'static str] {
        match server.map(|s| s.mode) {
            None | Some(TlsMode::Off) => &["nbd"],
            Some(TlsMode::On) => &["nbd", "nbds"],
            Some(TlsMode::Require) => &["nbds"],
        }
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn pem_error(what: &'static str, path: &Path, e: pem::Error, expected: &str) -> TlsError {
    let detail = match e {
        pem::Error::NoItemsFound => format!("no {expected} block in it (is it PEM?)"),
        e => format!("{e:?}"),
    };
    TlsError::Pem {
        what,
        path: path.to_owned(),
        detail,
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e, "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err(pem_error(
            what,
            path,
            pem::Error::NoItemsFound,
            "CERTIFICATE",
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| pem_error("key", path, e, "PRIVATE KEY"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_without_files_and_errors_that_say_what_to_do() {
        assert!(TlsServer::load(&TlsOptions::default()).unwrap().is_none());
        let e = TlsServer::load(&TlsOptions {
            cert: Some("c.pem".into()),
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--tls=on or --tls=require"), "{e}");
        let e = TlsServer::load(&TlsOptions {
            mode: TlsMode::Require,
            cert: Some("c.pem".into()),
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--tls=require needs"), "{e}");
        assert!(e.to_string().contains("--tls-key FILE"), "{e}");
        let e = TlsServer::load(&TlsOptions {
            mode: TlsMode::On,
            cert: Some("/nonexistent/c.pem".into()),
            key: Some("/nonexistent/k.pem".into()),
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read certificate /nonexistent/c.pem"),
            "{e}"
        );
    }

    #[test]
    fn not_pem_is_named() {
        let dir = crate::test_support::TempDir::new("tls-unit");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = TlsServer::load(&TlsOptions {
            mode: TlsMode::On,
            cert: Some(junk.clone()),
            key: Some(junk.clone()),
            ..TlsOptions::default()
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("junk.pem") && msg.contains("no CERTIFICATE"),
            "{msg}"
        );
    }

    #[test]
    fn schemes_follow_the_policy() {
        assert_eq!(TlsServer::tcp_schemes(None), ["nbd"]);
    }
}
