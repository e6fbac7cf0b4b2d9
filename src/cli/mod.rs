//! The command line's front ends, one file per command: each holds the
//! command's clap types and turns them into library calls (`serve` starts
//! the server and the control plane; `volume` and `objstore` work on stores
//! directly; `vm` and `status` talk to a running vbd through
//! [`vbd::control::client`]). `export_spec` and `group` parse `serve`'s
//! `--export` and `--socket-group` values. This is the binary's edge, so it
//! may use anyhow; the library never imports it.

pub(crate) mod activation;
pub(crate) mod export_spec;
pub(crate) mod group;
pub(crate) mod lifecycle;
pub(crate) mod objstore;
pub(crate) mod progress;
pub(crate) mod route;
pub(crate) mod serve;
pub(crate) mod status;
pub(crate) mod vm;
pub(crate) mod volume;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use vbd::control::client::ControlClient;
use vbd::control::service::default_control_socket;

/// Where `vbd serve` listens when given no `--unix` or `--tcp`.
pub(crate) fn default_socket() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/vbd/vbd.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("vbd/vbd.sock"),
        _ => PathBuf::from(format!("/tmp/vbd-{uid}/vbd.sock")),
    }
}

/// Where the embedded default keeps its objects: `/var/lib/vbd/objects` as
/// root, else `$XDG_DATA_HOME/vbd/objects` or `~/.local/share/vbd/objects`.
pub(crate) fn default_store_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/vbd/objects");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("vbd/objects");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/share/vbd/objects")
}

/// The embedded default store's URL.
pub(crate) fn default_store_url() -> String {
    format!("file://{}", default_store_dir().display())
}

/// Where to find vbd's control socket.
#[derive(Args, Debug, Clone)]
pub(crate) struct ControlArg {
    /// The control socket of `vbd serve` (default: control.sock beside the
    /// default NBD socket).
    #[arg(long, global = true, value_name = "PATH")]
    control: Option<PathBuf>,
}

impl ControlArg {
    /// A client for the chosen (or default) control socket.
    pub(crate) fn client(&self) -> ControlClient {
        let path = self
            .control
            .clone()
            .unwrap_or_else(|| default_control_socket(&default_socket()));
        ControlClient::new(&path)
    }
}

/// Writes a command's output to stdout.
pub(crate) fn print(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("cannot write output")
}
