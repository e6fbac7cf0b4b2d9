//! `vbd serve`: open the exports, start the NBD server, the control API and
//! the metrics listener, and run until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use tracing::{info, warn};

use super::activation::{self as passed_sockets, Sockets};
use super::export_spec::ExportSpec;
use super::group::parse_group;
use super::{default_socket, default_store_url};
use vbd::control::api::ControlSocket;
use vbd::control::factory::{BackendSpec, VolumeFactory};
use vbd::control::metrics::{self, Sources};
use vbd::control::service::{ControlPlane, default_control_socket};
use vbd::control::vhost_exports::VhostExports;
use vbd::nbd::{DEFAULT_MAX_PAYLOAD, HandshakeConfig, TlsMode};
use vbd::server::{
    ConnConfig, DEFAULT_BUSY_POLL_US, Registry, Server, ServerConfig, SocketTuning, TlsOptions,
    TlsServer, signals, stdio,
};
use vbd::service::activation;
use vbd::service::notify::Notifier;
use vbd::size::parse_size;
use vbd::vhost::device::SocketAccess;
use vbd::vm::config::{DEFAULT_DISK_RECONNECT_DELAY_SECS, DiskTransport};
use vbd::vm::supervisor::{SupervisorConfig, VmsOnExit};

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
    /// [,read-only][,direct=off][,vhost-user=SOCKET] (repeatable). The first
    /// export is also the default (empty name). durability=store: FLUSH and
    /// FUA wait until the writes are in the object store; take-over: fence a
    /// holder that did not release the volume (its unuploaded writes are
    /// lost). vhost-user= serves it to QEMU as a vhost-user-blk device on
    /// that socket too (same --socket-mode and --socket-group as the NBD
    /// sockets).
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
    /// The largest READ or WRITE a client may send, e.g. 64M: advertised as
    /// the maximum block size; longer requests get EINVAL (a WRITE's data
    /// is read and dropped, so the connection goes on). At most
    /// --max-buffered. Default: 64M, or --max-buffered if that is less.
    #[arg(long, value_parser = parse_size)]
    max_request: Option<u64>,
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
    /// What stopping vbd does to its VMs: stop them, or keep them running
    /// for the next vbd to adopt (what the systemd unit uses; VMs on memory
    /// volumes are stopped all the same).
    #[arg(long, value_enum, default_value_t = VmsOnExitArg::Stop)]
    vms_on_exit: VmsOnExitArg,
    /// Seconds a VM's NBD disks hold guest I/O while vbd is away (a
    /// restart) before failing it; 0 fails at once. A VM's own
    /// disk_reconnect_delay_secs wins.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_DISK_RECONNECT_DELAY_SECS)]
    disk_reconnect_delay: u32,
    /// How VMs' boot and data disks reach QEMU unless a VM says otherwise:
    /// vhost-user (each disk a vhost-user-blk device whose queues run on
    /// vbd's cores; guest RAM becomes a shared memfd) or nbd.
    #[arg(long, value_name = "nbd|vhost-user", default_value = "vhost-user")]
    disk_transport: DiskTransport,
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
    /// Serve one NBD client on standard input and output (inetd style, as
    /// libnbd's nbd_connect_command runs a server), then exit when it
    /// disconnects. Logs go to stderr; no listener, control API or VMs.
    #[arg(long, conflicts_with_all = ["unix", "tcp", "control", "run_dir", "metrics"])]
    stdin: bool,
}

/// `--vms-on-exit` values.
#[derive(Clone, Copy, ValueEnum)]
enum VmsOnExitArg {
    Stop,
    Keep,
}

