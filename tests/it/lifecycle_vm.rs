//! Golden images for a fleet (issue 14): four TCG guests boot at once,
//! each from its own clone of one golden boot image, and each writes its
//! own marker to its disk. Afterwards every clone holds the golden image
//! plus its own marker, the golden snapshot is unchanged, and the store
//! holds the golden data once.

use crate::{common, vm_common};

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{TempDir, Vbd, assert_bytes_eq, vbd_cmd, write_pattern_file};
use serde_json::Value;
use vm_common::wait_serial;

#[test]
fn four_guests_boot_from_clones_of_one_golden_image() {
    let _one = vm_common::one_guest();
    let (kernel, initrd) = vm_common::test_guest(&[], "initrd.img");
    let dir = TempDir::new("lc-fleet");
    let store = format!("file://{}", dir.join("store").display());
    let wal = dir.join("wal").display().to_string();
    let vol = |args: &[&str]| {
        let mut all = vec!["volume"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--store", &store]);
        let o = vbd_cmd(&all, &[]);
        assert!(o.status.success(), "vbd {all:?}: {}", o.stderr);
        o.stdout
    };
    // The golden image: 32 MiB of data in a 64 MiB disk.
    let golden = dir.join("golden.raw");
    write_pattern_file(&golden, 77, 32 << 20);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&golden)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let golden_bytes = std::fs::read(&golden).unwrap();
    vol(&[
        "import",
        "golden",
        golden.to_str().unwrap(),
        "--wal-dir",
        &wal,
    ]);
    vol(&["snapshot", "golden@v1", "--wal-dir", &wal]);
    let clones: Vec<String> = (0..4).map(|i| format!("vm{i}-root")).collect();
    for c in &clones {
        vol(&["clone", "golden@v1", c]);
    }
    let mut args = vec![
        "--wal-dir".to_owned(),
        wal.clone(),
        "--threads".into(),
        "1".into(),
    ];
    for c in &clones {
        args.push("--export".into());
        args.push(format!("name={c},store={store},volume={c}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut v = Vbd::start("lc-fleet-srv", &args);
    let control = v.path("control.sock");
    let ctl = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_vbd"))
            .args(args)
            .arg("--control")
            .arg(&control)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "vbd {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let tag = vm_common::tag("FLEET");
    for (i, c) in clones.iter().enumerate() {
        let append = format!("console=ttyS0 quiet panic=-1 vbd.mode=pattern vbd.pattern={tag}-{i}");
        ctl(&[
            "vm",
            "run",
            &format!("g{i}"),
            "--accel",
            "tcg",
            "--vcpus",
            "1",
            "--memory",
            "192M",
            "--volume",
            &format!("{c}:boot"),
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            &append,
        ]);
    }
    let vms: Vec<Value> = serde_json::from_slice(&ctl(&["vm", "list", "--json"])).unwrap();
    assert_eq!(vms.len(), 4, "four guests run at once: {vms:?}");
    for vm in &vms {
        let serial = PathBuf::from(vm["serial_log"].as_str().unwrap());
        wait_serial(&serial, "VBD-WROTE-VDA", Duration::from_secs(600));
    }
    // A snapshot of a running VM's disks, through the control API.
    let out = String::from_utf8(ctl(&["vm", "snapshot", "g0", "after"])).unwrap();
    assert!(out.contains("vm0-root@after"), "{out}");
    for i in 0..4 {
        ctl(&["vm", "stop", &format!("g{i}"), "--grace", "30"]);
    }
    v.stop();
    // Each clone: the golden image, with its own marker at 1 MiB.
    for (i, c) in clones.iter().enumerate() {
        let out = dir.join(&format!("{c}.raw"));
        vol(&["export", c, out.to_str().unwrap()]);
        let mut want = golden_bytes.clone();
        want[1 << 20..(1 << 20) + 4096]
            .copy_from_slice(&vm_common::guest_pattern(&format!("{tag}-{i}-vda"), 4096));
        assert_bytes_eq(&std::fs::read(&out).unwrap(), &want, c);
    }
    let out = dir.join("golden-v1.raw");
    vol(&["export", "golden@v1", out.to_str().unwrap()]);
    assert_bytes_eq(&std::fs::read(&out).unwrap(), &golden_bytes, "golden@v1");
    // The golden data is stored once; the clones add only what they wrote.
    let mut chunk_bytes = 0;
    let mut dirs = vec![dir.join("store")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else if e.path().to_string_lossy().contains("/chunks/") {
                chunk_bytes += e.metadata().unwrap().len();
            }
        }
    }
    assert!(
        chunk_bytes < (32 << 20) + (4 << 20),
        "the store holds the golden data once: {chunk_bytes} bytes of chunks"
    );
    for c in &clones {
        let i: Value = serde_json::from_str(&vol(&["info", c])).unwrap();
        assert_eq!(i["parent"], "golden@v1", "{i}");
        assert!(i["own_bytes"].as_u64().unwrap() <= 64 << 10, "{i}");
    }
}
