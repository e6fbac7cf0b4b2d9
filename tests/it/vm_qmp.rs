//! QMP against a real qemu-system-x86_64 with no guest: hot attach creates
//! the iothread, block node and device; detach removes all three; a
//! failing step leaves nothing behind. QEMU's disks are exports of an
//! in-process vbd server, as in production.

use crate::vm_common;

use std::time::Duration;

use qapi::qmp::{cont, stop};
use serde_json::Value;
use std::sync::Arc;

use vbd::control::vhost_exports::VhostExports;
use vbd::vhost::device::SocketAccess;
use vbd::vm::config::{Accel, Disk, DiskTransport, DiskTuning, Role, VhostSocket, VmConfig};
use vbd::vm::hotplug::{AttachSpec, HotplugError, attach, detach};
use vbd::vm::qmp::Qmp;

use vm_common::{Qemu, VbdServer, names};

/// Generous: QEMU starts slowly when the two cores are busy.
const T: Duration = Duration::from_secs(30);

async fn connect(q: &Qemu) -> (Qmp, vbd::vm::qmp::EventStream) {
    Qmp::connect(&q.paths.qmp_socket, T)
        .await
        .expect("QMP connect")
}

fn spec<'a>(vol: &'a str, srv: &'a VbdServer, bus: &'a str) -> AttachSpec<'a> {
    AttachSpec {
        volume: vol,
        nbd_socket: &srv.socket,
        bus,
        queues: 2,
        tuning: DiskTuning::Tuned,
        read_only: false,
        reconnect_delay_secs: 30,
        vhost: None,
    }
}

