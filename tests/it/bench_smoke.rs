//! The benchmark tool's quick mode, so CI keeps `tools/bench-peers` working.
//! It checks the plumbing and the report's shape, never speed.

use crate::common;

use std::process::Command;

use common::*;

/// Runs `tools/bench-peers --smoke` with `args` before `--out OUT` and
/// returns the JSON report `report` it wrote there.
fn smoke(dir: &TempDir, args: &[&str], report: &str) -> serde_json::Value {
    let out = dir.join("out");
    run(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/bench-peers"))
            .args(["--smoke", "--vbd", env!("CARGO_BIN_EXE_vbd")])
            .args(args)
            .arg("--out")
            .arg(&out)
            .env("BENCH_DIR", dir.path()),
    );
    serde_json::from_str(&std::fs::read_to_string(out.join(report)).unwrap()).unwrap()
}

#[test]
fn bench_peers_smoke_mode_produces_a_report() {
    require("fio", "fio");
    require("nbdkit", "nbdkit");
    require("qemu-nbd", "qemu-utils");
    let dir = TempDir::new("bench-smoke");
    let doc = smoke(
        &dir,
        &["--only", "vbd-memory", "nbdkit-memory"],
        "results.json",
    );
    for target in ["vbd-memory", "nbdkit-memory"] {
        for wl in doc["workloads"].as_array().unwrap() {
            let r = &doc["results"][target][wl.as_str().unwrap()];
            assert!(r["iops"].as_f64().unwrap() > 0.0, "{target} {wl}: {r}");
            assert!(r["p99_us"].as_f64().unwrap() > 0.0, "{target} {wl}: {r}");
        }
    }
    assert!(
        doc["ratios"]["vbd-memory/nbdkit-memory"]["randrw-4k-1x32"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let svg = std::fs::read_to_string(dir.join("out").join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("vbd-memory"));

    // The per-request cost mode measures the server's and fio's CPU, and
    // compares vbd's with nbdkit's on memory and on a file in tmpfs.
    let cost = smoke(&dir, &["--cost"], "cost.json");
    for target in [
        "vbd-memory",
        "nbdkit-memory",
        "vbd-file-tmpfs",
        "nbdkit-file-tmpfs",
    ] {
        for wl in ["randrw-4k-1x1", "randrw-4k-1x32", "randrw-4k-4x32"] {
            let r = &cost["results"][target][wl];
            for key in ["iops", "server_us", "client_us", "p99_us"] {
                assert!(r[key].as_f64().unwrap() > 0.0, "{target} {wl} {key}: {r}");
            }
        }
    }
    for pair in [
        "vbd-memory/nbdkit-memory",
        "vbd-file-tmpfs/nbdkit-file-tmpfs",
    ] {
        assert!(
            cost["ratios"]["server_us"][pair]["randrw-4k-1x32"]
                .as_f64()
                .unwrap()
                > 0.0
        );
        assert!(
            cost["ratios"]["p99"][pair]["randrw-4k-4x32"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }
}

/// QEMU's NBD client against every server, and first writes against rewrites.
#[test]
fn bench_peers_smoke_covers_qemu_client_and_first_touch() {
    require("fio", "fio");
    require("nbdkit", "nbdkit");
    require("qemu-img", "qemu-utils");
    require("qemu-storage-daemon", "qemu-system-common");
    let dir = TempDir::new("bench-smoke-qemu");
    let doc = smoke(&dir, &["--qemu"], "qemu.json");
    for target in [
        "vbd-memory",
        "nbdkit-memory",
        "vbd-file-tmpfs",
        "nbdkit-file-tmpfs",
        "qemu-nbd-tmpfs",
        "qsd-tmpfs",
    ] {
        for wl in ["qemu-read-4k-d16", "qemu-write-4k-d16"] {
            let r = &doc["results"][target][wl];
            assert!(r["iops"].as_f64().unwrap() > 0.0, "{target} {wl}: {r}");
        }
    }
    assert!(
        doc["ratios"]["iops"]["vbd-file-tmpfs/qsd-tmpfs"]["qemu-write-4k-d16"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    let doc = smoke(&dir, &["--first-touch"], "first-touch.json");
    for target in ["vbd-memory", "nbdkit-memory"] {
        for cell in ["qemu-first", "qemu-rewrite", "fio-first", "fio-rewrite"] {
            let r = &doc["results"][target][cell];
            assert!(r["iops"].as_f64().unwrap() > 0.0, "{target} {cell}: {r}");
        }
        let r = &doc["results"][target]["fio-first"];
        for key in ["max_us", "bystander_max_us"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{target} {key}: {r}");
        }
        assert!(doc["ratios"][target]["qemu_iops"].as_f64().unwrap() > 0.0);
    }
}

/// Memory per idle connection: both servers grow when connections are
/// held open, and the report has the per-connection numbers.
#[test]
fn bench_peers_smoke_measures_idle_connections() {
    require("fio", "fio");
    require("nbdkit", "nbdkit");
    require("qemu-nbd", "qemu-utils");
    let dir = TempDir::new("bench-smoke-idle");
    let doc = smoke(&dir, &["--idle", "20"], "idle.json");
    assert_eq!(doc["connections"].as_u64(), Some(20), "{doc}");
    for target in ["vbd-memory", "nbdkit-memory"] {
        let m = &doc["medians"][target];
        let (before, after) = (
            m["before_kib"].as_f64().unwrap(),
            m["after_kib"].as_f64().unwrap(),
        );
        assert!(before > 0.0 && after > 0.0, "{target}: {m}");
        assert!(m["per_conn_kib"].is_number(), "{target}: {m}");
    }
}

/// `tools/object-cpu` (where an object volume's time goes) runs end to end
/// and reports every field for each run.
#[test]
fn object_cpu_reports_iops_threads_and_cache() {
    require("fio", "fio");
    require("curl", "curl");
    let dir = TempDir::new("object-cpu");
    let out = run(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/object-cpu"))
            .args(["--vbd", env!("CARGO_BIN_EXE_vbd")])
            .args(["--runtime", "1", "--jobs", "1 2"])
            .env("BENCH_DIR", dir.path()),
    );
    let text = &out.stdout;
    for jobs in ["1x32:", "2x32:"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(jobs))
            .unwrap_or_else(|| panic!("no {jobs} line in:\n{text}"));
        let fields: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(fields.len(), 6, "{line}");
        let iops: f64 = fields[0]
            .trim_start_matches(jobs)
            .trim()
            .trim_end_matches("IOPS")
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(iops > 0.0, "{line}");
        assert!(
            fields[3].contains("vbd-core-"),
            "the reactors worked: {line}"
        );
        // The warm-up wrote and read 512 MiB (two jobs' regions) through a
        // 2 GiB cache, and overwrites replace blocks rather than add them.
        let cached: u64 = fields[5]
            .trim_start_matches("cached")
            .trim_end_matches("MiB")
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!((400..=600).contains(&cached), "{line}");
    }
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "the tool removes its scratch directory"
    );
}
