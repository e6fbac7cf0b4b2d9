//! Hot attach and detach against the fake monitor, which keeps QEMU's
//! books: the order of the steps, what a failure at each step leaves
//! behind (nothing), and a detach retried while an unplug is under way.

use std::sync::{Arc, Mutex};

use super::*;
use crate::lock::MutexExt;
use crate::vm::config::VhostSocket;
use crate::vm::testing::{Monitor, PATIENCE, Scratch, SharedMonitor, serve_monitor};

struct Bench {
    qmp: Qmp,
    monitor: SharedMonitor,
    _dir: Scratch,
}

impl Bench {
    async fn new() -> Bench {
        let dir = Scratch::new("hotplug");
        let path = dir.0.join("qmp.sock");
        let monitor = Arc::new(Mutex::new(Monitor::cooperative()));
        serve_monitor(path.clone(), None, monitor.clone());
        let (qmp, _events) = Qmp::connect(&path, PATIENCE).await.expect("QMP connect");
        Bench {
            qmp,
            monitor,
            _dir: dir,
        }
    }

    fn monitor(&self) -> std::sync::MutexGuard<'_, Monitor> {
        self.monitor.locked()
    }

    fn log(&self) -> Vec<String> {
        self.monitor().take_log()
    }
}

/// What a tuned attach and detach of volume `d` send, in order.
const ATTACH_STEPS: [&str; 3] = [
    "object-add ioth-d",
    "blockdev-add vol-d",
    "device_add disk-d",
];
const DETACH_STEPS: [&str; 3] = [
    "device_del disk-d",
    "blockdev-del vol-d",
    "object-del ioth-d",
];

/// Detaches `d` with time to spare and checks QEMU holds nothing after.
async fn detach_fully(b: &Bench) {
    detach(&b.qmp, "d", DiskTuning::Tuned, false, PATIENCE)
        .await
        .unwrap();
    assert_eq!(b.log(), DETACH_STEPS);
    assert!(b.monitor().is_bare());
}

fn spec<'a>(volume: &'a str, bus: &'a str, tuning: DiskTuning) -> AttachSpec<'a> {
    AttachSpec {
        volume,
        nbd_socket: Path::new("/run/vbd/vbd.sock"),
        bus,
        queues: 2,
        tuning,
        read_only: false,
        reconnect_delay_secs: 30,
        vhost: None,
    }
}

fn attach_failure(e: &HotplugError) -> (&'static str, &[String]) {
    match e {
        HotplugError::Attach { step, rollback, .. } => (step, rollback),
        other => panic!("not an attach failure: {other}"),
    }
}

#[tokio::test]
async fn attach_adds_iothread_node_device_and_detach_removes_them_in_reverse() {
    let b = Bench::new().await;
    attach(&b.qmp, &spec("d", "hp0", DiskTuning::Tuned))
        .await
        .unwrap();
    assert_eq!(b.log(), ATTACH_STEPS);
    assert_eq!(
        b.monitor().devices.get("disk-d").map(String::as_str),
        Some("vol-d")
    );
    detach_fully(&b).await;
}

#[tokio::test]
async fn failed_device_add_rolls_back_the_node_then_the_iothread() {
    let b = Bench::new().await;
    let err = attach(&b.qmp, &spec("d", "pcie.0", DiskTuning::Tuned))
        .await
        .unwrap_err();
    assert_eq!(attach_failure(&err), ("device_add virtio-blk-pci", &[][..]));
    // Undone in reverse: the node, then the iothread.
    let log = b.log();
    assert_eq!(log[..3], ATTACH_STEPS);
    assert_eq!(log[3..], ["blockdev-del vol-d", "object-del ioth-d"]);
    assert!(b.monitor().is_bare());
    // The cause is QEMU's own words, reached once through the chain.
    let text = Chain(&err).to_string();
    assert_eq!(
        text,
        "hot attach of \"d\" failed at device_add virtio-blk-pci (rolled back): \
         QEMU refused device_add: Bus 'pcie.0' not found (GenericError)"
    );
}

