//! VMs whose disks go over vhost-user-blk, against a host that serves
//! devices: which disks get one (boot and data, not cloud-init), where
//! their sockets are, what the record keeps, the QMP steps of a hot attach
//! and detach, and that every device the supervisor started stops with
//! the disk or the VM, while a device of the command line stays.

use super::*;
use crate::vm::config::{DiskTransport, VhostSocket};
use crate::vm::supervisor::record::VmRecord;

/// Queues the fake host's devices offer.
const QUEUES: u16 = 16;

impl Bench {
    /// `volumes` exist; `exported` are served by the command line, each
    /// with a vhost-user device of its own at `/cmdline/NAME.vhost`.
    fn with_vhost(volumes: &[&str], exported: &[&str]) -> Bench {
        let mut host = FakeHost::stored(volumes, exported);
        host.vhost_queues = Some(QUEUES);
        for e in exported {
            host.devices
                .locked()
                .insert(e.to_string(), format!("/cmdline/{e}.vhost").into());
        }
        Bench::on(Arc::new(Scratch::new("supervisor")), host, PATIENCE)
    }

    /// Volumes with a vhost-user device now, and their sockets.
    fn devices(&self) -> BTreeMap<String, PathBuf> {
        self.host
            .devices
            .locked()
            .iter()
            .map(|(v, s)| (v.clone(), s.clone()))
            .collect()
    }

    fn vm_record(&self, name: &str) -> VmRecord {
        VmRecord::load(&VmRecord::path(&self.run.0.join(name))).expect("run record")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_and_data_disks_get_devices_that_stop_with_the_vm() {
    let b = Bench::with_vhost(&["root", "db", "seed", "shared"], &["shared"]);
    let q = b
        .running(
            "vm1",
            vec![
                boot("root"),
                Disk::export("db", Role::Data),
                Disk::export("seed", Role::CloudInit),
                Disk::export("shared", Role::Data),
            ],
        )
        .await;
    let dir = b.run.0.join("vm1");
    let want: BTreeMap<String, PathBuf> = [
        ("db", dir.join("db.vhost")),
        ("root", dir.join("root.vhost")),
        ("shared", "/cmdline/shared.vhost".into()),
    ]
    .map(|(v, p)| (v.to_string(), p))
    .into();
    assert_eq!(b.devices(), want, "cloud-init stays NBD");
    // Every disk is exported too: the device serves the export's volume.
    assert_eq!(b.host.names(), ["db", "root", "seed", "shared"]);
    let record = b.vm_record("vm1");
    assert_eq!(record.config.disk_transport, Some(DiskTransport::VhostUser));
    let sockets: BTreeMap<String, PathBuf> = record
        .paths
        .vhost
        .iter()
        .map(|(v, s)| {
            assert_eq!(s.queues, QUEUES);
            (v.clone(), s.socket.clone())
        })
        .collect();
    assert_eq!(sockets, want, "QEMU's argv and the next vbd use these");

    q.exit(0);
    eventually("the exit", || b.host.names() == ["shared"]).await;
    assert_eq!(
        b.devices().into_keys().collect::<Vec<_>>(),
        ["shared"],
        "the command line's device stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_asking_for_nbd_gets_no_device() {
    let b = Bench::with_vhost(&["root", "data"], &[]);
    let qemu = FakeQemu::new(Behaviour::Runs);
    qemu.serve(b.run.0.join("vm1").join("qmp.sock"));
    let mut cfg = b.config("vm1", vec![boot("root")], &qemu);
    cfg.disk_transport = Some(DiskTransport::Nbd);
    b.sup.start(cfg).await.unwrap();
    assert!(b.devices().is_empty());
    assert_eq!(b.host.names(), ["root"]);
    assert!(b.vm_record("vm1").paths.vhost.is_empty());
    qemu.monitor.locked().take_log();
    b.sup.attach("vm1", "data", false).await.unwrap();
    assert_eq!(
        qemu.monitor.locked().take_log(),
        [
            "object-add ioth-data",
            "blockdev-add vol-data",
            "device_add disk-data"
        ]
    );
    assert!(b.devices().is_empty());
    b.sup.stop("vm1", PATIENCE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_attach_goes_over_vhost_user_and_every_failure_stops_the_device() {
    let b = Bench::with_vhost(&["root", "data"], &[]);
    let q = b.running("vm1", vec![boot("root")]).await;
    q.monitor.locked().take_log();

    // QEMU refuses the device: the chardev goes, then the device and export.
    q.monitor.locked().refuse.insert("device_add");
    let err = b.sup.attach("vm1", "data", false).await.unwrap_err();
    assert!(
        matches!(&err, SupervisorError::Hotplug(HotplugError::Attach { step, .. }) if *step == "device_add vhost-user-blk-pci"),
        "{err}"
    );
    assert_eq!(
        q.monitor.locked().take_log(),
        [
            "chardev-add chr-data",
            "device_add disk-data",
            "chardev-remove chr-data"
        ]
    );
    assert!(q.monitor.locked().is_bare());
    assert_eq!(b.devices().into_keys().collect::<Vec<_>>(), ["root"]);
    assert_eq!(b.host.names(), ["root"]);

    q.monitor.locked().refuse.clear();
    let disk = b.sup.attach("vm1", "data", false).await.unwrap();
    assert_eq!(disk.port.as_deref(), Some("hp0"));
    {
        let m = q.monitor.locked();
        assert_eq!(
            m.chardevs["chr-data"],
            b.run.0.join("vm1/data.vhost").display().to_string()
        );
        assert_eq!(m.queues["disk-data"], 2, "one queue per vCPU");
    }
    assert_eq!(
        b.vm_record("vm1").hot["data"].vhost,
        Some(VhostSocket {
            socket: b.run.0.join("vm1/data.vhost"),
            queues: QUEUES,
        })
    );
    q.monitor.locked().take_log();

    b.sup.detach("vm1", "data", PATIENCE).await.unwrap();
    assert_eq!(
        q.monitor.locked().take_log(),
        ["device_del disk-data", "chardev-remove chr-data"]
    );
    assert_eq!(b.devices().into_keys().collect::<Vec<_>>(), ["root"]);
    assert_eq!(b.host.names(), ["root"]);
    assert!(q.monitor.locked().is_bare());
    b.sup.stop("vm1", PATIENCE).await.unwrap();
    assert!(b.devices().is_empty());
}
