//! The systemd units in contrib/ pass `systemd-analyze verify` without a
//! warning, and say what vbd relies on: its sockets are passed under the
//! names vbd gives roles to, readiness is notified, and a stop signals vbd
//! alone (its VMs live on).

use std::process::Command;

use crate::common::*;

const UNITS: [&str; 3] = ["vbd.service", "vbd.socket", "vbd-control.socket"];

fn unit(name: &str) -> String {
    let path = format!("{}/contrib/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// `Key=value` lines of a unit (comments and sections skipped).
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn value(text: &str, key: &str) -> Vec<String> {
    settings(text)
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    require("systemd-analyze", "systemd");
    let dir = TempDir::new("units");
    for name in UNITS {
        // verify checks that ExecStart's program exists: point it at the
        // binary under test instead of the install path.
        let text = unit(name).replace("/usr/local/bin/vbd", env!("CARGO_BIN_EXE_vbd"));
        std::fs::write(dir.join(name), text).unwrap();
    }
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .args(UNITS)
        .current_dir(dir.path())
        .env("SYSTEMD_LOG_LEVEL", "info"));
    assert!(
        out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
        "systemd-analyze verify complained:\n{}{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn units_say_what_vbd_relies_on() {
    let service = unit("vbd.service");
    assert_eq!(value(&service, "Type"), ["notify"]);
    assert_eq!(value(&service, "KillMode"), ["process"], "VMs outlive vbd");
    assert_eq!(
        value(&service, "Sockets"),
        ["vbd.socket vbd-control.socket"]
    );
    let exec = value(&service, "ExecStart");
    assert!(
        exec.len() == 1 && exec[0].starts_with("/usr/local/bin/vbd serve "),
        "{exec:?}"
    );
    assert!(
        exec[0].contains(" --vms-on-exit keep "),
        "a restart of the service leaves the VMs running: {exec:?}"
    );
    // The names vbd gives roles to (src/cli/activation.rs).
    let nbd = unit("vbd.socket");
    assert_eq!(value(&nbd, "FileDescriptorName"), ["nbd"]);
    assert_eq!(value(&nbd, "ListenStream"), ["/run/vbd/vbd.sock"]);
    let control = unit("vbd-control.socket");
    assert_eq!(value(&control, "FileDescriptorName"), ["control"]);
    // vbd's default control socket for `vbd status` as root.
    assert_eq!(value(&control, "ListenStream"), ["/run/vbd/control.sock"]);
    for text in [&nbd, &control] {
        assert_eq!(value(text, "Service"), ["vbd.service"]);
        assert_eq!(value(text, "SocketMode"), ["0600"]);
    }
}
