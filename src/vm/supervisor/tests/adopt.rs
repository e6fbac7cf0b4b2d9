//! VMs that outlive the supervisor: one supervisor lets go of its VMs as
//! vbd does with `--vms-on-exit keep`, a second one over the same run
//! directory (the next vbd) adopts them. The stand-in QEMU keeps running
//! between the two, as a real one would.

use super::*;
use crate::vm::supervisor::record::VmRecord;

impl Bench {
    /// The next vbd: a new supervisor and host over the same run
    /// directory, knowing `known` volumes and serving `exported` from its
    /// command line; the same storage to reopen volumes from.
    fn restarted(&self, known: &[&str], exported: &[&str]) -> Bench {
        let names = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|v| v.to_string()).collect() };
        let host = FakeHost {
            volumes: Mutex::new(names(known)),
            memory: self.host.memory.clone(),
            stored: self.host.stored.clone(),
            static_exports: names(exported),
            exports: Mutex::new(exported.iter().map(|v| (v.to_string(), false)).collect()),
            vhost_queues: self.host.vhost_queues,
            ..FakeHost::default()
        };
        Bench::on(self.run.clone(), host, PATIENCE)
    }

    fn record(&self, name: &str) -> Option<VmRecord> {
        VmRecord::load(&VmRecord::path(&self.run.0.join(name))).ok()
    }

    fn disk(&self, vm: &str, volume: &str) -> DiskInfo {
        let info = self.info(vm).expect("VM listed");
        info.disks
            .into_iter()
            .find(|d| d.volume == volume)
            .expect("disk listed")
    }
}

