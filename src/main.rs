//! The `vbd` binary: command-line edge over the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tracing::info;
use tracing_subscriber::EnvFilter;

use vbd::cli::{Backend, ExportSpec, default_socket, parse_size};
use vbd::control::service::{ControlPlane, default_control_socket};
use vbd::server::{ConnConfig, Registry, Server, ServerConfig, SocketTuning, signals};
use vbd::volume::Volume;
use vbd::volume::file::{FileOptions, FileVolume};
use vbd::volume::memory::MemoryVolume;

#[derive(Parser)]
#[command(name = "vbd", version, about = "A block server for virtual machines")]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); RUST_LOG also works.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve volumes over NBD until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Run and manage QEMU VMs through a running `vbd serve`.
    Vm(vbd::vm::cli::VmArgs),
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
    /// An export: name=NAME,backend=memory|file[,size=1G][,path=FILE][,read-only][,direct=off]
    /// (repeatable). The first export is also the default (empty name).
    /// Default: one memory export named "vbd" of 1 GiB.
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
    /// Permission bits of Unix sockets, in octal.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Vm(args) => vbd::vm::cli::run_vm(args).map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("vbd: {e:#}");
        std::process::exit(1);
    }
}

fn open_volume(spec: &ExportSpec) -> Result<Arc<dyn Volume>> {
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
    })
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut exports = args.export;
    if exports.is_empty() {
        exports.push(
            "name=vbd,backend=memory,size=1G"
                .parse()
                .map_err(anyhow::Error::msg)?,
        );
    }
    let mut unix = args.unix;
    if unix.is_empty() && args.tcp.is_empty() {
        unix.push(default_socket());
    }
    if args.max_inflight == 0 {
        bail!("--max-inflight must be at least 1");
    }
    let registry = Arc::new(Registry::new());
    for spec in &exports {
        let volume = open_volume(spec)?;
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
            ..ConnConfig::default()
        },
        socket_mode: args.socket_mode,
        ..ServerConfig::default()
    };
    // Block termination signals before any thread starts, so only sigwait sees them.
    signals::block_termination().context("blocking SIGTERM/SIGINT")?;
    let server = Server::start(cfg.clone(), registry.clone())?;
    let control = match cfg.unix.first() {
        Some(nbd) => Some(
            ControlPlane::start(
                registry.clone(),
                nbd.clone(),
                &args.control.unwrap_or_else(|| default_control_socket(nbd)),
                args.run_dir.unwrap_or_else(|| nbd.with_file_name("vm")),
            )
            .context("starting the control API")?,
        ),
        None => {
            info!("no --unix socket: control API and VMs are off");
            None
        }
    };
    for path in &cfg.unix {
        for e in registry.all() {
            println!("nbd+unix:///{}?socket={}", e.name, path.display());
        }
    }
    for addr in server.addresses().iter().filter(|a| !a.starts_with('/')) {
        for e in registry.all() {
            println!("nbd://{addr}/{}", e.name);
        }
    }
    let sig = signals::wait_for_termination().context("waiting for SIGTERM/SIGINT")?;
    info!(signal = sig, "received termination signal");
    if let Some(control) = control {
        control.stop(std::time::Duration::from_secs(args.vm_stop_grace));
    }
    server.stop()?;
    Ok(())
}
