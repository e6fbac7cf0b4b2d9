//! The `vbd` binary: parse the command line, set up logging, and hand the
//! command to its front end in [`cli`]. Everything else is the library.

// Set here rather than in Cargo.toml's [lints]: see the note there.
#![warn(unreachable_pub)]

mod cli;

use std::io::IsTerminal;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve volumes over NBD until SIGTERM or SIGINT.
    Serve(Box<cli::serve::ServeArgs>),
    /// Create, list, inspect and delete object-store volumes.
    #[command(subcommand)]
    Volume(cli::volume::VolumeCmd),
    /// Object store tools.
    #[command(subcommand)]
    Objstore(cli::objstore::ObjstoreCmd),
    /// Run and manage QEMU VMs through a running `vbd serve`.
    Vm(cli::vm::VmArgs),
    /// Show a running `vbd serve`: exports, connections and VMs.
    Status(cli::status::StatusArgs),
}

fn main() {
    let cli = Cli::parse();
    let filter = cli
        .log
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
        Command::Serve(args) => cli::serve::run(*args),
        Command::Volume(cmd) => cli::volume::run(cmd),
        Command::Objstore(cmd) => cli::objstore::run(cmd),
        Command::Vm(args) => cli::vm::run(args),
        Command::Status(args) => cli::status::run(args),
    };
    if let Err(e) = result {
        // `{:#}` walks the cause chain: "what failed: why: root cause".
        eprintln!("vbd: {e:#}");
        std::process::exit(1);
    }
}
