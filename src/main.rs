//! The `vbd` binary: command-line edge over the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::info;
use tracing_subscriber::EnvFilter;

use vbd::cli::{
    Backend, CacheSpec, ExportSpec, default_socket, default_store_dir, parse_group, parse_size,
};
use vbd::control::metrics::{self, Sources};
use vbd::control::service::{ControlPlane, default_control_socket};
use vbd::control::volumes::ObjectBackend;
use vbd::nbd::TlsMode;
use vbd::objstore::Store;
use vbd::runtime::runtime;
use vbd::server::{
    ConnConfig, Registry, Server, ServerConfig, SocketTuning, TlsOptions, TlsServer, signals,
};
use vbd::volume::Volume;
use vbd::volume::file::{FileOptions, FileVolume};
use vbd::volume::memory::MemoryVolume;
use vbd::volume::object::cache::CacheSize;
use vbd::volume::object::{ObjectOptions, admin};

#[derive(Parser)]
#[command(name = "vbd", version, about = "A block server for virtual machines")]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); RUST_LOG also works.
    #[arg(long, global = true)]
    log: Option<String>,
    /// Log line format: text for people, json (one object per line, with
    /// every field) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve volumes over NBD until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Create, list, inspect and delete object-store volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Object store tools.
    #[command(subcommand)]
    Objstore(ObjstoreCmd),
    /// Run and manage QEMU VMs through a running `vbd serve`.
    Vm(vbd::vm::cli::VmArgs),
    /// Show a running `vbd serve`: exports, connections and VMs.
    Status(vbd::control::status::StatusArgs),
}

#[derive(Args)]
struct StoreArg {
    /// Object store URL: file:///DIR or s3://BUCKET[/PREFIX] (S3 settings and
    /// credentials come from AWS_* variables or ~/.aws/credentials).
    /// Default: the embedded local store.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
}

