//! TLS for NBD (NBD_OPT_STARTTLS) with rustls: the certificates and policy,
//! loaded once at start-up, and per connection the bridge between the
//! socket's ciphertext (received and sent through the core's ring) and the
//! plaintext the connection parses and replies with. Encrypted connections
//! copy; plaintext ones never come here after the handshake's first bytes.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use thiserror::Error;
use tracing::info;

use super::listener::Transport;
use crate::nbd::TlsMode;

/// Ciphertext held before rustls takes it; a record is at most ~16 KiB.
const CIPHER_IN: usize = 64 << 10;
/// Plaintext encrypted for one send at most; the rest waits for the next.
const CIPHER_OUT: usize = 256 << 10;

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
    #[error(
        "--tls={0} needs the server's certificate and key: give --tls-cert FILE and --tls-key FILE (PEM)"
    )]
    NoCertificate(&'static str),
    #[error("--tls-cert, --tls-key and --tls-ca take effect only with --tls=on or --tls=require")]
    NotEnabled,
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {} is not usable: {detail}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "the private key {} does not belong to the certificate {}: give the key the certificate was issued for",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate {} with key {} cannot be used: {source}", cert.display(), key.display())]
    BadCertificate {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("CA file {} cannot verify clients: {detail}", path.display())]
    BadCa { path: PathBuf, detail: String },
    #[error("TLS setup failed: {0}")]
    Setup(#[source] rustls::Error),
}

/// Why TLS on one connection failed; the connection ends.
#[derive(Debug, Error)]
pub enum StreamError {
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error("TLS I/O: {0}")]
    Io(#[from] io::Error),
    #[error("STARTTLS accepted on a connection that was not offered TLS")]
    NotOffered,
    #[error("{0} bytes arrived with STARTTLS, more than a TLS ClientHello")]
    Early(usize),
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
    config: Arc<ServerConfig>,
    mode: TlsMode,
    client_auth: bool,
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
        // Chosen explicitly: object_store's dependencies enable another
        // provider in the same rustls, so there is no single default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs("certificate", cert)?;
        let key_der = read_key(key)?;
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

/// A connection's TLS state.
pub enum ConnTls {
    /// Not offered on this connection.
    Off,
    /// Offered; the client has not started it.
    Offered(Arc<TlsServer>),
    /// Running since STARTTLS.
    On(Box<TlsStream>),
}

impl ConnTls {
    /// The state and handshake policy of a new connection on `transport`.
    pub fn offer(server: Option<&Arc<TlsServer>>, transport: Transport) -> (Self, TlsMode) {
        match server {
            Some(s) if s.mode(transport) != TlsMode::Off => {
                (ConnTls::Offered(s.clone()), s.mode(transport))
            }
            _ => (ConnTls::Off, TlsMode::Off),
        }
    }

    /// Starts TLS once STARTTLS is acknowledged; `early` is what the client
    /// sent after the option (the start of its ClientHello, if anything).
    pub fn start(&mut self, early: &[u8]) -> Result<(), StreamError> {
        let ConnTls::Offered(server) = self else {
            return Err(StreamError::NotOffered);
        };
        if early.len() > CIPHER_IN {
            return Err(StreamError::Early(early.len()));
        }
        let conn = ServerConnection::new(server.config.clone())?;
        let mut cin = vec![0u8; CIPHER_IN].into_boxed_slice();
        cin[..early.len()].copy_from_slice(early);
        *self = ConnTls::On(Box::new(TlsStream {
            conn,
            cin,
            cin_start: 0,
            cin_end: early.len(),
            wire: Vec::new(),
            wire_sent: 0,
            sending: false,
            raw: true,
            client_auth: server.client_auth,
            established: false,
            closing: false,
            failed: false,
        }));
        Ok(())
    }

    /// Whether TLS has nothing left to send before the connection closes.
    pub fn idle(&self) -> bool {
        match self {
            ConnTls::On(t) => t.idle(),
            _ => true,
        }
    }
}

/// What one `decrypt` produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decrypted {
    /// Plaintext bytes written.
    pub bytes: usize,
    /// The client closed TLS (close_notify): no more input will come.
    pub closed: bool,
}

/// TLS running on one connection.
pub struct TlsStream {
    conn: ServerConnection,
    /// Received ciphertext; `cin[cin_start..cin_end]` awaits rustls.
    cin: Box<[u8]>,
    cin_start: usize,
    cin_end: usize,
    /// Ciphertext to send; `wire[wire_sent..]` is unsent.
    wire: Vec<u8>,
    wire_sent: usize,
    /// A send from `wire` is in flight: the kernel reads it, so it must not change.
    sending: bool,
    /// The STARTTLS ACK (and replies before it) still go out in plaintext.
    raw: bool,
    client_auth: bool,
    established: bool,
    /// close_notify is queued.
    closing: bool,
    /// TLS failed; only the alert rustls prepared is still sent.
    failed: bool,
}

impl TlsStream {
    /// Whether the plaintext prefix is still being sent, given whether the
    /// connection still has plaintext handshake bytes unsent; once those
    /// are out, everything goes through TLS.
    pub fn raw_prefix(&mut self, plaintext_unsent: bool) -> bool {
        self.raw &= plaintext_unsent;
        self.raw
    }

    /// Where the next receive may write ciphertext; empty when full.
    pub fn recv_space(&mut self) -> (*mut u8, usize) {
        if self.cin_start == self.cin_end {
            self.cin_start = 0;
            self.cin_end = 0;
        } else if self.cin_start > 0 {
            self.cin.copy_within(self.cin_start..self.cin_end, 0);
            self.cin_end -= self.cin_start;
            self.cin_start = 0;
        }
        let space = if self.failed {
            0
        } else {
            self.cin.len() - self.cin_end
        };
        (self.cin[self.cin_end..].as_mut_ptr(), space)
    }

    /// A receive into `recv_space` completed with `n` bytes.
    pub fn received(&mut self, n: usize) {
        self.cin_end = (self.cin_end + n).min(self.cin.len());
    }

    /// Moves received ciphertext through rustls and the plaintext it
    /// yields into `dst`, as much as fits.
    pub fn decrypt(&mut self, dst: &mut [u8], peer: &str) -> Result<Decrypted, StreamError> {
        let mut done = Decrypted::default();
        if self.failed || self.raw {
            return Ok(done);
        }
        loop {
            while done.bytes < dst.len() {
                match self.conn.reader().read(&mut dst[done.bytes..]) {
                    Ok(0) => {
                        done.closed = true;
                        return Ok(done);
                    }
                    Ok(n) => done.bytes += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(self.fail(e.into())),
                }
            }
            // rustls wants no more while it holds plaintext or owes a reply.
            if done.bytes == dst.len() || self.cin_start == self.cin_end || !self.conn.wants_read()
            {
                return Ok(done);
            }
            let mut input = &self.cin[self.cin_start..self.cin_end];
            match self.conn.read_tls(&mut input) {
                Ok(n) => self.cin_start += n,
                Err(e) => return Err(self.fail(e.into())),
            }
            if let Err(e) = self.conn.process_new_packets() {
                return Err(self.fail(e.into()));
            }
            if !self.established && !self.conn.is_handshaking() {
                self.established = true;
                info!(
                    peer,
                    version = ?self.conn.protocol_version(),
                    suite = ?self.conn.negotiated_cipher_suite().map(|s| s.suite()),
                    client_certificate = self.client_auth && self.conn.peer_certificates().is_some(),
                    "TLS established"
                );
            }
        }
    }

    fn fail(&mut self, e: StreamError) -> StreamError {
        // The alert rustls queued goes out with the next send.
        self.failed = true;
        e
    }

    /// Encrypts plaintext from `parts` in order, up to a send's worth;
    /// returns how many bytes were taken. Never while a send is in flight.
    pub fn encrypt<'a>(&mut self, parts: impl Iterator<Item = &'a [u8]>) -> usize {
        debug_assert!(!self.sending);
        if self.wire_sent >= self.wire.len() {
            self.wire.clear();
            self.wire_sent = 0;
        }
        let mut taken = 0;
        if !self.failed && !self.closing {
            'parts: for mut part in parts {
                while !part.is_empty() {
                    if taken >= CIPHER_OUT {
                        break 'parts;
                    }
                    // rustls takes up to its buffer limit per write.
                    let n = self.conn.writer().write(part).unwrap_or(0);
                    taken += n;
                    part = &part[n..];
                    if self.drain() == 0 && n == 0 {
                        break 'parts;
                    }
                }
            }
        }
        self.drain();
        taken
    }

    /// Moves the records rustls has ready onto the wire buffer.
    fn drain(&mut self) -> usize {
        let before = self.wire.len();
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.wire) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.wire.len() - before
    }

    /// Queues close_notify: nothing more will be sent.
    pub fn close(&mut self) {
        if !self.closing && !self.failed {
            self.closing = true;
            self.conn.send_close_notify();
            self.drain();
        }
    }

    /// Whether TLS failed (the connection must end once the alert is out).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether close_notify is queued: no more plaintext is taken.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// The ciphertext still to send.
    pub fn wire(&self) -> &[u8] {
        &self.wire[self.wire_sent..]
    }

    /// A send of `wire()` was submitted.
    pub fn start_send(&mut self) {
        self.sending = true;
    }

    /// Whether the completed send was one of `wire()` (and no longer is in flight).
    pub fn take_send(&mut self) -> bool {
        std::mem::take(&mut self.sending)
    }

    /// `n` bytes of `wire()` went out.
    pub fn sent(&mut self, n: usize) {
        self.wire_sent = (self.wire_sent + n).min(self.wire.len());
    }

    fn idle(&self) -> bool {
        !self.sending && self.wire_sent >= self.wire.len() && (self.closing || self.failed)
    }
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
