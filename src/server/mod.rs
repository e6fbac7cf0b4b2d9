//! The engine: one thread per core, each with its own io_uring, serving the
//! exports in a shared [`Registry`] on Unix and TCP listeners.
//!
//! Rooms: `reactor` (one core's event loop), `conn` (one connection: receive
//! and send buffers, request slots, dispatch to the volume), `tls`
//! (STARTTLS), `listener` (sockets and their options), `registry` (the
//! exports), `limits` (server-wide gauges), `metrics` (per-core counters)
//! and `signals`. Rings come from [`crate::uring`], the protocol from
//! [`crate::nbd`], the data from [`crate::volume`].

pub mod conn;
pub mod limits;
mod listener;
pub mod metrics;
pub mod reactor;
pub mod registry;
pub mod signals;
pub mod stdio;
pub mod tls;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use thiserror::Error;
use tracing::{info, warn};

pub use conn::ConnConfig;
pub use limits::Gauges;
pub use listener::{ListenError, Listener, SocketTuning, Transport};
pub use metrics::ConnSummary;
use reactor::{CoreHandle, CoreMsg, CoreSetup};
pub use registry::{Export, Registry, RegistryError};
pub use tls::{TlsError, TlsOptions, TlsServer};

use crate::error::Chain;
use crate::uring::{Host, HostError, Hosted, RemoteSink, Waker};
use crate::volume::sync::SyncDriver;
use crate::volume::{IoFlags, Op, RemoteResult};

/// Default busy-poll window of a core, in microseconds.
pub const DEFAULT_BUSY_POLL_US: u64 = 50;

/// The smallest maximum block size a server may advertise. The spec asks
/// for 1 MiB; less is allowed only so that a small --max-buffered, which
/// bounds it, still leaves a working server.
const MIN_MAX_PAYLOAD: u32 = 64 << 10;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Unix socket paths to listen on.
    pub unix: Vec<PathBuf>,
    /// TCP addresses to listen on.
    pub tcp: Vec<SocketAddr>,
    /// Reactor threads; 0 means one per available core.
    pub threads: usize,
    /// Socket buffer sizes for connections.
    pub tuning: SocketTuning,
    /// Per-connection and global connection limits.
    pub conn: ConnConfig,
    /// Permission bits of Unix sockets.
    pub socket_mode: u32,
    /// Group owning Unix sockets (default: the server's).
    pub socket_group: Option<u32>,
    /// Submission queue entries per core.
    pub ring_entries: u32,
    /// Spin this long for more work before a core sleeps (see the reactor).
    pub busy_poll: std::time::Duration,
    /// Certificates and policy for STARTTLS; `None` refuses it.
    pub tls: Option<Arc<TlsServer>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            unix: Vec::new(),
            tcp: Vec::new(),
            threads: 0,
            tuning: SocketTuning::default(),
            conn: ConnConfig::default(),
            socket_mode: 0o600,
            socket_group: None,
            ring_entries: 1024,
            busy_poll: std::time::Duration::from_micros(DEFAULT_BUSY_POLL_US),
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Checks the limits make sense together, before anything is opened.
    /// (The messages name `vbd serve`'s flags, which set these fields.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.conn;
        if c.max_inflight == 0 {
            return Err(ConfigError::NoInflight);
        }
        if c.max_connections == 0 {
            return Err(ConfigError::NoConnections);
        }
        if c.max_buffered == 0 || c.max_buffered_total < c.max_buffered {
            return Err(ConfigError::Buffered);
        }
        let max = c.handshake.max_payload;
        if !max.is_multiple_of(4096) || max < MIN_MAX_PAYLOAD || u64::from(max) > c.max_buffered {
            return Err(ConfigError::MaxRequest);
        }
        Ok(())
    }
}

/// Why a [`ServerConfig`] cannot serve.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Zero requests in flight per connection would serve nothing.
    #[error("--max-inflight must be at least 1")]
    NoInflight,
    /// Zero connections would serve nothing.
    #[error("--max-connections must be at least 1")]
    NoConnections,
    /// The per-connection buffered-bytes limit is zero or exceeds the server-wide one.
    #[error("--max-buffered must be above zero and no more than --max-buffered-total")]
    Buffered,
    /// The largest request is not one the server can advertise and hold.
    #[error(
        "--max-request must be a multiple of 4K, at least 64K, below 4G and no more than --max-buffered"
    )]
    MaxRequest,
}

/// Why the server could not start or stopped badly.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The configuration fails its own checks.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be opened.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Neither a Unix socket nor a TCP address was given.
    #[error("no listener configured: give --unix PATH or --tcp ADDR")]
    NoListener,
    /// A core's thread, ring or eventfd could not be set up.
    #[error("cannot set up core {core}")]
    Core {
        /// Which core.
        core: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A core's thread panicked.
    #[error("core {0} panicked")]
    Panicked(usize),
}

