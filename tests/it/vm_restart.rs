//! VMs outliving vbd, end to end under TCG with the real `vbd` binary run
//! as a service would run it (`--vms-on-exit keep`): a guest verifies its
//! own writes with fio (crc32c) while vbd is stopped with SIGTERM and
//! started again, then SIGKILLed and started again, once with the disks
//! over vhost-user-blk (QEMU's chardev reconnects, the inflight log
//! re-submits what vbd had taken) and once over NBD (reconnect-delay
//! holds the guest's I/O); fio reports no error,
//! the adopted VM is listed as running, and its hot-plugged disk, carried
//! across both restarts, is detached and attached again with its data
//! intact. Apart from that: a QEMU killed while vbd was down is reported as
//! crashed and its run files removed, and a pidfile naming another process
//! adopts nothing and leaves that process alone.

use crate::vm_common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use vm_common::{TempDir, guest_pattern, tag, test_guest, wait_serial};

const VBD: &str = env!("CARGO_BIN_EXE_vbd");

/// How long vbd gets to exit after SIGTERM, or to come up.
const VBD_DEADLINE: Duration = Duration::from_secs(60);

/// `vbd serve` on fixed paths in `dir`, so that a restart is the same
/// service again; its log is appended to across restarts.
struct Vbd {
    dir: PathBuf,
    exports: Vec<String>,
    child: Option<Child>,
    /// QEMUs the test started through vbd, killed if the test fails.
    qemus: Vec<(u32, String)>,
}

