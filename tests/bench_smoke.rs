//! The benchmark tool's quick mode, so CI keeps `tools/bench-peers` working.
//! It checks the plumbing and the report's shape, never speed.

mod common;

use std::process::Command;

use common::*;

#[test]
fn bench_peers_smoke_mode_produces_a_report() {
    require("fio", "fio");
    require("nbdkit", "nbdkit");
    require("qemu-nbd", "qemu-utils");
    let dir = TempDir::new("bench-smoke");
    let out = dir.join("out");
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/bench-peers");
    run(Command::new(tool)
        .args([
            "--smoke",
            "--vbd",
            env!("CARGO_BIN_EXE_vbd"),
            "--only",
            "vbd-memory",
            "nbdkit-memory",
            "--out",
        ])
        .arg(&out)
        .env("BENCH_DIR", dir.path()));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
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
    let svg = std::fs::read_to_string(out.join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("vbd-memory"));
}
