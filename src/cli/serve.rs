//! `vbd serve`: open the exports, start the NBD server, the control API and
//! the metrics listener, and run until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use tracing::info;

use super::export_spec::ExportSpec;
use super::group::parse_group;
use super::{default_socket, default_store_url};
use vbd::control::factory::{BackendSpec, VolumeFactory};
use vbd::control::metrics::{self, Sources};
use vbd::control::service::{ControlPlane, default_control_socket};
use vbd::nbd::TlsMode;
use vbd::server::{
    ConnConfig, DEFAULT_BUSY_POLL_US, Registry, Server, ServerConfig, SocketTuning, TlsOptions,
    TlsServer, signals,
};
use vbd::size::parse_size;

/// `vbd serve` arguments.
#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Listen on this Unix socket (repeatable). Default: /run/vbd/vbd.sock as
    /// root, else $XDG_RUNTIME_DIR/vbd/vbd.sock or /tmp/vbd-UID/vbd.sock.
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// Listen on this TCP address, e.g. 127.0.0.1:10809 (repeatable; off unless given).
    #[arg(long, value_name = "ADDR")]
    tcp: Vec<SocketAddr>,
    /// An export: name=NAME,backend=memory|file|object[,size=1G][,path=FILE]
    /// [,store=URL,volume=NAME,cache=SIZE|auto,durability=local|store,take-over]
    /// [,read-only][,direct=off] (repeatable). The first export is also the
    /// default (empty name). durability=store: FLUSH and FUA wait until the
    /// writes are in the object store; take-over: fence a holder that did
    /// not release the volume (its unuploaded writes are lost).
    /// Default: a 1 GiB object volume "vbd" in the local store.
    #[arg(long, value_name = "SPEC")]
    export: Vec<ExportSpec>,
    /// Reactor threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// SO_SNDBUF for every connection, e.g. 4M (default: the kernel's).
    #[arg(long, value_parser = parse_size)]
    sndbuf: Option<u64>,
    /// SO_RCVBUF for every connection, e.g. 4M (default: the kernel's).
    #[arg(long, value_parser = parse_size)]
    rcvbuf: Option<u64>,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 512)]
    max_inflight: usize,
    /// Open connections at once; more are closed at accept (and logged).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Request data one connection may hold (write payloads, read replies
    /// not yet sent) before vbd stops reading from it, e.g. 256M.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    max_buffered: u64,
    /// Request data all connections together may hold, e.g. 1G.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    max_buffered_total: u64,
    /// Microseconds a core spins for more requests before it sleeps, after
    /// serving some; 0 sleeps at once (least CPU, most latency).
    #[arg(long, value_name = "US", default_value_t = DEFAULT_BUSY_POLL_US)]
    busy_poll: u64,
    /// Seconds a client may take to finish negotiating; 0 means no limit.
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// Permission bits of Unix sockets, in octal.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Group owning the Unix sockets (name or gid), e.g. with --socket-mode 660
    /// so a QEMU running as another user in that group may connect.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    socket_group: Option<u32>,
    /// Where object volumes keep their write-ahead logs (default:
    /// /var/lib/vbd/wal as root, else ~/.local/state/vbd/wal).
    #[arg(long, value_name = "DIR")]
    wal_dir: Option<PathBuf>,
    /// Control API socket (mode 0600). Default: control.sock beside the
    /// first --unix socket.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Directory for VMs' QMP sockets, pidfiles and logs. Default: vm/
    /// beside the first --unix socket.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Seconds each VM gets to power off when vbd stops.
    #[arg(long, default_value_t = 30)]
    vm_stop_grace: u64,
    /// TLS on TCP listeners (NBD STARTTLS): off, on (offered; plaintext
    /// clients are served too) or require (plaintext clients are refused).
    /// Unix sockets offer TLS when it is on but never require it.
    #[arg(long, value_enum, default_value_t = TlsArg::Off)]
    tls: TlsArg,
    /// The server's certificate chain (PEM), for --tls=on|require.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM): TLS clients must present a certificate signed
    /// by one of them (client-certificate authentication).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) over plain HTTP on this TCP
    /// address, e.g. 127.0.0.1:9190 (off unless given; the control socket
    /// always serves them too).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

/// `--tls` values.
#[derive(Clone, Copy, ValueEnum)]
enum TlsArg {
    Off,
    On,
    Require,
}

impl From<TlsArg> for TlsMode {
    fn from(t: TlsArg) -> TlsMode {
        match t {
            TlsArg::Off => TlsMode::Off,
            TlsArg::On => TlsMode::On,
            TlsArg::Require => TlsMode::Require,
        }
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|_| format!("socket mode {s:?} must be octal, like 600"))
}