impl Vbd {
    fn start(dir: &Path, exports: &[String]) -> Vbd {
        let mut v = Vbd {
            dir: dir.to_owned(),
            exports: exports.to_vec(),
            child: None,
            qemus: Vec::new(),
        };
        v.spawn();
        v
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// Starts the process and waits until its control API answers, which
    /// it does once the VMs it found are adopted.
    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .unwrap();
        let d = &self.dir;
        let mut cmd = Command::new(VBD);
        cmd.arg("serve")
            .arg("--unix")
            .arg(d.join("nbd.sock"))
            .arg("--control")
            .arg(self.control())
            .arg("--run-dir")
            .arg(d.join("vm"))
            .arg("--wal-dir")
            .arg(d.join("wal"))
            .args(["--threads", "1", "--vm-stop-grace", "20"])
            .args(["--vms-on-exit", "keep"])
            .stdout(Stdio::null())
            .stderr(log);
        for e in &self.exports {
            cmd.arg("--export").arg(e);
        }
        self.child = Some(cmd.spawn().unwrap());
        let start = Instant::now();
        while !self.run(&["vm", "list", "--json"]).status.success() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("vbd exited at start ({st}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < VBD_DEADLINE,
                "vbd did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` and waits for the exit; returns its status and when.
    fn signal(&mut self, sig: i32) -> (std::process::ExitStatus, Instant) {
        let mut child = self.child.take().expect("vbd runs");
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return (st, Instant::now());
            }
            assert!(
                start.elapsed() < VBD_DEADLINE,
                "vbd did not exit on signal {sig}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(VBD)
            .args(args)
            .arg("--control")
            .arg(self.control())
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vbd {args:?} failed: {}\nserve log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn vm(&self, name: &str) -> Value {
        let vms: Value = serde_json::from_str(&self.ok(&["vm", "list", "--json"])).unwrap();
        vms.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("VM {name} not listed: {vms}"))
            .clone()
    }

    /// Starts a VM; remembers its QEMU so that a failed test kills it.
    fn run_vm(&mut self, name: &str, args: &[&str]) -> Value {
        let mut a = vec!["vm", "run", name, "--accel", "tcg"];
        a.extend_from_slice(args);
        self.ok(&a);
        let vm = self.vm(name);
        assert_eq!(vm["state"], "running", "{vm}");
        self.qemus
            .push((vm["pid"].as_u64().unwrap() as u32, name.to_owned()));
        vm
    }

    /// Requests vbd has answered for `export`: decoded on its NBD
    /// connections, or taken from its vhost-user queues.
    fn requests(&self, export: &str) -> u64 {
        let status: Value = serde_json::from_str(&self.ok(&["status", "--json"])).unwrap();
        let nbd: u64 = status["connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["export"] == export)
            .map(|c| c["requests"].as_u64().unwrap())
            .sum();
        let vhost: u64 = status["exports"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == export)
            .filter_map(|e| e["vhost_user"]["queues"].as_array())
            .flatten()
            .map(|q| q["requests"].as_u64().unwrap())
            .sum();
        nbd + vhost
    }

    /// One sample of the control socket's `/metrics`.
    fn metric(&self, sample: &str) -> f64 {
        let mut s = UnixStream::connect(self.control()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: vbd\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
    }
}

impl Drop for Vbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < VBD_DEADLINE && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // vbd keeps its VMs running on exit: kill those still ours, and
        // only if the pid is still that QEMU.
        for (pid, name) in &self.qemus {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&format!("guest={name},")) {
                // SAFETY: kill(2) on a QEMU this test started, checked above.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s[s.rfind(')')? + 2..].starts_with(|c| c != 'Z')))
        .unwrap_or(false)
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "no {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks fio run `i` on the serial console: exit status 0, nothing on
/// its stderr, and its JSON reports no error, data written, and the
/// verification reads of that data done.
fn check_fio(serial: &str, i: u32) -> Value {
    let serial = serial.replace("\r\n", "\n");
    let begin = format!("VBD-FIOV-BEGIN {i}\n");
    let end = format!("VBD-FIOV-END {i} rc=");
    let Some(at) = serial.find(&begin) else {
        panic!("no {begin:?} on the console:\n{serial}");
    };
    let body = &serial[at + begin.len()..];
    let Some(at) = body.find(&end) else {
        panic!("no {end:?} on the console:\n{serial}");
    };
    let (body, rest) = body.split_at(at);
    let rc = rest[end.len()..].lines().next().unwrap();
    assert_eq!(rc, "0", "fio run {i} failed:\n{body}");
    assert!(
        !body.contains("VBD-FIOV-STDERR"),
        "fio run {i} complained:\n{body}"
    );
    let json: Value = serde_json::from_str(&body[body.find('{').expect("JSON")..])
        .unwrap_or_else(|e| panic!("fio run {i} JSON ({e}):\n{body}"));
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "fio run {i}: {job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let verified = job["read"]["io_bytes"].as_u64().unwrap();
    assert!(written > 0, "fio run {i} wrote nothing: {job}");
    // verify_backlog reads back every block it wrote, 64 writes behind.
    assert!(
        verified > 0 && verified + 64 * 4096 >= written,
        "fio run {i} verified {verified} of {written} bytes: {job}"
    );
    job.clone()
}

/// Restarts vbd while fio run `i` writes and verifies: waits until the
/// run's requests reach vbd, stops vbd with `sig`, starts it again within
/// 2 s of its exit; then checks that VM `g` (QEMU `pid`) is adopted and
/// running, that its boot disk came back, and that fio finished the run
/// without an error. Returns fio's report of the run.
fn restart_under_fio(v: &mut Vbd, serial: &Path, i: u32, sig: i32, pid: u32) -> Value {
    wait_serial(
        serial,
        &format!("VBD-FIOV-BEGIN {i}"),
        Duration::from_secs(300),
    );
    // fio takes a while to start under TCG: wait until its requests
    // reach vbd, so that the restart hits I/O in flight.
    let before = v.requests("disk");
    wait_until("fio's requests", Duration::from_secs(120), || {
        v.requests("disk") >= before + 200
    });
    let signalled = Instant::now();
    let (status, exited) = v.signal(sig);
    if sig == libc::SIGTERM {
        assert!(
            status.success(),
            "vbd exit on SIGTERM: {status}\n{}",
            v.log()
        );
    }
    assert!(exited.elapsed() < Duration::from_secs(2));
    v.spawn();
    let answered = signalled.elapsed();
    // A clean stop drained the object volume's WAL to the store; a kill
    // left it for the new vbd to replay.
    let log = v.log();
    let reopened = log
        .lines()
        .rfind(|l| l.contains("object volume open"))
        .expect("the object volume reopened");
    if sig == libc::SIGTERM {
        assert!(reopened.contains("replayed_segments=0"), "{reopened}");
    }

    let vm = v.vm("g");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["pid"], pid);
    assert!(vm["adopted_at_ms"].is_u64(), "{vm}");
    assert!(alive(pid));
    wait_until("the disk's reconnect", Duration::from_secs(60), || {
        v.vm("g")["disks"][0]["reconnect"]["after_ms"].is_u64()
    });
    let back = v.vm("g")["disks"][0]["reconnect"].clone();
    assert_eq!(back["from_clean_stop"], sig == libc::SIGTERM, "{back}");
    eprintln!(
        "signal {sig}: vbd exited in {:?}, answered again after {answered:?}; disk {back}; {}",
        exited - signalled,
        &reopened[reopened.find("replayed_segments").unwrap_or(0)..]
    );
    let text = wait_serial(
        serial,
        &format!("VBD-FIOV-END {i}"),
        Duration::from_secs(120),
    );
    assert!(
        !text.contains("I/O error"),
        "the guest saw I/O errors:\n{text}"
    );
    let job = check_fio(&text, i);
    // Over vhost-user, what the new vbd took again from QEMU's inflight log
    // (nothing when the restart caught no request in flight).
    let resubmitted: Vec<String> = v
        .log()
        .lines()
        .filter(|l| l.contains("re-submitting requests in flight"))
        .map(|l| l[l.find("queue=").unwrap_or(0)..].to_owned())
        .collect();
    eprintln!(
        "fio run {i}: wrote {} and verified {} bytes, error {}; re-submitted so far: {resubmitted:?}",
        job["write"]["io_bytes"], job["read"]["io_bytes"], job["error"]
    );
    job
}

/// What the status says of the export `disk` after a restart: over
/// vhost-user, QEMU is its device's frontend again with both queues
/// running; over NBD it has no device.
fn check_transport(v: &Vbd, transport: &str) {
    let status: Value = serde_json::from_str(&v.ok(&["status", "--json"])).unwrap();
    let disk = status["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "disk")
        .unwrap_or_else(|| panic!("no export disk: {status}"))
        .clone();
    match transport {
        "vhost-user" => {
            let dev = &disk["vhost_user"];
            assert_eq!(dev["attached"], true, "{disk}");
            assert_eq!(dev["queues_running"], 2, "one queue per vCPU: {disk}");
        }
        _ => assert!(disk.get("vhost_user").is_none(), "{disk}"),
    }
}

#[test]
fn guest_io_survives_vbd_restarts_over_vhost_user_and_the_adopted_vm_hotplugs() {
    // Shorter fio runs: what matters is that each restart hits I/O in flight.
    restarts_under_fio("vhost-user", 8);
}

#[test]
fn guest_io_survives_vbd_restarts_over_nbd_and_the_adopted_vm_hotplugs() {
    restarts_under_fio("nbd", 12);
}

/// The restart scenario with the VM's disks on `transport`: fio verifies
/// the boot disk across a SIGTERM and a SIGKILL of vbd (each run for
/// `fio_secs`), then the disk hot-attached before both is detached and
/// attached again.
fn restarts_under_fio(transport: &str, fio_secs: u32) {
    let _one = vm_common::one_guest();
    let dir = TempDir::new("restart");
    let d = dir.path();
    let store = format!("file://{}", d.join("store").display());
    let exports = vec![format!(
        "name=disk,backend=object,store={store},volume=disk,size=128M"
    )];
    let mut v = Vbd::start(d, &exports);
    // A catalogued file volume, hot-attached before the restarts: the
    // next vbd must reopen it from the VM's run record.
    v.ok(&[
        "vm",
        "volume",
        "create",
        "extra",
        "--backend",
        "file",
        "--path",
        d.join("extra.img").to_str().unwrap(),
        "--size",
        "32M",
    ]);

    let (kernel, initrd) = test_guest(&["--fio"], "initrd-fio.img");
    let t = tag("RESTART");
    let append = format!(
        "console=ttyS0 quiet panic=-1 vbd.mode=fio-verify vbd.fio_runs=2 \
         vbd.fio_size=48M vbd.fio_runtime={fio_secs} vbd.pattern={t}"
    );
    let vm = v.run_vm(
        "g",
        &[
            "--vcpus",
            "2",
            "--memory",
            "256M",
            "--volume",
            "disk:boot",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            &append,
            "--disk-transport",
            transport,
        ],
    );
    let pid = vm["pid"].as_u64().unwrap() as u32;
    let serial = PathBuf::from(vm["serial_log"].as_str().unwrap());
    v.ok(&["vm", "attach", "g", "extra"]);

    // SIGTERM: vbd finishes what is in flight, drains and exits 0; QEMU
    // runs on and its disk waits.
    restart_under_fio(&mut v, &serial, 1, libc::SIGTERM, pid);
    check_transport(&v, transport);
    // SIGKILL: nothing is finished or drained; the WAL is replayed. Over
    // vhost-user, QEMU re-submits the requests vbd had taken from the
    // rings but not answered, from the inflight log they share.
    restart_under_fio(&mut v, &serial, 2, libc::SIGKILL, pid);
    check_transport(&v, transport);

    // The disk hot-attached before both restarts is still on its port, and
    // its volume (reopened from the record) takes the guest's writes.
    let extra = v.vm("g")["disks"][1].clone();
    assert_eq!(
        (extra["volume"].as_str(), extra["port"].as_str()),
        (Some("extra"), Some("hp0")),
        "{extra}"
    );
    wait_serial(&serial, "VBD-WROTE-VDB", Duration::from_secs(120));
    v.ok(&["vm", "detach", "g", "extra", "--wait", "60"]);
    wait_serial(&serial, "VBD-VDB-GONE", Duration::from_secs(60));
    v.ok(&["vm", "attach", "g", "extra"]);
    wait_serial(&serial, "VBD-VDB-BACK-OK", Duration::from_secs(120));
    let block = v.run(&[
        "vm", "volume", "read", "extra", "--offset", "1M", "--length", "4096",
    ]);
    assert_eq!(block.stdout, guest_pattern(&format!("{t}-vdb"), 4096));
    let status = v.ok(&["status"]);
    assert!(status.contains("running, adopted"), "{status}");
    assert_eq!(v.metric("vbd_vm_adoptions_total{result=\"adopted\"}"), 1.0);
    assert_eq!(
        v.metric("vbd_vm_hotplug_total{op=\"attach\",result=\"ok\"}"),
        1.0
    );

    let out = v.ok(&["vm", "stop", "g", "--grace", "60"]);
    assert!(out.contains("powerdown"), "{out}");
    wait_until("QEMU's exit", Duration::from_secs(30), || !alive(pid));
    assert!(!d.join("vm/g/vm.json").exists());
    let (status, _) = v.signal(libc::SIGTERM);
    assert!(status.success());
}

#[test]
fn qemus_gone_while_vbd_was_down_are_reported_and_cleaned_up() {
    let _one = vm_common::one_guest();
    let dir = TempDir::new("gone");
    let d = dir.path();
    let exports = vec![
        format!(
            "name=a,backend=file,path={},size=16M",
            d.join("a.img").display()
        ),
        format!(
            "name=b,backend=file,path={},size=16M",
            d.join("b.img").display()
        ),
    ];
    let mut v = Vbd::start(d, &exports);
    let bare = ["--vcpus", "1", "--memory", "64M", "--hotplug-ports", "0"];
    let mut args_a = bare.to_vec();
    args_a.extend(["--volume", "a"]);
    let mut args_b = bare.to_vec();
    args_b.extend(["--volume", "b"]);
    let a = v.run_vm("va", &args_a);
    let b = v.run_vm("vb", &args_b);
    let (status, _) = v.signal(libc::SIGTERM);
    assert!(status.success(), "{status}");

    // While vbd is down: va's QEMU dies; vb's dies too and its pid is
    // written into its pidfile as if another process had taken it over.
    let pid = |vm: &Value| vm["pid"].as_u64().unwrap() as u32;
    for vm in [&a, &b] {
        assert!(alive(pid(vm)), "QEMU left running: {vm}");
        // SAFETY: kill(2) on the QEMU this test started, alive just above.
        assert_eq!(unsafe { libc::kill(pid(vm) as i32, libc::SIGKILL) }, 0);
    }
    wait_until("the QEMUs to die", Duration::from_secs(30), || {
        !alive(pid(&a)) && !alive(pid(&b))
    });
    let mut sleeper = Command::new("sleep").arg("300").spawn().unwrap();
    let run = d.join("vm");
    std::fs::write(run.join("vb/qemu.pid"), format!("{}\n", sleeper.id())).unwrap();

    v.spawn();
    let va = v.vm("va");
    assert_eq!(va["state"], "crashed", "{va}");
    let reason = va["reason"].as_str().unwrap();
    assert!(
        reason.contains("exited while vbd was away") && reason.contains("exit status unknown"),
        "{reason}"
    );
    let vb = v.vm("vb");
    assert_eq!(vb["state"], "crashed", "{vb}");
    let reason = vb["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "pid {} now belongs to another process",
            sleeper.id()
        )),
        "{reason}"
    );
    for name in ["va", "vb"] {
        for f in ["qmp.sock", "qemu.pid", "vm.json"] {
            assert!(!run.join(name).join(f).exists(), "{name}/{f} left behind");
        }
    }
    assert_eq!(v.metric("vbd_vm_adoptions_total{result=\"exited\"}"), 1.0);
    assert_eq!(
        v.metric("vbd_vm_adoptions_total{result=\"pid_reused\"}"),
        1.0
    );
    assert!(v.log().contains("exited while vbd was away"), "{}", v.log());

    // Clearing the records signals nothing; the sleeper lives on.
    for name in ["va", "vb"] {
        let out = v.ok(&["vm", "stop", name]);
        assert!(out.contains("already-exited"), "{out}");
    }
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the sleeper was hurt"
    );
    assert!(alive(sleeper.id()));
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    // The volumes are free for a new VM of the same name.
    let mut again = args_a.clone();
    again.extend(["--volume", "b:data"]);
    v.run_vm("va", &again);
    v.ok(&["vm", "stop", "va", "--grace", "1"]);
}
