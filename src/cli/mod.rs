//! Command-line parsing helpers shared by the `vbd` binary's subcommands.

pub mod export_spec;
pub mod group;
pub mod size;

pub use export_spec::{Backend, CacheSpec, ExportSpec};
pub use group::parse_group;
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

/// Where the embedded default keeps its objects: `/var/lib/vbd/objects` as
/// root, else `$XDG_DATA_HOME/vbd/objects` or `~/.local/share/vbd/objects`.
pub fn default_store_dir() -> PathBuf {
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