impl ServeArgs {
    /// The server settings these flags describe, without TLS (loaded after
    /// the cheap checks) and with the default listener filled in.
    fn server_config(&self) -> ServerConfig {
        let mut unix = self.unix.clone();
        if unix.is_empty() && self.tcp.is_empty() {
            unix.push(default_socket());
        }
        ServerConfig {
            unix,
            tcp: self.tcp.clone(),
            threads: self.threads,
            tuning: SocketTuning {
                sndbuf: self.sndbuf.map(|v| v.min(u32::MAX.into()) as u32),
                rcvbuf: self.rcvbuf.map(|v| v.min(u32::MAX.into()) as u32),
            },
            conn: ConnConfig {
                max_inflight: self.max_inflight,
                max_connections: self.max_connections,
                max_buffered: self.max_buffered,
                max_buffered_total: self.max_buffered_total,
                handshake_timeout: Duration::from_secs(self.handshake_timeout),
                ..ConnConfig::default()
            },
            socket_mode: self.socket_mode,
            socket_group: self.socket_group,
            busy_poll: Duration::from_micros(self.busy_poll),
            ..ServerConfig::default()
        }
    }
}

/// Runs `vbd serve` until a termination signal.
pub(crate) fn run(mut args: ServeArgs) -> Result<()> {
    let mut exports = std::mem::take(&mut args.export);
    if exports.is_empty() {
        // The embedded default: a 1 GiB object volume in the local store.
        let spec = format!(
            "name=vbd,backend=object,store={},volume=vbd,size=1G",
            default_store_url()
        );
        exports.push(spec.parse().map_err(anyhow::Error::msg)?);
    }
    let mut cfg = args.server_config();
    cfg.validate()?;
    cfg.tls = TlsServer::load(&TlsOptions {
        mode: args.tls.into(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        ca: args.tls_ca.clone(),
    })?;
    // The same factory opens the exports now and the API's volumes later.
    let factory = VolumeFactory {
        default_store: Some(default_store_url()),
        wal_root: args.wal_dir.clone(),
    };
    let registry = Arc::new(Registry::new());
    for spec in &exports {
        let volume = factory
            .open(&spec.volume)
            .with_context(|| match &spec.volume.backend {
                BackendSpec::Object {
                    store: Some(store), ..
                } => format!("export {:?}: store {store}", spec.name),
                _ => format!("export {:?}", spec.name),
            })?;
        let export = registry.add(&spec.name, volume, spec.volume.read_only)?;
        info!(export = %export.name, size = export.info.size, read_only = export.read_only, "{}", export.description);
    }
    // Block termination signals before any thread starts, so only sigwait sees them.
    signals::block_termination().context("blocking SIGTERM/SIGINT")?;
    let server = Server::start(cfg.clone(), registry.clone())?;
    let control = match cfg.unix.first() {
        Some(nbd) => Some(
            ControlPlane::start(
                server.handle(),
                nbd.clone(),
                &args
                    .control
                    .clone()
                    .unwrap_or_else(|| default_control_socket(nbd)),
                args.run_dir
                    .clone()
                    .unwrap_or_else(|| nbd.with_file_name("vm")),
                factory,
            )
            .context("starting the control API")?,
        ),
        None => {
            info!("no --unix socket: control API and VMs are off");
            None
        }
    };
    let metrics = match args.metrics {
        Some(addr) => {
            let sources = match &control {
                Some(c) => c.sources.clone(),
                None => Arc::new(Sources::server_only(server.handle())),
            };
            Some(
                metrics::serve_tcp(addr, sources)
                    .with_context(|| format!("starting the metrics listener on {addr}"))?,
            )
        }
        None => None,
    };
    print_urls(&cfg, &server, &registry);
    let sig = signals::wait_for_termination().context("waiting for SIGTERM/SIGINT")?;
    info!(signal = sig, "received termination signal");
    if let Some(m) = metrics {
        m.shutdown();
    }
    if let Some(control) = control {
        control.stop(Duration::from_secs(args.vm_stop_grace));
    }
    server.stop()?;
    Ok(())
}

/// One NBD URL per export and listener, on stdout, for people and scripts.
fn print_urls(cfg: &ServerConfig, server: &Server, registry: &Registry) {
    for path in &cfg.unix {
        for e in registry.all() {
            println!("nbd+unix:///{}?socket={}", e.name, path.display());
        }
    }
    for addr in server.addresses().iter().filter(|a| !a.starts_with('/')) {
        for scheme in TlsServer::tcp_schemes(cfg.tls.as_deref()) {
            for e in registry.all() {
                println!("{scheme}://{addr}/{}", e.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use vbd::server::ConfigError;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn config(argv: &[&str]) -> ServerConfig {
        let argv = std::iter::once("serve").chain(argv.iter().copied());
        Serve::try_parse_from(argv).unwrap().args.server_config()
    }

    #[test]
    fn flags_become_a_server_config_that_checks_its_limits() {
        let c = config(&["--tcp", "127.0.0.1:10809", "--max-buffered", "64M"]);
        assert!(
            c.unix.is_empty(),
            "a TCP listener replaces the default socket"
        );
        assert_eq!(c.conn.max_buffered, 64 << 20);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(config(&[]).unix, [default_socket()]);
        let refused = |argv: &[&str]| config(argv).validate().unwrap_err();
        assert_eq!(refused(&["--max-inflight", "0"]), ConfigError::NoInflight);
        assert_eq!(
            refused(&["--max-connections", "0"]),
            ConfigError::NoConnections
        );
        assert_eq!(
            refused(&["--max-buffered", "2G", "--max-buffered-total", "1G"]),
            ConfigError::Buffered
        );
    }
}