impl StoreArg {
    fn url(&self) -> String {
        self.store
            .clone()
            .unwrap_or_else(|| format!("file://{}", default_store_dir().display()))
    }
    fn open(&self) -> Result<Store> {
        let url = self.url();
        Store::open(&url).with_context(|| format!("opening store {url}"))
    }
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume (instant, whatever its size).
    Create {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        /// Size, e.g. 10G or 1T (a multiple of 4 KiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Show a volume's size, storage use and lock holder (as JSON).
    Info {
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
    /// Delete a volume and all its objects.
    Delete {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        /// Delete even if a writer lock is held (for a lock left by a lost machine).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ObjstoreCmd {
    /// Serve a directory over the S3 protocol on loopback (or ADDR).
    Serve {
        /// Directory holding the buckets (one subdirectory each).
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on; port 0 picks a free port (printed on stdout).
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Buckets to create if missing.
        #[arg(long, default_value = "vbd")]
        bucket: Vec<String>,
        /// AWS-style credentials file whose [default] profile holds the key
        /// pair clients must sign with; default: AWS_ACCESS_KEY_ID and
        /// AWS_SECRET_ACCESS_KEY from the environment.
        #[arg(long)]
        credentials: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Listen on this Unix socket (repeatable). Default: /run/vbd/vbd.sock as
    /// root, else $XDG_RUNTIME_DIR/vbd/vbd.sock or /tmp/vbd-UID/vbd.sock.
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// Listen on this TCP address, e.g. 127.0.0.1:10809 (repeatable; off unless given).
    #[arg(long, value_name = "ADDR")]
    tcp: Vec<SocketAddr>,
    /// An export: name=NAME,backend=memory|file|object[,size=1G][,path=FILE]
    /// [,store=URL,volume=NAME,cache=SIZE|auto][,read-only][,direct=off]
    /// (repeatable). The first export is also the default (empty name).
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
    #[arg(long, value_name = "US", default_value_t = vbd::server::DEFAULT_BUSY_POLL_US)]
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

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|_| format!("socket mode {s:?} must be octal, like 600"))
}

fn main() {
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Volume(cmd) => volume(cmd),
        Command::Objstore(cmd) => objstore(cmd),
        Command::Vm(args) => vbd::vm::cli::run_vm(args).map_err(Into::into),
        Command::Status(args) => vbd::control::status::run_status(args).map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("vbd: {e:#}");
        std::process::exit(1);
    }
}

fn open_volume(spec: &ExportSpec, wal_dir: Option<&PathBuf>) -> Result<Arc<dyn Volume>> {
    Ok(match &spec.backend {
        Backend::Memory { size } => Arc::new(MemoryVolume::new(*size, spec.read_only)),
        Backend::File { path, size, direct } => {
            let opts = FileOptions {
                read_only: spec.read_only,
                size: *size,
                no_direct: !direct,
            };
            Arc::new(
                FileVolume::open(path, &opts).with_context(|| format!("export {:?}", spec.name))?,
            )
        }
        Backend::Object {
            store,
            volume,
            cache,
            create,
        } => {
            let mut opts = ObjectOptions {
                read_only: spec.read_only,
                cache: match cache {
                    CacheSpec::Default => CacheSize::Default,
                    CacheSpec::Auto => CacheSize::Auto,
                    CacheSpec::Bytes(b) => CacheSize::Bytes(*b),
                },
                ..ObjectOptions::default()
            };
            if let Some(d) = wal_dir {
                opts.wal_root = d.clone();
            }
            Arc::new(
                admin::open_url(store, volume, *create, opts)
                    .with_context(|| format!("export {:?}: store {store}", spec.name))?,
            )
        }
    })
}

fn volume(cmd: VolumeCmd) -> Result<()> {
    let rt = runtime();
    match cmd {
        VolumeCmd::Create { store, name, size } => {
            let d = rt.block_on(admin::create(&store.open()?, &name, size))?;
            println!(
                "created volume {} of {} bytes in {}",
                d.name,
                d.size,
                store.url()
            );
        }
        VolumeCmd::List { store } => {
            for d in rt.block_on(admin::list(&store.open()?))? {
                println!("{}\t{}", d.name, d.size);
            }
        }
        VolumeCmd::Info { store, name } => {
            let i = rt.block_on(admin::info(&store.open()?, &name))?;
            println!("{}", serde_json::to_string_pretty(&i)?);
        }
        VolumeCmd::Delete { store, name, force } => {
            rt.block_on(admin::delete(&store.open()?, &name, force))?;
            println!("deleted volume {name}");
        }
    }
    Ok(())
}

fn objstore(cmd: ObjstoreCmd) -> Result<()> {
    match cmd {
        ObjstoreCmd::Serve {
            dir,
            listen,
            bucket,
            credentials,
        } => serve_s3(dir, listen, bucket, credentials),
    }
}

#[cfg(feature = "s3-server")]
fn serve_s3(
    dir: PathBuf,
    listen: SocketAddr,
    buckets: Vec<String>,
    credentials: Option<PathBuf>,
) -> Result<()> {
    use vbd::objstore::credentials::{self, Credentials};
    use vbd::objstore::server::{ServeConfig, bind};
    let credentials = match credentials {
        Some(path) => credentials::read(&path, "default")?,
        None => match (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Ok(a), Ok(s)) if !a.is_empty() && !s.is_empty() => Credentials {
                access_key_id: a,
                secret_access_key: s,
                session_token: None,
            },
            _ => bail!(
                "no credentials for the S3 endpoint: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 or pass --credentials FILE (an AWS credentials file with a [default] profile)"
            ),
        },
    };
    let cfg = ServeConfig {
        dir,
        listen,
        credentials,
        buckets,
    };
    signals::block_termination().context("blocking SIGTERM/SIGINT")?;
    let rt = runtime();
    let endpoint = rt.block_on(bind(&cfg))?;
    println!("http://{}", endpoint.addr);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(endpoint.serve(async {
        let _ = rx.await;
    }));
    let sig = signals::wait_for_termination().context("waiting for SIGTERM/SIGINT")?;
    info!(signal = sig, "received termination signal");
    let _ = tx.send(());
    let _ = rt.block_on(server);
    Ok(())
}

#[cfg(not(feature = "s3-server"))]
fn serve_s3(_: PathBuf, _: SocketAddr, _: Vec<String>, _: Option<PathBuf>) -> Result<()> {
    bail!("this vbd was built without the s3-server feature; rebuild with default features")
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut exports = args.export;
    if exports.is_empty() {
        // The embedded default: a 1 GiB object volume in the local store.
        let spec = format!(
            "name=vbd,backend=object,store=file://{},volume=vbd,size=1G",
            default_store_dir().display()
        );
        exports.push(spec.parse().map_err(anyhow::Error::msg)?);
    }
    let mut unix = args.unix;
    if unix.is_empty() && args.tcp.is_empty() {
        unix.push(default_socket());
    }
    if args.max_inflight == 0 {
        bail!("--max-inflight must be at least 1");
    }
    if args.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    if args.max_buffered == 0 || args.max_buffered_total < args.max_buffered {
        bail!("--max-buffered must be above zero and no more than --max-buffered-total");
    }
    let tls = TlsServer::load(&TlsOptions {
        mode: match args.tls {
            TlsArg::Off => TlsMode::Off,
            TlsArg::On => TlsMode::On,
            TlsArg::Require => TlsMode::Require,
        },
        cert: args.tls_cert,
        key: args.tls_key,
        ca: args.tls_ca,
    })?;
    let registry = Arc::new(Registry::new());
    for spec in &exports {
        let volume = open_volume(spec, args.wal_dir.as_ref())?;
        let export = registry.add(&spec.name, volume, spec.read_only)?;
        info!(export = %export.name, size = export.info.size, read_only = export.read_only, "{}", export.description);
    }
    let cfg = ServerConfig {
        unix,
        tcp: args.tcp,
        threads: args.threads,
        tuning: SocketTuning {
            sndbuf: args.sndbuf.map(|v| v.min(u32::MAX.into()) as u32),
            rcvbuf: args.rcvbuf.map(|v| v.min(u32::MAX.into()) as u32),
        },
        conn: ConnConfig {
            max_inflight: args.max_inflight,
            max_connections: args.max_connections,
            max_buffered: args.max_buffered,
            max_buffered_total: args.max_buffered_total,
            handshake_timeout: std::time::Duration::from_secs(args.handshake_timeout),
            ..ConnConfig::default()
        },
        socket_mode: args.socket_mode,
        socket_group: args.socket_group,
        busy_poll: std::time::Duration::from_micros(args.busy_poll),
        tls,
        ..ServerConfig::default()
    };
    // Block termination signals before any thread starts, so only sigwait sees them.
    signals::block_termination().context("blocking SIGTERM/SIGINT")?;
    let server = Server::start(cfg.clone(), registry.clone())?;
    let control = match cfg.unix.first() {
        Some(nbd) => Some(
            ControlPlane::start(
                server.handle(),
                nbd.clone(),
                &args.control.unwrap_or_else(|| default_control_socket(nbd)),
                args.run_dir.unwrap_or_else(|| nbd.with_file_name("vm")),
                vec![Box::new(ObjectBackend {
                    default_store: format!("file://{}", default_store_dir().display()),
                    wal_root: args.wal_dir.clone(),
                })],
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
    let sig = signals::wait_for_termination().context("waiting for SIGTERM/SIGINT")?;
    info!(signal = sig, "received termination signal");
    if let Some(m) = metrics {
        m.shutdown();
    }
    if let Some(control) = control {
        control.stop(std::time::Duration::from_secs(args.vm_stop_grace));
    }
    server.stop()?;
    Ok(())
}