impl From<VmsOnExitArg> for VmsOnExit {
    fn from(v: VmsOnExitArg) -> VmsOnExit {
        match v {
            VmsOnExitArg::Stop => VmsOnExit::Stop,
            VmsOnExitArg::Keep => VmsOnExit::Keep,
        }
    }
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
    /// --max-request, or its default bounded by --max-buffered (in whole
    /// 4 KiB blocks). Out of range becomes a value `validate` refuses.
    fn max_payload(&self) -> u32 {
        let bytes = self
            .max_request
            .unwrap_or_else(|| u64::from(DEFAULT_MAX_PAYLOAD).min(self.max_buffered / 4096 * 4096));
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// The server settings these flags describe, without TLS (loaded after
    /// the cheap checks). The default listener is filled in unless clients
    /// come `elsewhere` (sockets passed in, or standard input).
    fn server_config(&self, elsewhere: bool) -> ServerConfig {
        let mut unix = self.unix.clone();
        if unix.is_empty() && self.tcp.is_empty() && !elsewhere {
            unix.push(default_socket());
        }
        ServerConfig {
            unix,
            tcp: self.tcp.clone(),
            // One client needs one core.
            threads: if self.stdin && self.threads == 0 {
                1
            } else {
                self.threads
            },
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
                handshake: HandshakeConfig {
                    max_payload: self.max_payload(),
                    ..HandshakeConfig::default()
                },
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
    // Block termination signals before any thread starts, so only sigwait
    // sees them: opening an object volume starts the background runtime's
    // threads, and a SIGTERM that reached one of those killed vbd outright
    // (seen when a test stopped vbd right after it came up). A signal
    // while the exports open waits until vbd is serving, which then stops.
    signals::block_termination().context("blocking SIGTERM/SIGINT")?;
    // SAFETY: main has parsed the command line and set up logging, neither
    // of which starts a thread, so nothing else touches the environment.
    let passed = unsafe { activation::take() }.context("socket activation")?;
    // SAFETY: as above; still no other thread.
    let notifier = unsafe { Notifier::from_env() }.unwrap_or_else(|e| {
        warn!("{e}");
        Notifier::disabled()
    });
    let mut exports = std::mem::take(&mut args.export);
    if exports.is_empty() {
        // The embedded default: a 1 GiB object volume in the local store.
        let spec = format!(
            "name=vbd,backend=object,store={},volume=vbd,size=1G",
            default_store_url()
        );
        exports.push(spec.parse().map_err(anyhow::Error::msg)?);
    }
    let sockets = passed_sockets::by_role(passed, args.stdin)?;
    let passed_any =
        !sockets.nbd.is_empty() || sockets.control.is_some() || sockets.metrics.is_some();
    let mut cfg = args.server_config(args.stdin || !sockets.nbd.is_empty());
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
    if args.stdin {
        if exports.iter().any(|e| e.vhost_user.is_some()) {
            warn!("--stdin serves one NBD client: vhost-user= sockets are not opened");
        }
        return serve_one_client(cfg, registry, sockets, &notifier);
    }
    let server = Server::start_on(cfg.clone(), registry.clone(), sockets.nbd)?;
    let vhost = Arc::new(VhostExports::new());
    let access = SocketAccess {
        mode: cfg.socket_mode,
        group: cfg.socket_group,
    };
    for spec in &exports {
        if let Some(path) = &spec.vhost_user {
            vhost.start(&server.handle(), &spec.name, path, access)?;
        }
    }
    // The control API runs where it was asked for: on a socket passed in
    // as `control`, on --control, or beside the first --unix socket. A
    // passed NBD socket alone (libnbd starting vbd for itself) gets none.
    let control_socket = match (sockets.control, &args.control) {
        (Some(_), Some(path)) => anyhow::bail!(
            "--control {} and a control socket passed in: give one of them",
            path.display()
        ),
        (Some(passed), None) => Some(ControlSocket::Passed(passed)),
        (None, Some(path)) => Some(ControlSocket::Bind(path.clone())),
        (None, None) => cfg
            .unix
            .first()
            .map(|nbd| ControlSocket::Bind(default_control_socket(nbd))),
    };
    let control = match (control_socket, server.unix_paths().first()) {
        (Some(control), Some(nbd)) => Some(
            ControlPlane::start(
                server.handle(),
                control,
                {
                    let run_dir = args
                        .run_dir
                        .clone()
                        .unwrap_or_else(|| nbd.with_file_name("vm"));
                    let mut vms = SupervisorConfig::new(nbd.clone(), run_dir);
                    vms.disk_reconnect_delay_secs = args.disk_reconnect_delay;
                    vms.disk_transport = args.disk_transport;
                    vms
                },
                factory,
                vhost.clone(),
            )
            .context("starting the control API")?,
        ),
        (Some(_), None) => anyhow::bail!(
            "the control API needs a Unix NBD socket for VMs to reach their disks: \
             give --unix, or pass one (FileDescriptorName=nbd)"
        ),
        (None, _) => {
            info!(
                "no control socket: control API and VMs are off \
                 (give --unix or --control, or pass a socket named control)"
            );
            None
        }
    };
    let sources = || match &control {
        Some(c) => c.sources.clone(),
        None => Arc::new(Sources::server_only(server.handle(), vhost.clone())),
    };
    let metrics = match (sockets.metrics, args.metrics) {
        (Some(_), Some(addr)) => {
            anyhow::bail!("--metrics {addr} and a metrics socket passed in: give one of them")
        }
        (Some(passed), None) => Some(
            metrics::serve_listener(passed, sources())
                .context("starting the metrics listener passed in")?,
        ),
        (None, Some(addr)) => Some(
            metrics::serve_tcp(addr, sources())
                .with_context(|| format!("starting the metrics listener on {addr}"))?,
        ),
        (None, None) => None,
    };
    // On stdout for people and scripts; but a server started with sockets
    // passed in shares stdout with whoever started it (nbdinfo's output,
    // say), so then they only go to the log.
    for url in urls(&cfg, &server, &registry, &vhost) {
        if passed_any {
            info!(%url, "serving");
        } else {
            println!("{url}");
        }
    }
    notifier.ready(&format!(
        "serving {} export(s) on {}",
        registry.all().len(),
        server.addresses().join(", ")
    ));
    let sig = signals::wait_for_termination().context("waiting for SIGTERM/SIGINT")?;
    info!(signal = sig, "received termination signal");
    notifier.stopping("stopping: finishing in-flight requests");
    if let Some(m) = metrics {
        m.shutdown();
    }
    match control {
        Some(control) => control.shutdown(
            server,
            args.vms_on_exit.into(),
            Duration::from_secs(args.vm_stop_grace),
        )?,
        None => {
            // Queues finish their requests on the cores before the cores stop.
            vhost.stop_all();
            server.stop()?
        }
    }
    Ok(())
}

/// `--stdin`: serves the one client on standard input and output until it
/// disconnects (or a termination signal). A socket passed in stands for
/// standard input: a connection (a systemd unit with Accept=yes), or a
/// listener, as libnbd's `[ CMD ]` (nbdcopy, nbdinfo) starts the server
/// with socket activation and its client may open several connections;
/// the server exits once they have come and gone.
fn serve_one_client(
    cfg: ServerConfig,
    registry: Arc<Registry>,
    sockets: Sockets,
    notifier: &Notifier,
) -> Result<()> {
    if sockets.control.is_some() || sockets.metrics.is_some() {
        info!("--stdin: closing the control and metrics sockets passed in");
    }
    let server = if let Some(conn) = sockets.connection {
        info!("serving the client connection passed in");
        Server::start_one(cfg, registry, conn, "passed connection".into())?
    } else if sockets.nbd.is_empty() {
        let stdio = stdio::take()?;
        info!(
            connected_by = stdio.kind,
            "serving one client on standard input and output"
        );
        Server::start_one(cfg, registry, stdio.conn, "stdin".into())?
    } else {
        info!("--stdin with a socket passed in: serving its client, then exiting");
        Server::start_on(cfg, registry, sockets.nbd)?
    };
    notifier.ready("serving one client");
    // The client's going is noticed within this long.
    let poll = Duration::from_millis(50);
    let client_here = || server.accepted() == 0 || server.connections() > 0;
    match signals::wait_for_termination_while(poll, client_here)
        .context("waiting for the client or SIGTERM/SIGINT")?
    {
        Some(sig) => info!(signal = sig, "received termination signal"),
        None => info!("the client disconnected"),
    }
    notifier.stopping("stopping");
    server.stop()?;
    Ok(())
}

/// One NBD URL per export and listener, then each vhost-user socket.
fn urls(
    cfg: &ServerConfig,
    server: &Server,
    registry: &Registry,
    vhost: &VhostExports,
) -> Vec<String> {
    let mut out = Vec::new();
    for path in server.unix_paths() {
        for e in registry.all() {
            out.push(format!("nbd+unix:///{}?socket={}", e.name, path.display()));
        }
    }
    for addr in server.tcp_addresses() {
        for scheme in TlsServer::tcp_schemes(cfg.tls.as_deref()) {
            for e in registry.all() {
                out.push(format!("{scheme}://{addr}/{}", e.name));
            }
        }
    }
    for (name, device) in vhost.list() {
        out.push(format!(
            "vhost-user-blk {} export={name}",
            device.socket.display()
        ));
    }
    out
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
        Serve::try_parse_from(argv)
            .unwrap()
            .args
            .server_config(false)
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
        assert_eq!(config(&[]).conn.handshake.max_payload, 64 << 20);
        let small = config(&["--max-buffered", "8M"]);
        assert_eq!(small.conn.handshake.max_payload, 8 << 20, "bounded");
        assert_eq!(small.validate(), Ok(()));
        assert_eq!(
            config(&["--max-request", "128M", "--max-buffered", "128M"])
                .conn
                .handshake
                .max_payload,
            128 << 20
        );
        for bad in [
            &["--max-request", "512M"][..], // over --max-buffered (256M)
            &[
                "--max-request",
                "5G",
                "--max-buffered",
                "8G",
                "--max-buffered-total",
                "8G",
            ],
            &[
                "--max-request",
                "4G",
                "--max-buffered",
                "8G",
                "--max-buffered-total",
                "8G",
            ],
            &["--max-request", "32K"],
            &["--max-request", "1000000"],
        ] {
            assert_eq!(refused(bad), ConfigError::MaxRequest, "{bad:?}");
        }
    }
}
