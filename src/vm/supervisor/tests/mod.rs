//! The supervisor's bookkeeping against a stand-in QEMU (a shell script
//! for the process, the fake monitor for QMP) and an in-memory
//! [`VolumeHost`]: which exports a VM starts and releases, how its state
//! moves, how a stop escalates, and what a failed start, attach or detach
//! leaves behind (nothing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::vm::config::VhostSocket;
use crate::vm::config::{Accel, Disk, Role, VmConfig};
use crate::vm::hotplug::HotplugError;
use crate::vm::testing::{BAD_DEVICE, Behaviour, FakeQemu, PATIENCE, Scratch, eventually};
use crate::vm::volume_host::{ExportError, VhostServed};

mod adopt;
mod vhost;

/// Volumes and exports in memory, with the registry's rules: one export
/// per name, and only volumes that exist can be exported. A volume is
/// "catalogued" (reopened by name after a restart), a static export
/// (served again by the command line), or in memory (lost).
#[derive(Default)]
struct FakeHost {
    /// Volumes this vbd process knows.
    volumes: Mutex<BTreeSet<String>>,
    /// Volumes whose data would end with the process.
    memory: BTreeSet<String>,
    /// Volumes in storage that another process could open again.
    stored: BTreeSet<String>,
    /// Exports started by vbd's command line (not by the supervisor).
    static_exports: BTreeSet<String>,
    /// Export name → read-only.
    exports: Mutex<BTreeMap<String, bool>>,
    /// Volumes whose export the "server" refuses.
    refuse: Mutex<BTreeSet<String>>,
    /// Exports a client (QEMU) is attached to.
    attached: Mutex<BTreeSet<String>>,
    /// Queues its vhost-user devices offer; `None`: it has no vhost-user.
    vhost_queues: Option<u16>,
    /// Running vhost-user devices: volume → socket.
    devices: Mutex<BTreeMap<String, PathBuf>>,
}

/// How [`FakeHost`] describes a catalogued volume for a restart.
fn reopen_spec(volume: &str) -> serde_json::Value {
    serde_json::json!({ "volume": volume })
}

impl FakeHost {
    /// `volumes` exist (in storage); `exported` are served by the command line.
    fn stored(volumes: &[&str], exported: &[&str]) -> FakeHost {
        let names = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|v| v.to_string()).collect() };
        FakeHost {
            volumes: Mutex::new(names(volumes)),
            stored: names(volumes),
            static_exports: names(exported),
            exports: Mutex::new(exported.iter().map(|v| (v.to_string(), false)).collect()),
            ..FakeHost::default()
        }
    }

    fn exports(&self) -> BTreeMap<String, bool> {
        self.exports.locked().clone()
    }

    fn names(&self) -> Vec<String> {
        self.exports().into_keys().collect()
    }
}

impl VolumeHost for FakeHost {
    fn is_exported(&self, volume: &str) -> bool {
        self.exports.locked().contains_key(volume)
    }

    fn export(&self, volume: &str, read_only: bool) -> Result<(), ExportError> {
        if !self.volumes.locked().contains(volume) {
            return Err(ExportError::NoVolume(volume.to_owned()));
        }
        let refused = self.refuse.locked().contains(volume);
        let mut exports = self.exports.locked();
        if refused || exports.contains_key(volume) {
            return Err(ExportError::Add {
                volume: volume.to_owned(),
                source: std::io::Error::other("the test server refuses it").into(),
            });
        }
        exports.insert(volume.to_owned(), read_only);
        Ok(())
    }

    fn restart(&self, volume: &str) -> Restart {
        if self.memory.contains(volume) {
            Restart::Lost
        } else if self.static_exports.contains(volume) {
            Restart::CommandLine
        } else {
            Restart::Reopen(reopen_spec(volume))
        }
    }

    fn reopen(&self, volume: &str, spec: &serde_json::Value) -> Result<(), ExportError> {
        if *spec == reopen_spec(volume) && self.stored.contains(volume) {
            self.volumes.locked().insert(volume.to_owned());
            return Ok(());
        }
        Err(ExportError::Reopen {
            volume: volume.to_owned(),
            source: std::io::Error::other("not in the test's storage").into(),
        })
    }

    fn connections(&self, volume: &str) -> u64 {
        u64::from(self.attached.locked().contains(volume))
    }