#[tokio::test]
async fn failed_blockdev_add_removes_only_the_iothread() {
    let b = Bench::new().await;
    b.monitor().nodes.insert("vol-d".into());
    let err = attach(&b.qmp, &spec("d", "hp0", DiskTuning::Tuned))
        .await
        .unwrap_err();
    assert_eq!(attach_failure(&err), ("blockdev-add nbd", &[][..]));
    assert_eq!(
        b.log(),
        [
            "object-add ioth-d",
            "blockdev-add vol-d",
            "object-del ioth-d"
        ]
    );
    let m = b.monitor();
    assert!(m.iothreads.is_empty() && m.devices.is_empty());
    assert_eq!(m.nodes.len(), 1, "the node that was there before stays");
}

#[tokio::test]
async fn untuned_attach_has_no_iothread_to_add_or_undo() {
    let b = Bench::new().await;
    b.monitor().refuse.insert("device_add");
    let err = attach(&b.qmp, &spec("d", "hp0", DiskTuning::Untuned))
        .await
        .unwrap_err();
    assert_eq!(attach_failure(&err), ("device_add virtio-blk-pci", &[][..]));
    assert_eq!(
        b.log(),
        [
            "blockdev-add vol-d",
            "device_add disk-d",
            "blockdev-del vol-d"
        ]
    );
    assert!(b.monitor().is_bare());
}

#[tokio::test]
async fn a_failed_rollback_step_is_reported_and_the_next_still_runs() {
    let b = Bench::new().await;
    b.monitor().refuse.extend(["device_add", "blockdev-del"]);
    let err = attach(&b.qmp, &spec("d", "hp0", DiskTuning::Tuned))
        .await
        .unwrap_err();
    let (step, rollback) = attach_failure(&err);
    assert_eq!(step, "device_add virtio-blk-pci");
    assert_eq!(
        rollback,
        ["QEMU refused blockdev-del: blockdev-del refused by the test (GenericError)"]
    );
    assert!(err.to_string().contains("(rollback also failed: "), "{err}");
    assert_eq!(b.log()[3..], ["blockdev-del vol-d", "object-del ioth-d"]);
    let m = b.monitor();
    assert!(m.iothreads.is_empty());
    assert!(m.nodes.contains("vol-d"), "the leftover the error warns of");
}

#[tokio::test]
async fn a_detach_retried_while_the_unplug_is_under_way_finishes_it() {
    let b = Bench::new().await;
    attach(&b.qmp, &spec("d", "hp0", DiskTuning::Tuned))
        .await
        .unwrap();
    b.log();
    b.monitor().guest_unplugs = false;
    let wait = Duration::from_millis(50);
    let err = detach(&b.qmp, "d", DiskTuning::Tuned, false, wait)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HotplugError::UnplugTimeout { device, .. } if device == "disk-d"),
        "{err}"
    );
    assert_eq!(b.log(), ["device_del disk-d"]);
    assert!(b.monitor().devices.contains_key("disk-d"));

    // The guest lets go now; QEMU refuses the second device_del as "already
    // in the process of unplug", which is no reason to fail.
    b.monitor().guest_unplugs = true;
    detach_fully(&b).await;
}

#[tokio::test]
async fn detaching_a_device_qemu_lacks_fails_at_device_del() {
    let b = Bench::new().await;
    let err = detach(&b.qmp, "d", DiskTuning::Tuned, false, PATIENCE)
        .await
        .unwrap_err();
    match &err {
        HotplugError::Detach {
            step: "device_del",
            source: QmpError::Qemu { class, .. },
            ..
        } => assert_eq!(*class, qapi::ErrorClass::DeviceNotFound),
        other => panic!("{other}"),
    }
    assert_eq!(b.log(), ["device_del disk-d"]);
}