/// A running server.
pub struct Server {
    registry: Arc<Registry>,
    gauges: Arc<Gauges>,
    started: Instant,
    cores: Vec<CoreHandle>,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
    addresses: Vec<String>,
    unix_paths: Vec<PathBuf>,
    tcp_addresses: Vec<String>,
    /// Socket files vbd made, removed on stop.
    socket_paths: Vec<PathBuf>,
}

impl Server {
    /// Binds every listener, then starts the cores.
    pub fn start(cfg: ServerConfig, registry: Arc<Registry>) -> Result<Server, ServerError> {
        Self::start_on(cfg, registry, Vec::new())
    }

    /// Binds the configured listeners, adds `passed` (sockets a service
    /// manager opened), then starts the cores.
    pub fn start_on(
        cfg: ServerConfig,
        registry: Arc<Registry>,
        passed: Vec<Listener>,
    ) -> Result<Server, ServerError> {
        cfg.validate()?;
        let mut listeners = Vec::new();
        for path in &cfg.unix {
            listeners.push(Listener::unix(path, cfg.socket_mode, cfg.socket_group)?);
        }
        for addr in &cfg.tcp {
            listeners.push(Listener::tcp(*addr)?);
        }
        listeners.extend(passed);
        if listeners.is_empty() {
            return Err(ServerError::NoListener);
        }
        Self::launch(cfg, registry, listeners)
    }

    /// Serves the one client on `conn` (already connected: `vbd serve
    /// --stdin`) and listens nowhere; [`Server::connections`] falls to
    /// zero when that client is gone.
    pub fn start_one(
        cfg: ServerConfig,
        registry: Arc<Registry>,
        conn: OwnedFd,
        peer: String,
    ) -> Result<Server, ServerError> {
        cfg.validate()?;
        let server = Self::launch(cfg, registry, Vec::new())?;
        // Counted as core 0's accept would, so closing uncounts it
        // (`validate` made room for at least one connection).
        if server.gauges.try_connect() {
            server.cores[0].send(CoreMsg::Conn {
                fd: conn,
                transport: Transport::Unix,
                peer,
            });
        }
        Ok(server)
    }

    /// Starts the cores; core 0 accepts on `listeners`.
    fn launch(
        cfg: ServerConfig,
        registry: Arc<Registry>,
        listeners: Vec<Listener>,
    ) -> Result<Server, ServerError> {
        let addresses: Vec<String> = listeners.iter().map(|l| l.addr.clone()).collect();
        let unix_paths: Vec<PathBuf> = listeners.iter().filter_map(|l| l.path.clone()).collect();
        let tcp_addresses: Vec<String> = listeners
            .iter()
            .filter(|l| l.transport == Transport::Tcp)
            .map(|l| l.addr.clone())
            .collect();
        let socket_paths: Vec<PathBuf> = listeners
            .iter()
            .filter(|l| l.owned)
            .filter_map(|l| l.path.clone())
            .collect();
        let n = if cfg.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            cfg.threads
        };
        let mut handles = Vec::new();
        let mut parts = Vec::new();
        for core in 0..n {
            let (tx, rx) = unbounded();
            let (rtx, remote_rx) = unbounded();
            let waker =
                Arc::new(Waker::new().map_err(|source| ServerError::Core { core, source })?);
            handles.push(CoreHandle {
                tx,
                waker: waker.clone(),
            });
            parts.push((
                rx,
                remote_rx,
                RemoteSink {
                    tx: rtx,
                    waker: waker.clone(),
                },
                waker,
            ));
        }
        let gauges = Arc::new(Gauges::new(
            n,
            cfg.conn.max_connections,
            cfg.conn.max_buffered_total,
        ));
        let mut threads = Vec::new();
        let mut listeners = Some(listeners);
        for (core, (rx, remote_rx, sink, waker)) in parts.into_iter().enumerate() {
            let setup = CoreSetup {
                index: core,
                rx,
                remote_rx,
                sink,
                waker,
                peers: handles.clone(),
                // Core 0 accepts and hands connections round-robin to all.
                listeners: if core == 0 {
                    listeners.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
                registry: registry.clone(),
                conn: cfg.conn,
                gauges: gauges.clone(),
                tuning: cfg.tuning,
                ring_entries: cfg.ring_entries,
                busy_poll: cfg.busy_poll,
                tls: cfg.tls.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("vbd-core-{core}"))
                .spawn(move || {
                    let r = reactor::run(setup);
                    if let Err(e) = &r {
                        tracing::error!(core, "reactor failed: {e}");
                    }
                    r
                })
                .map_err(|source| ServerError::Core { core, source })?;
            threads.push(t);
        }
        info!(cores = n, listeners = ?addresses, "serving");
        Ok(Server {
            registry,
            gauges,
            started: Instant::now(),
            cores: handles,
            threads,
            addresses,
            unix_paths,
            tcp_addresses,
            socket_paths,
        })
    }