/// Whether `pid` exists (as a process or a zombie).
fn exists(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the pid exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_vm_is_adopted_with_its_hot_disks_and_supervised_as_before() {
    let a = Bench::new(&["root", "data"], &[]);
    let q = a.running("vm1", vec![boot("root")]).await;
    a.sup.attach("vm1", "data", true).await.unwrap();
    let pid = q.pid().unwrap();
    let before = a.info("vm1").unwrap();

    a.sup.release_all(PATIENCE).await;
    let record = a.record("vm1").expect("run record left for the next vbd");
    assert!(record.released_at_ms.is_some());
    assert_eq!(record.hot["data"].port, "hp0");
    assert!(exists(pid), "QEMU left running");

    // The next vbd knows no volume yet: it reopens them from the record.
    let b = a.restarted(&[], &[]);
    b.host.attached.locked().insert("root".into());
    assert_eq!(b.sup.adopt_all().await, 1);
    let info = b.info("vm1").unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.pid, before.pid);
    assert_eq!(info.started_at_ms, before.started_at_ms);
    assert!(info.adopted_at_ms.is_some());
    assert_eq!(b.hot_disks("vm1"), ["data@hp0"]);
    let want: BTreeMap<String, bool> = [("data", true), ("root", false)]
        .map(|(v, ro)| (v.to_string(), ro))
        .into();
    assert_eq!(
        b.host.exports(),
        want,
        "exports served again, read-only kept"
    );
    assert_eq!(b.sup.user_of("data").as_deref(), Some("vm1"));

    // QEMU is back on root; data still waits for the guest to use it.
    eventually("root's reconnect", || {
        b.disk("vm1", "root")
            .reconnect
            .is_some_and(|r| r.after_ms.is_some())
    })
    .await;
    let root = b.disk("vm1", "root").reconnect.unwrap();
    assert!(root.from_clean_stop && root.error.is_none(), "{root:?}");
    let data = b.disk("vm1", "data").reconnect.unwrap();
    assert_eq!(data.after_ms, None);
    let e = b.sup.events();
    assert_eq!((e.adoptions, e.disk_reconnects), (1, 1));
    assert_eq!(e.starts, 0);

    // Hot-plug works on the adopted VM, over the new QMP session.
    q.monitor.locked().take_log();
    b.sup.detach("vm1", "data", PATIENCE).await.unwrap();
    b.sup.attach("vm1", "data", false).await.unwrap();
    assert_eq!(
        q.monitor.locked().take_log(),
        [
            "device_del disk-data",
            "blockdev-del vol-data",
            "object-del ioth-data",
            "object-add ioth-data",
            "blockdev-add vol-data",
            "device_add disk-data"
        ]
    );
    assert!(!b.record("vm1").unwrap().hot["data"].read_only);

    // A stop ends it as on a VM this supervisor started.
    let outcome = b.sup.stop("vm1", PATIENCE).await.unwrap();
    assert_eq!(outcome, StopOutcome::Powerdown);
    assert!(b.sup.list().is_empty());
    assert!(b.host.names().is_empty());
    assert!(b.record("vm1").is_none(), "run record removed");
    eventually("QEMU to be gone", || !exists(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_qemu_that_dies_is_a_crash_with_an_unknown_status() {
    let a = Bench::new(&["root"], &[]);
    let q = a.running("vm1", vec![boot("root")]).await;
    a.sup.release_all(PATIENCE).await;
    let b = a.restarted(&[], &[]);
    assert_eq!(b.sup.adopt_all().await, 1);

    q.exit(3);
    eventually("the crash", || {
        matches!(b.state("vm1"), Some(VmState::Crashed { .. }))
    })
    .await;
    let Some(VmState::Crashed { reason }) = b.state("vm1") else {
        unreachable!()
    };
    assert!(
        reason.contains("without shutting down") && reason.contains("exit status unknown"),
        "{reason}"
    );
    assert!(b.host.names().is_empty());
    assert!(b.record("vm1").is_none());
    assert_eq!(b.sup.events().crashes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_died_while_vbd_was_away_is_reported_crashed_and_cleaned_up() {
    let a = Bench::new(&["root"], &[]);
    let q = a.running("vm1", vec![boot("root")]).await;
    let qmp_socket = a.info("vm1").unwrap().qmp_socket;
    a.sup.release_all(PATIENCE).await;
    let pid = q.pid().unwrap();
    q.exit(3);
    eventually("QEMU to exit", || !exists(pid)).await;

    let b = a.restarted(&["root"], &[]);
    assert_eq!(b.sup.adopt_all().await, 0);
    let Some(VmState::Crashed { reason }) = b.state("vm1") else {
        panic!("not crashed: {:?}", b.info("vm1"));
    };
    assert!(
        reason.contains("exited while vbd was away") && reason.contains("exit status unknown"),
        "{reason}"
    );
    assert!(b.record("vm1").is_none(), "run record removed");
    assert!(!qmp_socket.exists(), "QMP socket removed");
    assert!(b.host.names().is_empty(), "nothing exported for it");
    let e = b.sup.events();
    assert_eq!((e.adoptions, e.adoptions_exited, e.crashes), (0, 1, 1));
    // The name is free again once the record is cleared.
    let outcome = b.sup.stop("vm1", PATIENCE).await.unwrap();
    assert_eq!(outcome, StopOutcome::AlreadyExited);
    let _q2 = b.running("vm1", vec![boot("root")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_that_another_process_took_is_neither_adopted_nor_signalled() {
    let a = Bench::new(&["root"], &[]);
    let q = a.running("vm1", vec![boot("root")]).await;
    a.sup.release_all(PATIENCE).await;
    let pid = q.pid().unwrap();
    q.exit(0);
    eventually("QEMU to exit", || !exists(pid)).await;
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pidfile = a.record("vm1").unwrap().paths.pidfile;
    std::fs::write(&pidfile, format!("{}\n", sleeper.id())).unwrap();

    let b = a.restarted(&["root"], &[]);
    assert_eq!(b.sup.adopt_all().await, 0);
    let Some(VmState::Crashed { reason }) = b.state("vm1") else {
        panic!("not crashed: {:?}", b.info("vm1"));
    };
    assert!(
        reason.contains(&format!(
            "pid {} now belongs to another process",
            sleeper.id()
        )) && reason.contains("sleep"),
        "{reason}"
    );
    assert_eq!(b.sup.events().adoptions_pid_reused, 1);
    assert!(!pidfile.exists());
    // A stop of the record signals nothing.
    b.sup.stop("vm1", PATIENCE).await.unwrap();
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the sleeper was hurt"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_stops_memory_vms_and_a_missing_static_export_is_named() {
    let names = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|v| v.to_string()).collect() };
    let host = FakeHost {
        volumes: Mutex::new(names(&["root", "shared", "scratch"])),
        memory: names(&["scratch"]),
        stored: names(&["root"]),
        static_exports: names(&["shared"]),
        exports: Mutex::new([("shared".to_string(), false)].into()),
        ..FakeHost::default()
    };
    let a = Bench::on(Arc::new(Scratch::new("supervisor")), host, PATIENCE);
    let _q1 = a
        .running(
            "vm1",
            vec![boot("root"), Disk::export("shared", Role::Data)],
        )
        .await;
    let _q2 = a.running("vm2", vec![boot("scratch")]).await;
    a.sup.release_all(PATIENCE).await;
    // vm2's disk would not survive: it was stopped, not left running.
    assert_eq!(a.state("vm2"), None);
    assert!(a.record("vm2").is_none());
    assert_eq!(a.sup.events().powerdowns, 1);
    let record = a.record("vm1").unwrap();
    assert_eq!(record.reopen.keys().collect::<Vec<_>>(), ["root"]);

    // The next vbd was started without --export shared.
    let b = a.restarted(&[], &[]);
    assert_eq!(b.sup.adopt_all().await, 1);
    assert_eq!(b.host.names(), ["root"]);
    let shared = b.disk("vm1", "shared").reconnect.unwrap();
    let error = shared.error.expect("the missing volume is reported");
    assert!(
        error.contains("has no volume in this vbd") && error.contains("--export name=shared"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_another_nbd_socket_is_left_alone_and_keeps_its_name() {
    let a = Bench::new(&["root"], &[]);
    let q = a.running("vm1", vec![boot("root")]).await;
    a.sup.release_all(PATIENCE).await;
    let mut cfg = SupervisorConfig::new(a.run.0.join("other.sock"), a.run.0.clone());
    cfg.qmp_timeout = PATIENCE;
    let host = Arc::new(FakeHost {
        volumes: Mutex::new(["root".to_string()].into()),
        ..FakeHost::default()
    });
    let sup = Supervisor::new(cfg, host.clone());
    assert_eq!(sup.adopt_all().await, 0);
    assert!(sup.list().is_empty());
    assert_eq!(sup.events().adoption_failures, 1);
    assert!(a.record("vm1").is_some(), "run record kept");
    assert!(exists(q.pid().unwrap()), "QEMU untouched");
    let mut again = VmConfig::new("vm1", 1, 64, vec![boot("root")]);
    again.qemu = q.binary.clone();
    let err = sup.start(again).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::Unadopted { pid, .. } if pid as i32 == q.pid().unwrap()),
        "{err}"
    );
    assert!(host.exports().is_empty());
    q.exit(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_user_disks_are_served_again_on_their_recorded_sockets() {
    let mut host = FakeHost::stored(&["root", "data"], &[]);
    host.vhost_queues = Some(16);
    let a = Bench::on(Arc::new(Scratch::new("supervisor")), host, PATIENCE);
    let q = a.running("vm1", vec![boot("root")]).await;
    a.sup.attach("vm1", "data", false).await.unwrap();
    let sockets = a.host.devices.locked().clone();
    a.sup.release_all(PATIENCE).await;
    let record = a.record("vm1").unwrap();
    assert_eq!(record.paths.vhost["root"].socket, sockets["root"]);
    assert_eq!(
        record.hot["data"].vhost.as_ref().map(|v| &v.socket),
        Some(&sockets["data"])
    );

    // QEMU reconnects its chardevs to the recorded sockets: the next vbd
    // must listen on exactly those, and the devices are its own to stop.
    let b = a.restarted(&[], &[]);
    b.host.attached.locked().insert("root".into());
    assert_eq!(b.sup.adopt_all().await, 1);
    assert_eq!(*b.host.devices.locked(), sockets);
    eventually("root's reconnect", || {
        b.disk("vm1", "root")
            .reconnect
            .is_some_and(|r| r.after_ms.is_some())
    })
    .await;
    q.monitor.locked().take_log();
    b.sup.detach("vm1", "data", PATIENCE).await.unwrap();
    assert_eq!(
        q.monitor.locked().take_log(),
        ["device_del disk-data", "chardev-remove chr-data"]
    );
    assert_eq!(b.host.devices.locked().keys().collect::<Vec<_>>(), ["root"]);
    b.sup.stop("vm1", PATIENCE).await.unwrap();
    assert!(b.host.devices.locked().is_empty());

    // A vbd without vhost-user cannot serve what QEMU waits for: named.
    let c = Bench::new(&["root"], &[]);
    let _q = c.running("vm2", vec![boot("root")]).await;
    c.sup.release_all(PATIENCE).await;
    let mut rec = c.record("vm2").unwrap();
    rec.paths.vhost.insert(
        "root".into(),
        crate::vm::config::VhostSocket {
            socket: c.run.0.join("vm2/root.vhost"),
            queues: 16,
        },
    );
    rec.store(&VmRecord::path(&c.run.0.join("vm2"))).unwrap();
    let d = c.restarted(&[], &[]);
    assert_eq!(d.sup.adopt_all().await, 1);
    let root = d.disk("vm2", "root").reconnect.unwrap();
    let error = root.error.expect("the missing transport is reported");
    assert!(error.contains("serves no vhost-user"), "{error}");
    assert!(
        d.host.names().is_empty(),
        "the export started for it went too"
    );
}
