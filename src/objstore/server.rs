//! The embedded S3-compatible endpoint: `s3s` over `s3s-fs`, with SigV4
//! authentication, serving a directory whose subdirectories are buckets.
//! One node can serve its objects to others, and the tests exercise the
//! real S3 protocol through it. s3s-fs is served through `fs_backend`:
//! create-if-absent PUTs are atomic there (`atomic_create`), which s3s-fs
//! alone does not make them, and GET bodies are read in one go
//! (`ranged_reads`), which s3s-fs alone streams 4 KiB at a time.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::credentials::Credentials;
use super::fs_backend::FsBackend;

/// Why the endpoint could not run.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The object directory or a bucket directory could not be created or resolved.
    #[error("cannot prepare the object directory {path}")]
    Dir {
        /// The object directory.
        path: PathBuf,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// `s3s-fs` keeps its error's cause private, so only its text is left.
    #[error("cannot serve S3 from {path}: {reason}")]
    Backend {
        /// The directory being served.
        path: PathBuf,
        /// What s3s-fs said.
        reason: String,
    },
    /// The endpoint could not bind or read back its address.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// What to serve and how.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Directory whose subdirectories are the buckets.
    pub dir: PathBuf,
    /// TCP address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// The one access key pair clients must sign with.
    pub credentials: Credentials,
    /// Buckets to create (as directories) before serving.
    pub buckets: Vec<String>,
}

/// A bound endpoint, ready to serve.
pub struct Endpoint {
    listener: TcpListener,
    service: s3s::service::S3Service,
    /// The address actually bound (the port chosen when 0 was asked for).
    pub addr: SocketAddr,
}

/// Prepares the directory and binds the listener.
pub async fn bind(cfg: &ServeConfig) -> Result<Endpoint, ServerError> {
    let dir_err = |source| ServerError::Dir {
        path: cfg.dir.clone(),
        source,
    };
    std::fs::create_dir_all(&cfg.dir).map_err(dir_err)?;
    for b in &cfg.buckets {
        std::fs::create_dir_all(cfg.dir.join(b)).map_err(dir_err)?;
    }
    // Resolving the root here keeps the likely failure a typed one.
    let root = cfg.dir.canonicalize().map_err(dir_err)?;
    let fs = s3s_fs::FileSystem::new(&root).map_err(|e| ServerError::Backend {
        path: cfg.dir.clone(),
        reason: s3s::S3Error::from(e)
            .source()
            .map_or_else(|| "unknown error".to_owned(), |s| s.to_string()),
    })?;
    let mut b = S3ServiceBuilder::new(FsBackend::new(fs, root));
    b.set_auth(SimpleAuth::from_single(
        cfg.credentials.access_key_id.clone(),
        cfg.credentials.secret_access_key.clone(),
    ));
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    Ok(Endpoint {
        listener,
        service: b.build(),
        addr,
    })
}

impl Endpoint {
    /// Serves until `stop` completes.
    pub async fn serve(self, stop: impl Future<Output = ()>) {
        let http = ConnBuilder::new(TokioExecutor::new());
        info!(addr = %self.addr, "S3 endpoint serving");
        let mut stop = std::pin::pin!(stop);
        loop {
            let (socket, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        debug!("S3 accept failed: {e}");
                        continue;
                    }
                },
                () = stop.as_mut() => break,
            };
            let conn = http
                .serve_connection(TokioIo::new(socket), self.service.clone())
                .into_owned();
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%peer, "S3 connection ended: {e}");
                }
            });
        }
        info!("S3 endpoint stopped");
    }
}

/// An endpoint on a scratch directory for the backend's unit tests, with
/// real S3 clients of it; stopped and removed when dropped.
#[cfg(test)]
pub(super) struct TestEndpoint {
    url: String,
    dir: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

#[cfg(test)]
impl TestEndpoint {
    /// Serves bucket `vbd` of a fresh directory named after `tag`.
    pub(super) fn start(tag: &str) -> TestEndpoint {
        let dir = std::env::temp_dir().join(format!("vbd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = ServeConfig {
            dir: dir.clone(),
            listen: "127.0.0.1:0".parse().expect("address"),
            credentials: Credentials {
                access_key_id: "k".into(),
                secret_access_key: "s".into(),
                session_token: None,
            },
            buckets: vec!["vbd".into()],
        };
        let rt = crate::runtime::runtime();
        let endpoint = rt.block_on(bind(&cfg)).expect("bind the endpoint");
        let url = format!("http://{}", endpoint.addr);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(endpoint.serve(async {
            let _ = stopped.await;
        }));
        TestEndpoint {
            url,
            dir,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// A client of bucket `vbd`, sending create-if-absent PUTs when
    /// `conditional`.
    pub(super) fn client(&self, conditional: bool) -> super::Store {
        use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
        let mut b = AmazonS3Builder::new()
            .with_endpoint(&self.url)
            .with_allow_http(true)
            .with_bucket_name("vbd")
            .with_region("us-east-1")
            .with_access_key_id("k")
            .with_secret_access_key("s");
        if conditional {
            b = b.with_conditional_put(S3ConditionalPut::ETagMatch);
        }
        let s3 = b.build().expect("client");
        super::Store::from_object_store(std::sync::Arc::new(s3), "s3://vbd")
    }
}

#[cfg(test)]
impl Drop for TestEndpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = crate::runtime::runtime().block_on(server);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