#[test]
fn blockdev_add_waits_for_vbd_like_the_command_line() {
    let json = |delay| {
        let mut s = spec("d", "hp0", DiskTuning::Tuned);
        s.reconnect_delay_secs = delay;
        serde_json::to_value(nbd_blockdev_add(&s)).unwrap()
    };
    let with = json(30);
    assert_eq!(with["reconnect-delay"], 30, "{with}");
    assert_eq!(with["driver"], "nbd");
    assert_eq!(with["export"], "d");
    // 0 leaves QEMU's default (fail at once) by not sending the member.
    let without = json(0);
    assert!(without.get("reconnect-delay").is_none(), "{without}");
}

/// A vhost-user device offering `queues`, for `spec().vhost`.
fn device(queues: u16) -> VhostSocket {
    VhostSocket {
        socket: "/run/vbd/vm/web/d.vhost".into(),
        queues,
    }
}

#[tokio::test]
async fn vhost_user_attach_adds_chardev_and_device_and_detach_removes_both() {
    let b = Bench::new().await;
    let dev = device(16);
    let mut s = spec("d", "hp0", DiskTuning::Tuned);
    s.vhost = Some(&dev);
    attach(&b.qmp, &s).await.unwrap();
    assert_eq!(b.log(), ["chardev-add chr-d", "device_add disk-d"]);
    {
        let m = b.monitor();
        assert_eq!(m.chardevs["chr-d"], "/run/vbd/vm/web/d.vhost");
        assert_eq!(m.devices["disk-d"], "chr-d");
        assert_eq!(m.queues["disk-d"], 2, "one per vCPU");
        assert!(m.iothreads.is_empty() && m.nodes.is_empty());
    }
    detach(&b.qmp, "d", DiskTuning::Tuned, true, PATIENCE)
        .await
        .unwrap();
    assert_eq!(b.log(), ["device_del disk-d", "chardev-remove chr-d"]);
    assert!(b.monitor().is_bare());
}

#[tokio::test]
async fn a_refused_vhost_user_device_takes_its_chardev_with_it() {
    let b = Bench::new().await;
    let dev = device(16);
    let mut s = spec("d", "pcie.0", DiskTuning::Tuned);
    s.vhost = Some(&dev);
    let err = attach(&b.qmp, &s).await.unwrap_err();
    assert_eq!(
        attach_failure(&err),
        ("device_add vhost-user-blk-pci", &[][..])
    );
    assert_eq!(
        b.log(),
        [
            "chardev-add chr-d",
            "device_add disk-d",
            "chardev-remove chr-d"
        ]
    );
    assert!(b.monitor().is_bare());
    // A chardev QEMU refuses stops there, with nothing to undo.
    b.monitor().refuse.insert("chardev-add");
    let s = AttachSpec { bus: "hp0", ..s };
    let err = attach(&b.qmp, &s).await.unwrap_err();
    assert_eq!(attach_failure(&err), ("chardev-add", &[][..]));
    assert_eq!(b.log(), ["chardev-add chr-d"]);
    assert!(b.monitor().is_bare());
}

#[test]
fn vhost_user_commands_say_what_qemu_7_2_expects() {
    let dev = device(1);
    let mut s = spec("d", "hp1", DiskTuning::Tuned);
    s.vhost = Some(&dev);
    let chardev = serde_json::to_value(vhost_chardev_add("d", &dev.socket)).unwrap();
    assert_eq!(
        chardev,
        json!({"id": "chr-d", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": "/run/vbd/vm/web/d.vhost"}},
            "server": false, "reconnect": 1}}})
    );
    let device = serde_json::to_value(vhost_user_blk_add(&s, &dev)).unwrap();
    // Two vCPUs, but the device offers one queue: QEMU would refuse more.
    assert_eq!(
        device,
        json!({"driver": "vhost-user-blk-pci", "id": "disk-d", "bus": "hp1",
            "chardev": "chr-d", "num-queues": 1})
    );
}