    fn serve_vhost(&self, volume: &str, socket: &Path) -> Result<Option<VhostServed>, ExportError> {
        let Some(queues) = self.vhost_queues else {
            return Ok(None);
        };
        if let Some(socket) = self.devices.locked().get(volume) {
            return Ok(Some(VhostServed {
                socket: VhostSocket {
                    socket: socket.clone(),
                    queues,
                },
                started: false,
            }));
        }
        if !self.exports.locked().contains_key(volume) {
            return Err(ExportError::Vhost {
                volume: volume.to_owned(),
                source: "not exported".into(),
            });
        }
        self.devices
            .locked()
            .insert(volume.to_owned(), socket.to_path_buf());
        Ok(Some(VhostServed {
            socket: VhostSocket {
                socket: socket.to_path_buf(),
                queues,
            },
            started: true,
        }))
    }

    fn stop_vhost(&self, volume: &str) -> Result<(), ExportError> {
        match self.devices.locked().remove(volume) {
            Some(_) => Ok(()),
            None => Err(ExportError::Vhost {
                volume: volume.to_owned(),
                source: "no device".into(),
            }),
        }
    }

    fn unexport(&self, volume: &str) -> Result<(), ExportError> {
        match self.exports.locked().remove(volume) {
            Some(_) => Ok(()),
            None => Err(ExportError::Remove {
                volume: volume.to_owned(),
                source: std::io::Error::other("no such export").into(),
            }),
        }
    }
}

/// A supervisor over a fake host, with run files in a scratch directory.
struct Bench {
    sup: Arc<Supervisor>,
    host: Arc<FakeHost>,
    run: Arc<Scratch>,
}

/// How long QEMU gets after SIGTERM in these tests.
const SIGTERM_WAIT: Duration = Duration::from_millis(300);

impl Bench {
    /// `volumes` exist; `exported` of them are already served by someone else.
    fn new(volumes: &[&str], exported: &[&str]) -> Bench {
        Bench::with_start_timeout(volumes, exported, PATIENCE)
    }

    fn with_start_timeout(volumes: &[&str], exported: &[&str], timeout: Duration) -> Bench {
        let host = FakeHost::stored(volumes, exported);
        Bench::on(Arc::new(Scratch::new("supervisor")), host, timeout)
    }

    /// A supervisor over `host` with its run files in `run`.
    fn on(run: Arc<Scratch>, host: FakeHost, start_timeout: Duration) -> Bench {
        let mut cfg = SupervisorConfig::new(run.0.join("nbd.sock"), run.0.clone());
        cfg.start_timeout = start_timeout;
        cfg.qmp_timeout = PATIENCE;
        cfg.sigterm_wait = SIGTERM_WAIT;
        let host = Arc::new(host);
        let sup = Supervisor::new(cfg, host.clone());
        Bench { sup, host, run }
    }

    /// A VM with two hot-plug ports whose QEMU is `qemu`.
    fn config(&self, name: &str, disks: Vec<Disk>, qemu: &FakeQemu) -> VmConfig {
        let mut cfg = VmConfig::new(name, 2, 64, disks);
        cfg.accel = Accel::Tcg;
        cfg.hotplug_ports = 2;
        cfg.qemu = qemu.binary.clone();
        cfg
    }

    /// Starts `name` on a stand-in QEMU that behaves as told.
    async fn start(
        &self,
        name: &str,
        disks: Vec<Disk>,
        behaviour: Behaviour,
    ) -> (FakeQemu, Result<VmInfo, SupervisorError>) {
        let qemu = FakeQemu::new(behaviour);
        qemu.serve(self.run.0.join(name).join("qmp.sock"));
        let r = self.sup.start(self.config(name, disks, &qemu)).await;
        (qemu, r)
    }

    /// Starts `name`, which must come up.
    async fn running(&self, name: &str, disks: Vec<Disk>) -> FakeQemu {
        let (qemu, r) = self.start(name, disks, Behaviour::Runs).await;
        let info = r.expect("VM starts");
        assert_eq!(info.state, VmState::Running);
        qemu
    }

    fn info(&self, name: &str) -> Option<VmInfo> {
        self.sup.list().into_iter().find(|v| v.name == name)
    }

    fn state(&self, name: &str) -> Option<VmState> {
        self.info(name).map(|v| v.state)
    }

    /// Hot-plugged disks of `name`, as `volume@port`.
    fn hot_disks(&self, name: &str) -> Vec<String> {
        let info = self.info(name).expect("VM listed");
        info.disks
            .into_iter()
            .filter_map(|d| Some(format!("{}@{}", d.volume, d.port?)))
            .collect()
    }
}