    /// Connections open now (negotiating or attached).
    pub fn connections(&self) -> usize {
        self.gauges.connections()
    }

    /// Connections let in so far (including the one of [`Server::start_one`]).
    pub fn accepted(&self) -> u64 {
        self.gauges.events().accepted
    }

    /// The exports being served.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Where the server listens (socket paths and TCP addresses).
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The files of its Unix listeners, bound or passed in.
    pub fn unix_paths(&self) -> &[PathBuf] {
        &self.unix_paths
    }

    /// The addresses of its TCP listeners.
    pub fn tcp_addresses(&self) -> &[String] {
        &self.tcp_addresses
    }

    /// A handle through which the control plane observes the server.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            registry: self.registry.clone(),
            gauges: self.gauges.clone(),
            cores: self.cores.clone(),
            started: self.started,
            addresses: self.addresses.clone(),
        }
    }

    /// Stops accepting, lets in-flight requests finish, closes connections,
    /// flushes every volume and removes the socket files.
    pub fn stop(self) -> Result<(), ServerError> {
        info!("stopping: finishing in-flight requests");
        for core in &self.cores {
            core.send(CoreMsg::Stop);
        }
        let mut result = Ok(());
        for (i, t) in self.threads.into_iter().enumerate() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => result = Err(ServerError::Core { core: i, source }),
                Err(_) => result = Err(ServerError::Panicked(i)),
            }
        }
        flush_all(&self.registry);
        for export in self.registry.all() {
            export.volume.shutdown();
        }
        for p in &self.socket_paths {
            if let Err(e) = std::fs::remove_file(p) {
                warn!(path = %p.display(), "cannot remove socket: {e}");
            }
        }
        info!("stopped");
        result
    }
}

/// What the control plane may read of a running server: its exports, its
/// gauges and its cores, which answer snapshot requests.
#[derive(Clone)]
pub struct ServerHandle {
    /// The exports being served.
    pub registry: Arc<Registry>,
    /// Connection and buffering gauges.
    pub gauges: Arc<Gauges>,
    cores: Vec<CoreHandle>,
    /// When the server started.
    pub started: Instant,
    /// Where it listens.
    pub addresses: Vec<String>,
}

impl ServerHandle {
    /// Asks every core for its connections and waits up to `timeout` for
    /// the answers (a core that is stopping may not answer). Blocking: call
    /// it off the async runtime's workers.
    pub fn connections(&self, timeout: Duration) -> Vec<ConnSummary> {
        let (tx, rx) = unbounded();
        let mut asked = 0;
        for core in &self.cores {
            if core.tx.send(CoreMsg::Snapshot(tx.clone())).is_ok() {
                core.waker.wake();
                asked += 1;
            }
        }
        drop(tx);
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for _ in 0..asked {
            match rx.recv_deadline(deadline) {
                Ok(conns) => out.extend(conns),
                Err(_) => break,
            }
        }
        out.sort_by(|a, b| (a.core, &a.peer).cmp(&(b.core, &b.peer)));
        out
    }
}

/// The cores run other transports' per-core objects (vhost-user queues)
/// beside their NBD connections.
impl Host<RemoteResult> for ServerHandle {
    fn cores(&self) -> usize {
        self.cores.len()
    }

    fn host(&self, core: usize, object: Box<dyn Hosted<RemoteResult>>) -> Result<(), HostError> {
        let c = self
            .cores
            .get(core % self.cores.len().max(1))
            .ok_or(HostError::Stopped)?;
        c.tx.send(CoreMsg::Host(object))
            .map_err(|_| HostError::Stopped)?;
        c.waker.wake();
        Ok(())
    }
}

/// Flushes every export's volume, logging failures.
pub fn flush_all(registry: &Registry) {
    let mut driver = match SyncDriver::new() {
        Ok(d) => d,
        Err(e) => {
            warn!("cannot flush volumes: {e}");
            return;
        }
    };
    for export in registry.all() {
        if export.read_only {
            continue;
        }
        if let Err(e) = driver.op(&*export.volume, Op::Flush, 0, 0, IoFlags::default()) {
            warn!(export = %export.name, "final flush failed: {}", Chain(&e));
        }
    }
}
