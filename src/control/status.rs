//! `GET /v1/status` and `vbd status`: what a running vbd serves right now —
//! its exports, the connections on every core and the VMs — as JSON for
//! tools and as a short text summary for people.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::metrics::Sources;
use crate::server::ConnSummary;
use crate::vm::cli::{CliError, ControlArg, disks_text, state_text};
use crate::vm::supervisor::VmInfo;

/// How long the cores get to describe their connections.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// The status of a running vbd.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    /// NBD listeners (socket paths and TCP addresses).
    pub listeners: Vec<String>,
    /// Connections open, including those still negotiating.
    pub connections_open: usize,
    pub exports: Vec<ExportStatus>,
    pub connections: Vec<ConnSummary>,
    /// Empty when vbd runs without a control plane.
    pub vms: Vec<VmInfo>,
}

/// One export as the status shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportStatus {
    pub name: String,
    pub backend: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// Connections attached now.
    pub connections: u64,
}

/// Gathers the status; the connection list comes from the cores
/// themselves, so this waits (off the async workers) for their answers.
pub async fn gather(sources: &Arc<Sources>) -> Status {
    let server = sources.server.clone();
    let connections = tokio::task::spawn_blocking(move || server.connections(SNAPSHOT_TIMEOUT))
        .await
        .unwrap_or_default();
    let s = &sources.server;
    let exports = s
        .registry
        .all()
        .iter()
        .map(|e| ExportStatus {
            name: e.name.clone(),
            backend: e.volume.backend().to_owned(),
            description: e.description.clone(),
            size: e.info.size,
            read_only: e.read_only,
            connections: e.metrics.totals().connections,
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: s.started.elapsed().as_secs(),
        listeners: s.addresses.clone(),
        connections_open: s.gauges.connections(),
        exports,
        connections,
        vms: sources
            .supervisor
            .as_ref()
            .map(|sup| sup.list())
            .unwrap_or_default(),
    }
}

/// Bytes in binary units ("512 B", "1.5 GiB").
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn duration_text(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// The readable summary `vbd status` prints.
pub fn render_text(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "vbd {}, up {}, listening on {}; {} connection{} open",
        s.version,
        duration_text(s.uptime_seconds),
        if s.listeners.is_empty() {
            "-".to_owned()
        } else {
            s.listeners.join(", ")
        },
        s.connections_open,
        if s.connections_open == 1 { "" } else { "s" }
    );
    let _ = writeln!(o, "\nEXPORTS");
    if s.exports.is_empty() {
        let _ = writeln!(o, "  (none)");
    } else {
        let _ = writeln!(
            o,
            "{:<20} {:<8} {:>10} {:<4} {:>5}  DESCRIPTION",
            "NAME", "BACKEND", "SIZE", "MODE", "CONNS"
        );
        for e in &s.exports {
            let _ = writeln!(
                o,
                "{:<20} {:<8} {:>10} {:<4} {:>5}  {}",
                e.name,
                e.backend,
                human_bytes(e.size),
                if e.read_only { "ro" } else { "rw" },
                e.connections,
                e.description
            );
        }
    }
    let _ = writeln!(o, "\nCONNECTIONS");
    if s.connections.is_empty() {
        let _ = writeln!(o, "  (none)");
    } else {
        let _ = writeln!(
            o,
            "{:<40} {:<20} {:>4} {:>10} {:>10} {:>10} {:>7}",
            "PEER", "EXPORT", "CORE", "REQUESTS", "READ", "WRITTEN", "ERRORS"
        );
        for c in &s.connections {
            let _ = writeln!(
                o,
                "{:<40} {:<20} {:>4} {:>10} {:>10} {:>10} {:>7}",
                c.peer,
                c.export.as_deref().unwrap_or("(negotiating)"),
                c.core,
                c.requests,
                human_bytes(c.bytes_read),
                human_bytes(c.bytes_written),
                c.errors
            );
        }
    }
    let _ = writeln!(o, "\nVMS");
    if s.vms.is_empty() {
        let _ = writeln!(o, "  (none)");
    } else {
        let _ = writeln!(o, "{:<16} {:<30} {:>8}  VOLUMES", "NAME", "STATE", "PID");
        for v in &s.vms {
            let _ = writeln!(
                o,
                "{:<16} {:<30} {:>8}  {}",
                v.name,
                state_text(&v.state),
                v.pid,
                disks_text(&v.disks)
            );
        }
    }
    o
}

/// `vbd status` arguments.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub control: ControlArg,
    /// Print the control API's JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// Runs `vbd status`.
pub fn run_status(args: StatusArgs) -> Result<(), CliError> {
    let c = args.control.client();
    let mut out = std::io::stdout().lock();
    if args.json {
        let v: Value = c.call::<(), _>("GET", "/v1/status", None)?;
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        )?;
    } else {
        let s: Status = c.call::<(), _>("GET", "/v1/status", None)?;
        out.write_all(render_text(&s).as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_exports_connections_and_vms() {
        let s = Status {
            version: "0.1.0".into(),
            uptime_seconds: 3725,
            listeners: vec!["/run/vbd/vbd.sock".into()],
            connections_open: 1,
            exports: vec![ExportStatus {
                name: "disk0".into(),
                backend: "memory".into(),
                description: "vbd export: memory".into(),
                size: 1 << 30,
                read_only: false,
                connections: 1,
            }],
            connections: vec![ConnSummary {
                core: 1,
                peer: "/run/vbd/vbd.sock#fd12".into(),
                export: Some("disk0".into()),
                requests: 7,
                errors: 0,
                bytes_read: 4096,
                bytes_written: 0,
            }],
            vms: Vec::new(),
        };
        let t = render_text(&s);
        assert!(t.contains("up 1h 2m"), "{t}");
        assert!(t.contains("1 connection open"), "{t}");
        assert!(t.contains("disk0") && t.contains("1.0 GiB"), "{t}");
        assert!(
            t.contains("/run/vbd/vbd.sock#fd12") && t.contains("4.0 KiB"),
            "{t}"
        );
        assert!(t.contains("VMS\n  (none)"), "{t}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 40), "5.0 TiB");
    }
}