fn boot(name: &str) -> Disk {
    Disk::export(name, Role::Boot)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_exports_its_free_disks_and_a_guest_shutdown_releases_only_those() {
    let b = Bench::new(&["root", "seed", "shared"], &["shared"]);
    let qemu = b
        .running(
            "vm1",
            vec![
                boot("root"),
                Disk::export("seed", Role::CloudInit),
                Disk::export("shared", Role::Data),
            ],
        )
        .await;
    // Cloud-init is exported read-only; "shared" was someone else's.
    let want: BTreeMap<String, bool> = [("root", false), ("seed", true), ("shared", false)]
        .map(|(v, ro)| (v.to_string(), ro))
        .into();
    assert_eq!(b.host.exports(), want);
    assert_eq!(b.sup.user_of("shared").as_deref(), Some("vm1"));
    let qmp_socket = b.info("vm1").unwrap().qmp_socket;
    assert!(qmp_socket.exists());
    let (_, again) = b.start("vm1", vec![], Behaviour::Runs).await;
    assert!(matches!(again, Err(SupervisorError::Exists(n)) if n == "vm1"));

    qemu.exit(0);
    let stopped = VmState::Stopped {
        reason: "guest shut down".into(),
    };
    eventually("the guest shutdown", || {
        b.state("vm1") == Some(stopped.clone())
    })
    .await;
    assert_eq!(b.host.names(), ["shared"]);
    assert!(!qmp_socket.exists());
    assert_eq!(b.sup.user_of("root"), None);
    let e = b.sup.events();
    assert_eq!((e.starts, e.start_failures), (1, 1));
    assert_eq!((e.guest_shutdowns, e.crashes), (1, 0));

    // Stopping an exited VM only clears its record.
    let outcome = b.sup.stop("vm1", PATIENCE).await.unwrap();
    assert_eq!(outcome, StopOutcome::AlreadyExited);
    assert!(b.sup.list().is_empty());
    assert_eq!(b.sup.events().powerdowns, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_told_apart_and_frees_its_volumes() {
    let b = Bench::new(&["root"], &[]);
    let qemu = b.running("vm1", vec![boot("root")]).await;
    qemu.exit(3);
    let crashed = VmState::Crashed {
        reason: "QEMU exit status 3".into(),
    };
    eventually("the crash", || b.state("vm1") == Some(crashed.clone())).await;
    assert!(b.host.names().is_empty());
    assert_eq!(b.sup.events().crashes, 1);
    // The crashed VM's record stays for the operator, but not its volumes.
    let _q2 = b.running("vm2", vec![boot("root")]).await;
    assert_eq!(b.sup.user_of("root").as_deref(), Some("vm2"));
    assert_eq!(b.sup.list().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_escalates_from_powerdown_to_sigterm_to_sigkill() {
    let b = Bench::new(&["a", "b", "c", "d"], &[]);
    let grace = Duration::from_millis(200);
    let stop = |name: &'static str, grace| {
        let sup = b.sup.clone();
        async move {
            let t = Instant::now();
            let outcome = sup.stop(name, grace).await.expect("stop");
            (outcome, t.elapsed())
        }
    };

    // The guest powers off when asked.
    let q = b.running("vm-a", vec![boot("a")]).await;
    let (outcome, _) = stop("vm-a", PATIENCE).await;
    assert_eq!(outcome, StopOutcome::Powerdown);
    assert_eq!(q.monitor.locked().take_log(), ["system_powerdown"]);

    // The guest ignores the button: SIGTERM after the grace period.
    let q = b.running("vm-b", vec![boot("b")]).await;
    q.monitor.locked().guest_powers_off = false;
    let (outcome, took) = stop("vm-b", grace).await;
    assert_eq!(outcome, StopOutcome::Sigterm);
    assert!(took >= grace, "{took:?}");

    // QEMU ignores SIGTERM too: SIGKILL after sigterm_wait.
    let q = b
        .start("vm-c", vec![boot("c")], Behaviour::IgnoresSigterm)
        .await
        .0;
    q.monitor.locked().guest_powers_off = false;
    let (outcome, took) = stop("vm-c", grace).await;
    assert_eq!(outcome, StopOutcome::Sigkill);
    assert!(took >= grace + SIGTERM_WAIT, "{took:?}");

    // QMP refuses the button: straight to SIGTERM, no grace period.
    let q = b.running("vm-d", vec![boot("d")]).await;
    q.monitor.locked().refuse.insert("system_powerdown");
    let (outcome, took) = stop("vm-d", PATIENCE).await;
    assert_eq!(outcome, StopOutcome::Sigterm);
    assert!(took < PATIENCE / 2, "{took:?}");

    assert!(b.sup.list().is_empty());
    assert!(b.host.names().is_empty());
    let e = b.sup.events();
    assert_eq!((e.powerdowns, e.sigterms, e.sigkills), (1, 2, 1));
    assert_eq!((e.guest_shutdowns, e.crashes), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_vm_refuses_hotplug_and_holds_its_disks_until_it_exits() {
    let b = Bench::new(&["root", "data"], &[]);
    let q = b.running("vm1", vec![boot("root")]).await;
    q.monitor.locked().guest_powers_off = false;
    let sup = b.sup.clone();
    let stopping = tokio::spawn(async move { sup.stop("vm1", PATIENCE).await });
    eventually("the stop to begin", || {
        b.state("vm1") == Some(VmState::Stopping)
    })
    .await;

    let err = b.sup.attach("vm1", "data", false).await.unwrap_err();
    assert!(matches!(err, SupervisorError::NotRunning(_)), "{err}");
    let (q2, r) = b.start("vm2", vec![boot("root")], Behaviour::Runs).await;
    assert!(
        matches!(&r, Err(SupervisorError::VolumeInUse { vm, .. }) if vm == "vm1"),
        "{r:?}"
    );
    assert!(!q2.started(), "QEMU ran for a VM whose disk is taken");
    assert_eq!(b.host.names(), ["root"]);

    // The guest finishes powering off within the grace period.
    q.exit(0);
    let outcome = stopping.await.unwrap().unwrap();
    assert_eq!(outcome, StopOutcome::Powerdown);
    assert_eq!(b.state("vm1"), None);
    assert!(b.host.names().is_empty());
}

fn start_error(r: Result<VmInfo, SupervisorError>) -> (String, String) {
    match r {
        Err(SupervisorError::Start {
            reason, log_tail, ..
        }) => (reason, log_tail),
        other => panic!("not a start failure: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_leave_no_export_socket_or_record() {
    let b = Bench::new(&["root", "data"], &[]);
    let qmp_socket = b.run.0.join("vm1").join("qmp.sock");

    // QEMU rejects its command line: its words reach the error.
    let (_, r) = b
        .start("vm1", vec![boot("root")], Behaviour::FailsAtOnce)
        .await;
    let (reason, tail) = start_error(r);
    assert_eq!(reason, "QEMU exited at once (exit status 1)");
    assert_eq!(tail, BAD_DEVICE);

    // A missing volume fails before QEMU runs; the export started for the
    // disk before it is removed again.
    let (q, r) = b
        .start(
            "vm1",
            vec![boot("root"), Disk::export("nope", Role::Data)],
            Behaviour::Runs,
        )
        .await;
    assert!(
        matches!(&r, Err(SupervisorError::NoVolume(v)) if v == "nope"),
        "{r:?}"
    );
    assert!(!q.started());

    // The server refuses an export: the cause is named once.
    b.host.refuse.locked().insert("data".into());
    let (_, r) = b
        .start(
            "vm1",
            vec![boot("root"), Disk::export("data", Role::Data)],
            Behaviour::Runs,
        )
        .await;
    let err = r.unwrap_err();
    assert!(matches!(err, SupervisorError::Export(_)), "{err}");
    assert_eq!(
        Chain(&err).to_string(),
        "cannot export volume \"data\": the test server refuses it"
    );

    // A config QEMU cannot take.
    let (_, r) = b.start("1bad", vec![boot("root")], Behaviour::Runs).await;
    assert!(matches!(r, Err(SupervisorError::Config(_))), "{r:?}");

    assert!(b.host.names().is_empty());
    assert!(b.sup.list().is_empty());
    assert!(!qmp_socket.exists());
    assert_eq!(b.sup.events().start_failures, 4);
    assert_eq!(b.sup.events().starts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_without_qmp_is_killed_after_the_start_timeout() {
    let b = Bench::with_start_timeout(&["root"], &[], Duration::from_millis(300));
    let (q, r) = b
        .start("vm1", vec![boot("root")], Behaviour::NoMonitor)
        .await;
    assert_eq!(start_error(r).0, "no QMP socket after 300ms");
    let pid = q.pid().expect("the fake QEMU ran");
    // SAFETY: kill(2) with signal 0 only checks that the pid exists.
    let gone = || unsafe { libc::kill(pid, 0) } == -1;
    eventually("QEMU to be killed and reaped", gone).await;
    assert!(b.host.names().is_empty());
    assert!(b.sup.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_takes_a_free_port_and_removes_its_export_when_qemu_refuses() {
    let b = Bench::new(&["root", "data", "more", "extra"], &[]);
    let q = b.running("vm1", vec![boot("root")]).await;
    q.monitor.locked().take_log();

    let err = b.sup.attach("vm1", "root", false).await.unwrap_err();
    assert!(matches!(err, SupervisorError::VolumeInUse { .. }), "{err}");
    let err = b.sup.attach("vm1", "9lives", false).await.unwrap_err();
    assert!(matches!(err, SupervisorError::BadVolumeName(_)), "{err}");
    let err = b.sup.attach("vm1", "ghost", false).await.unwrap_err();
    assert!(matches!(err, SupervisorError::NoVolume(_)), "{err}");
    let err = b.sup.attach("vm2", "data", false).await.unwrap_err();
    assert!(matches!(err, SupervisorError::NoVm(_)), "{err}");
    assert!(q.monitor.locked().take_log().is_empty(), "QMP used in vain");

    // QEMU refuses the device: the rollback runs and the export goes.
    q.monitor.locked().refuse.insert("device_add");
    let err = b.sup.attach("vm1", "data", true).await.unwrap_err();
    assert!(
        matches!(&err, SupervisorError::Hotplug(HotplugError::Attach { step, .. }) if *step == "device_add virtio-blk-pci"),
        "{err}"
    );
    assert_eq!(b.host.names(), ["root"]);
    assert!(b.hot_disks("vm1").is_empty());
    assert!(q.monitor.locked().is_bare());
    assert_eq!(b.sup.user_of("data"), None);

    // Accepted now, on the first port, which that failure did not keep.
    q.monitor.locked().refuse.clear();
    let disk = b.sup.attach("vm1", "data", true).await.unwrap();
    assert_eq!(disk.port.as_deref(), Some("hp0"));
    assert_eq!(b.host.exports().get("data"), Some(&true));
    b.sup.attach("vm1", "more", false).await.unwrap();
    assert_eq!(b.hot_disks("vm1"), ["data@hp0", "more@hp1"]);
    let err = b.sup.attach("vm1", "extra", false).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::NoFreePort { ports: 2, .. }),
        "{err}"
    );
    assert_eq!(b.sup.user_of("data").as_deref(), Some("vm1"));
    let e = b.sup.events();
    assert_eq!((e.attaches, e.attach_failures), (2, 6));

    // When the VM exits, the hot-plugged disks' exports go with it.
    q.exit(0);
    eventually("the exit", || b.host.names().is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_keeps_the_disk_until_the_guest_lets_go() {
    let b = Bench::new(&["root", "data", "shared"], &["shared"]);
    let q = b.running("vm1", vec![boot("root")]).await;
    b.sup.attach("vm1", "data", false).await.unwrap();
    b.sup.attach("vm1", "shared", false).await.unwrap();

    let wait = Duration::from_millis(100);
    let err = b.sup.detach("vm1", "root", wait).await.unwrap_err();
    assert!(matches!(err, SupervisorError::ColdAttached { .. }), "{err}");
    let err = b.sup.detach("vm1", "nope", wait).await.unwrap_err();
    assert!(matches!(err, SupervisorError::NotAttached { .. }), "{err}");

    // The guest does not let go in time: the disk stays, export and all.
    q.monitor.locked().guest_unplugs = false;
    let err = b.sup.detach("vm1", "data", wait).await.unwrap_err();
    assert!(
        matches!(
            err,
            SupervisorError::Hotplug(HotplugError::UnplugTimeout { .. })
        ),
        "{err}"
    );
    assert_eq!(b.hot_disks("vm1"), ["data@hp0", "shared@hp1"]);
    assert_eq!(b.host.names(), ["data", "root", "shared"]);

    // It does on the retry.
    q.monitor.locked().guest_unplugs = true;
    b.sup.detach("vm1", "data", PATIENCE).await.unwrap();
    assert_eq!(b.hot_disks("vm1"), ["shared@hp1"]);
    assert_eq!(b.host.names(), ["root", "shared"]);
    // An export someone else started outlives the detach.
    b.sup.detach("vm1", "shared", PATIENCE).await.unwrap();
    assert_eq!(b.host.names(), ["root", "shared"]);
    assert!(q.monitor.locked().devices.is_empty());

    // The freed port is the first one offered again.
    let disk = b.sup.attach("vm1", "data", false).await.unwrap();
    assert_eq!(disk.port.as_deref(), Some("hp0"));
    let e = b.sup.events();
    assert_eq!((e.detaches, e.detach_failures), (2, 3));

    let outcome = b.sup.stop("vm1", PATIENCE).await.unwrap();
    assert_eq!(outcome, StopOutcome::Powerdown);
    assert_eq!(b.host.names(), ["shared"]);
}
