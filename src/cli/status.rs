//! `vbd status`: what a running vbd serves right now (`GET /v1/status`),
//! as a short text summary for people or as the API's JSON for tools.

use std::fmt::Write as _;

use anyhow::Result;
use clap::Args;

use super::vm::{disks_text, vm_state_text};
use super::{ControlArg, print};
use vbd::control::model::{Status, VmInfo};

/// `vbd status` arguments.
#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    control: ControlArg,
    /// Print the control API's JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

/// Runs `vbd status`.
pub(crate) fn run(args: StatusArgs) -> Result<()> {
    let c = args.control.client();
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&c.status_json()?)?)
    } else {
        render_text(&c.status()?)
    };
    print(text.as_bytes())
}

/// Bytes in binary units ("512 B", "1.5 GiB").
fn human_bytes(n: u64) -> String {
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
fn render_text(s: &Status) -> String {
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
    render_vhost(&mut o, s);
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
                vm_state_text(v),
                v.pid,
                disks_text(&v.disks)
            );
            if let Some(at) = v.adopted_at_ms {
                let _ = writeln!(o, "  {}", adoption_text(v, at, now_ms()));
            }
        }
    }
    o
}

/// The exports also served over vhost-user, and their queues' counters.
fn render_vhost(o: &mut String, s: &Status) {
    let devices: Vec<_> = s
        .exports
        .iter()
        .filter_map(|e| e.vhost_user.as_ref().map(|v| (&e.name, v)))
        .collect();
    if devices.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nVHOST-USER");
    let _ = writeln!(
        o,
        "{:<20} {:<9} {:>7}  SOCKET",
        "EXPORT", "FRONTEND", "QUEUES"
    );
    for (name, v) in devices {
        let _ = writeln!(
            o,
            "{:<20} {:<9} {:>7}  {}",
            name,
            if v.attached { "attached" } else { "-" },
            format!("{}/{}", v.queues_running, v.queues_offered),
            v.socket
        );
        for q in &v.queues {
            let core = q.core.map_or("-".to_owned(), |c| c.to_string());
            let _ = writeln!(
                o,
                "  queue {:<3} core {:<3} {:>10} requests {:>10} read {:>10} written {:>7} errors",
                q.index,
                core,
                q.requests,
                human_bytes(q.bytes_read),
                human_bytes(q.bytes_written),
                q.errors
            );
        }
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The line under an adopted VM: when it was adopted and how each disk
/// came back after the restart.
fn adoption_text(v: &VmInfo, adopted_at_ms: u64, now_ms: u64) -> String {
    let mut t = format!(
        "adopted {} ago from an earlier vbd; disks after the restart:",
        duration_text(now_ms.saturating_sub(adopted_at_ms) / 1000)
    );
    for d in &v.disks {
        let Some(r) = &d.reconnect else { continue };
        let _ = match (&r.error, r.after_ms) {
            (Some(e), _) => write!(t, " {} FAILED ({e});", d.volume),
            (None, Some(ms)) if r.from_clean_stop => {
                write!(t, " {} back after {:.1}s;", d.volume, ms as f64 / 1000.0)
            }
            (None, Some(ms)) => write!(
                t,
                " {} back {:.1}s after this vbd started (the old one was killed: it waited longer);",
                d.volume,
                ms as f64 / 1000.0
            ),
            (None, None) => write!(
                t,
                " {} not reconnected yet (QEMU does on the guest's next I/O);",
                d.volume
            ),
        };
    }
    t.trim_end_matches(';').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vbd::control::model::{ConnSummary, ExportStatus, VhostQueueStatus, VhostUserStatus};

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
                vhost_user: Some(VhostUserStatus {
                    socket: "/run/vbd/disk0.vhost".into(),
                    attached: true,
                    queues_offered: 16,
                    queues_running: 2,
                    queues: vec![VhostQueueStatus {
                        index: 1,
                        core: Some(1),
                        requests: 42,
                        errors: 0,
                        bytes_read: 8192,
                        bytes_written: 0,
                    }],
                }),
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
        assert!(
            t.contains("attached") && t.contains("2/16") && t.contains("/run/vbd/disk0.vhost"),
            "{t}"
        );
        assert!(t.contains("queue 1") && t.contains("42 requests"), "{t}");
    }

    #[test]
    fn adopted_vms_say_how_their_disks_came_back() {
        use vbd::control::model::{DiskInfo, DiskReconnect, Role, VmState};
        let disk = |volume: &str, after_ms, from_clean_stop, error: Option<&str>| DiskInfo {
            volume: volume.into(),
            role: Role::Data,
            port: None,
            reconnect: Some(DiskReconnect {
                after_ms,
                from_clean_stop,
                error: error.map(String::from),
            }),
        };
        let vm = VmInfo {
            name: "web".into(),
            state: VmState::Running,
            pid: 42,
            vcpus: 1,
            memory_mib: 256,
            disks: vec![
                disk("root", Some(2900), true, None),
                disk("logs", None, true, None),
                disk("db", None, true, Some("no volume")),
            ],
            serial_log: "/s".into(),
            qmp_socket: "/q".into(),
            started_at_ms: 1_000,
            adopted_at_ms: Some(10_000),
        };
        assert_eq!(vm_state_text(&vm), "running, adopted");
        assert_eq!(
            adoption_text(&vm, 10_000, 75_000),
            "adopted 1m 5s ago from an earlier vbd; disks after the restart: root back after 2.9s; \
             logs not reconnected yet (QEMU does on the guest's next I/O); db FAILED (no volume)"
        );
        let mut killed = vm.clone();
        killed.disks = vec![disk("root", Some(1250), false, None)];
        assert!(
            adoption_text(&killed, 10_000, 10_500).ends_with(
                "root back 1.2s after this vbd started (the old one was killed: it waited longer)"
            ),
            "{}",
            adoption_text(&killed, 10_000, 10_500)
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 40), "5.0 TiB");
    }
}