fn bare_vm(name: &str) -> VmConfig {
    let mut cfg = VmConfig::new(name, 2, 128, vec![]);
    cfg.accel = Accel::Tcg;
    cfg.hotplug_ports = 2;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_then_detach_creates_and_removes_all_three() {
    let srv = VbdServer::start(&[("data1", 64 << 20)]);
    let q = Qemu::launch(&bare_vm("qmp1"), &srv, &["-S"]);
    let (qmp, _events) = connect(&q).await;
    assert_eq!(qmp.greeting().version.qemu.major, 7);

    attach(&qmp, &spec("data1", &srv, "hp0")).await.unwrap();
    let n = names(&qmp).await;
    assert!(n.iothreads.contains(&"ioth-data1".to_string()), "{n:?}");
    assert!(n.nodes.contains(&"vol-data1".to_string()), "{n:?}");
    assert!(n.devices.contains(&"disk-data1".to_string()), "{n:?}");
    // The node really is cache=none on vbd's socket.
    let node = n
        .node_info
        .iter()
        .find(|v| v["node-name"] == "vol-data1")
        .unwrap();
    assert_eq!(node["cache"]["direct"], Value::Bool(true));
    assert_eq!(node["cache"]["no-flush"], Value::Bool(false));
    assert_eq!(node["drv"], "nbd");
    assert_eq!(node["image"]["virtual-size"], 64 << 20);

    detach(&qmp, "data1", DiskTuning::Tuned, false, T)
        .await
        .unwrap();
    let n = names(&qmp).await;
    assert!(!n.iothreads.contains(&"ioth-data1".to_string()), "{n:?}");
    assert!(!n.nodes.contains(&"vol-data1".to_string()), "{n:?}");
    assert!(!n.devices.contains(&"disk-data1".to_string()), "{n:?}");

    // The same volume can go straight back in, on another port.
    attach(&qmp, &spec("data1", &srv, "hp1")).await.unwrap();
    assert!(
        names(&qmp)
            .await
            .devices
            .contains(&"disk-data1".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_device_add_leaves_nothing_behind() {
    let srv = VbdServer::start(&[("data1", 16 << 20)]);
    let q = Qemu::launch(&bare_vm("qmp2"), &srv, &["-S"]);
    let (qmp, _events) = connect(&q).await;
    let before = names(&qmp).await;

    let err = attach(&qmp, &spec("data1", &srv, "no-such-port"))
        .await
        .unwrap_err();
    match &err {
        HotplugError::Attach { step, rollback, .. } => {
            assert_eq!(*step, "device_add virtio-blk-pci");
            assert!(rollback.is_empty(), "{rollback:?}");
        }
        other => panic!("unexpected {other}"),
    }
    let after = names(&qmp).await;
    assert_eq!(before.iothreads, after.iothreads);
    assert_eq!(before.nodes, after.nodes);
    assert_eq!(before.devices, after.devices);

    // A missing export fails at blockdev-add and removes the iothread.
    let err = attach(&qmp, &spec("no-such-export", &srv, "hp0"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::Attach {
                step: "blockdev-add nbd",
                ..
            }
        ),
        "{err}"
    );
    let after = names(&qmp).await;
    assert_eq!(before.iothreads, after.iothreads);
    assert_eq!(before.nodes, after.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_not_lost_while_commands_run() {
    let srv = VbdServer::start(&[]);
    let q = Qemu::launch(&bare_vm("qmp3"), &srv, &["-S"]);
    let (qmp, mut events) = connect(&q).await;
    let mut late = qmp.subscribe();
    for _ in 0..5 {
        qmp.execute(cont {}).await.unwrap();
        qmp.execute(stop {}).await.unwrap();
    }
    for stream in [&mut events, &mut late] {
        let mut got = Vec::new();
        while got.len() < 10 {
            let e = tokio::time::timeout(T, stream.next())
                .await
                .expect("event in time")
                .expect("stream open");
            got.push(e.name);
        }
        let want: Vec<&str> = ["RESUME", "STOP"]
            .iter()
            .cycle()
            .take(10)
            .copied()
            .collect();
        assert_eq!(got, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_accepts_the_launch_argv_for_every_role() {
    let srv = VbdServer::start(&[
        ("root", 32 << 20),
        ("data", 32 << 20),
        ("seed", 1 << 20),
        ("vars", 4 << 20),
    ]);
    let mut cfg = VmConfig::new(
        "roles",
        2,
        128,
        vec![
            Disk::export("root", Role::Boot),
            Disk::export("data", Role::Data),
            Disk::export("seed", Role::CloudInit),
            Disk::export("vars", Role::Efi),
        ],
    );
    cfg.accel = Accel::Tcg;
    cfg.firmware = Some("/usr/share/OVMF/OVMF_CODE_4M.fd".into());
    let q = Qemu::launch(&cfg, &srv, &["-S"]);
    let (qmp, _events) = connect(&q).await;
    let n = names(&qmp).await;
    for want in ["ioth-root", "ioth-data"] {
        assert!(n.iothreads.contains(&want.to_string()), "{n:?}");
    }
    assert_eq!(
        n.iothreads.len(),
        2,
        "cloud-init and EFI get no iothread: {n:?}"
    );
    for want in ["vol-root", "vol-data", "vol-seed", "vol-vars", "fw-code"] {
        assert!(n.nodes.contains(&want.to_string()), "{n:?}");
    }
    for want in ["disk-root", "disk-data", "disk-seed"] {
        assert!(n.devices.contains(&want.to_string()), "{n:?}");
    }
    let seed = n
        .node_info
        .iter()
        .find(|v| v["node-name"] == "vol-seed")
        .unwrap();
    assert_eq!(seed["ro"], Value::Bool(true));
}

/// Over vhost-user: chardev-add connects QEMU to vbd's device, device_add
/// puts a vhost-user-blk-pci on it with one queue per vCPU, and detach
/// removes both, QEMU letting go of the device's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_user_attach_connects_to_vbds_device_and_detach_lets_go() {
    let srv = VbdServer::start(&[("data1", 16 << 20)]);
    let mut cfg = bare_vm("qmp4");
    cfg.disk_transport = Some(DiskTransport::VhostUser);
    let q = Qemu::launch(&cfg, &srv, &["-S"]);
    let (qmp, _events) = connect(&q).await;
    let vhost = Arc::new(VhostExports::new());
    let sock = q.paths.qmp_socket.with_file_name("data1.vhost");
    let offered = vhost
        .start(&srv.handle(), "data1", &sock, SocketAccess::default())
        .unwrap();
    let dev = VhostSocket {
        socket: sock.clone(),
        queues: offered,
    };
    let mut s = spec("data1", &srv, "hp0");
    s.vhost = Some(&dev);
    attach(&qmp, &s).await.unwrap();
    let n = names(&qmp).await;
    assert!(n.chardevs.contains(&"chr-data1".to_string()), "{n:?}");
    assert!(n.devices.contains(&"disk-data1".to_string()), "{n:?}");
    assert!(n.nodes.is_empty() && n.iothreads.is_empty(), "{n:?}");
    assert!(vhost.attached("data1"), "QEMU is vbd's frontend");
    let status = &vhost.list()[0].1;
    assert!(status.attached && status.num_queues >= 16, "{status:?}");

    detach(&qmp, "data1", DiskTuning::Tuned, true, T)
        .await
        .unwrap();
    let n = names(&qmp).await;
    assert!(!n.chardevs.contains(&"chr-data1".to_string()), "{n:?}");
    assert!(!n.devices.contains(&"disk-data1".to_string()), "{n:?}");
    let start = std::time::Instant::now();
    while vhost.attached("data1") {
        assert!(start.elapsed() < T, "QEMU still holds the device's socket");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    vhost.stop_all();
}
