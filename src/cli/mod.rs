//! Command-line parsing helpers shared by the `vbd` binary's subcommands.

pub mod export_spec;
pub mod size;

pub use export_spec::{Backend, ExportSpec};
pub use size::parse_size;

use std::path::PathBuf;

/// Where `vbd serve` listens when given no `--unix` or `--tcp`.
pub fn default_socket() -> PathBuf {
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
