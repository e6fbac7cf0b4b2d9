//! End to end under TCG: the real `vbd` binary serves the disks (over
//! vhost-user-blk, the default), the test guest from tools/build-guest.sh
//! boots from a vbd volume and writes known patterns, a second volume is
//! hot-attached and detached, and vbd reads both patterns back. A second scenario kills QEMU mid-run and
//! checks that vbd reports the crash and cleans up.

use crate::vm_common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use vm_common::{TempDir, guest_pattern, tag, test_guest, wait_for_path, wait_serial};

const VBD: &str = env!("CARGO_BIN_EXE_vbd");

/// The plain test guest (tools/build-guest.sh without options).
fn guest() -> (PathBuf, PathBuf) {
    test_guest(&[], "initrd.img")
}

/// A `vbd serve` process, stopped with SIGTERM when dropped.
struct Serve {
    child: Child,
    dir: TempDir,
    control: PathBuf,
}

impl Serve {
    fn start(exports: &[&str]) -> Serve {
        let dir = TempDir::new("e2e");
        let control = dir.join("control.sock");
        let mut cmd = Command::new(VBD);
        cmd.arg("serve")
            .arg("--unix")
            .arg(dir.join("nbd.sock"))
            .args(["--threads", "1", "--vm-stop-grace", "5"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve.log")).unwrap());
        for e in exports {
            cmd.arg("--export").arg(e);
        }
        let child = cmd.spawn().unwrap();
        wait_for_path(&control, Duration::from_secs(20));
        Serve {
            child,
            dir,
            control,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(VBD)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> Vec<u8> {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vbd {args:?} failed: {}\nserve log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        o.stdout
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    fn vms(&self) -> Vec<Value> {
        serde_json::from_slice(&self.ok(&["vm", "list", "--json"])).unwrap()
    }

    fn volumes(&self) -> String {
        String::from_utf8(self.ok(&["vm", "volume", "list"])).unwrap()
    }

    /// Export `name`'s vhost-user device as `vbd status --json` shows it
    /// (null when it has none).
    fn vhost(&self, name: &str) -> Value {
        let status: Value = serde_json::from_slice(&self.ok(&["status", "--json"])).unwrap();
        status["exports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map_or(Value::Null, |e| e["vhost_user"].clone())
    }

    /// 4 KiB of the volume at 1 MiB, where the guest writes its pattern.
    fn block(&self, volume: &str) -> Vec<u8> {
        self.ok(&[
            "vm", "volume", "read", volume, "--offset", "1M", "--length", "4096",
        ])
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the guest's `fill` writes: one 4 KiB block of `line\n`.
fn pattern(line: &str) -> Vec<u8> {
    guest_pattern(line, 4096)
}

fn start_guest(s: &Serve, name: &str, tag: &str) -> (PathBuf, Value) {
    let (kernel, initrd) = guest();
    let append = format!("console=ttyS0 quiet panic=-1 vbd.mode=pattern vbd.pattern={tag}");
    s.ok(&[
        "vm",
        "run",
        name,
        "--accel",
        "tcg",
        "--vcpus",
        "2",
        "--memory",
        "256M",
        "--volume",
        "boot:boot",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        &append,
    ]);
    let vm = s
        .vms()
        .into_iter()
        .find(|v| v["name"] == name)
        .expect("VM listed");
    assert_eq!(vm["state"], "running");
    let serial = PathBuf::from(vm["serial_log"].as_str().unwrap());
    wait_serial(&serial, "VBD-WROTE-VDA", Duration::from_secs(180));
    (serial, vm)
}

#[test]
fn guest_boots_from_vbd_writes_hot_attached_disk_and_data_reads_back() {
    let _one = vm_common::one_guest();
    let s = Serve::start(&["name=boot,backend=memory,size=64M"]);
    s.ok(&["vm", "volume", "create", "data", "--size", "32M"]);
    let t = tag("E2E");
    let (serial, vm) = start_guest(&s, "g1", &t);

    s.ok(&["vm", "attach", "g1", "data"]);
    assert!(
        s.volumes()
            .lines()
            .any(|l| l.starts_with("data ") && l.contains(" yes ") && l.contains("g1"))
    );
    wait_serial(&serial, "VBD-WROTE-VDB", Duration::from_secs(120));
    // Both disks went over vhost-user (the default): QEMU is the frontend
    // of each device, with a queue per vCPU, the hot-attached one too.
    for disk in ["boot", "data"] {
        let dev = s.vhost(disk);
        assert_eq!(dev["attached"], true, "{disk}: {dev}");
        assert_eq!(dev["queues_running"], 2, "{disk}: {dev}");
        assert!(
            dev["queues"][0]["requests"].as_u64() > Some(0),
            "{disk}: {dev}"
        );
    }
    s.ok(&["vm", "detach", "g1", "data", "--wait", "60"]);
    wait_serial(&serial, "VBD-VDB-GONE", Duration::from_secs(60));
    assert_eq!(
        s.vhost("data"),
        Value::Null,
        "the device went with the disk"
    );
    // Detach removed the export vbd started for the attach.
    assert!(
        s.volumes()
            .lines()
            .any(|l| l.starts_with("data ") && l.contains(" no "))
    );

    let out = String::from_utf8(s.ok(&["vm", "stop", "g1", "--grace", "60"])).unwrap();
    assert!(
        out.contains("powerdown"),
        "guest should power off on ACPI: {out}"
    );
    assert!(s.vms().is_empty());
    let qmp = PathBuf::from(vm["qmp_socket"].as_str().unwrap());
    assert!(!qmp.exists(), "QMP socket left behind");

    assert_eq!(s.block("boot"), pattern(&format!("{t}-vda")));
    assert_eq!(s.block("data"), pattern(&format!("{t}-vdb")));
}

#[test]
fn killed_qemu_is_reported_as_crashed_and_cleaned_up() {
    let _one = vm_common::one_guest();
    let s = Serve::start(&["name=boot,backend=memory,size=64M"]);
    s.ok(&["vm", "volume", "create", "data", "--size", "32M"]);
    let t = tag("CRASH");
    let (serial, vm) = start_guest(&s, "g2", &t);
    s.ok(&["vm", "attach", "g2", "data"]);
    wait_serial(&serial, "VBD-WROTE-VDB", Duration::from_secs(120));

    let pid = vm["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the QEMU the test started through vbd.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let start = Instant::now();
    let crashed = loop {
        let v = s.vms().into_iter().find(|v| v["name"] == "g2").unwrap();
        if v["state"] == "crashed" {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no crash reported: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        crashed["reason"].as_str().unwrap().contains("signal 9"),
        "{crashed}"
    );
    assert!(s.log().contains("QEMU crashed"), "{}", s.log());
    // Cleanup: the export started for the hot-attached volume is gone, as
    // are the QMP socket and the pidfile.
    assert!(
        s.volumes()
            .lines()
            .any(|l| l.starts_with("data ") && l.contains(" no ") && l.contains(" - "))
    );
    let qmp = PathBuf::from(vm["qmp_socket"].as_str().unwrap());
    assert!(!qmp.exists());
    assert!(!qmp.with_file_name("qemu.pid").exists());

    // Whatever the guest flushed before the kill is in the volumes.
    assert_eq!(s.block("boot"), pattern(&format!("{t}-vda")));
    assert_eq!(s.block("data"), pattern(&format!("{t}-vdb")));
    // The volume is free again, and stop clears the record.
    let out = String::from_utf8(s.ok(&["vm", "stop", "g2"])).unwrap();
    assert!(out.contains("already-exited"), "{out}");
    assert!(s.vms().is_empty());
}
