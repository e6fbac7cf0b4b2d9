//! The supervisor against a real qemu-system-x86_64 with no guest: exports
//! started and removed around a VM's life, launch failures reported with
//! QEMU's own words and nothing left behind, volumes held by one VM only,
//! and the SIGTERM step of a stop when no guest answers the power button.

use crate::vm_common;

use std::sync::Arc;
use std::time::Duration;

use vbd::control::vhost_exports::VhostExports;
use vbd::control::vm_volumes::CatalogExports;
use vbd::control::volumes::{CreateVolume, VolumeCatalog};
use vbd::vm::config::{Accel, Disk, Role, VmConfig};
use vbd::vm::supervisor::{StopOutcome, Supervisor, SupervisorConfig, SupervisorError, VmState};

use vm_common::{TempDir, VbdServer};

fn setup(volumes: &[&str]) -> (VbdServer, Arc<Supervisor>, TempDir) {
    let srv = VbdServer::start(&[]);
    let catalog = Arc::new(VolumeCatalog::new());
    for v in volumes {
        catalog
            .create(&CreateVolume {
                name: v.to_string(),
                backend: "memory".into(),
                size: Some(16 << 20),
                read_only: false,
                options: Default::default(),
            })
            .unwrap();
    }
    let run = TempDir::new("run");
    let sup = Supervisor::new(
        SupervisorConfig::new(srv.socket.clone(), run.path().to_path_buf()),
        Arc::new(CatalogExports::new(
            srv.handle(),
            catalog,
            Arc::new(VhostExports::new()),
        )),
    );
    (srv, sup, run)
}

fn vm(name: &str, disks: Vec<Disk>) -> VmConfig {
    let mut cfg = VmConfig::new(name, 1, 64, disks);
    cfg.accel = Accel::Tcg;
    cfg.hotplug_ports = 1;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_volume_fails_before_qemu_and_removes_started_exports() {
    let (srv, sup, _run) = setup(&["a"]);
    let err = sup
        .start(vm(
            "v1",
            vec![
                Disk::export("a", Role::Boot),
                Disk::export("nope", Role::Data),
            ],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SupervisorError::NoVolume(v) if v == "nope"),
        "{err}"
    );
    assert!(
        srv.registry.by_name("a").is_none(),
        "export of a left behind"
    );
    assert!(sup.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_start_failure_is_reported_with_its_output_and_cleaned_up() {
    let (srv, sup, _run) = setup(&["a"]);
    let mut cfg = vm("v2", vec![Disk::export("a", Role::Boot)]);
    cfg.extra_devices = vec!["no-such-device-model".into()];
    let err = sup.start(cfg).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SupervisorError::Start { .. }), "{text}");
    assert!(text.contains("no-such-device-model"), "{text}");
    assert!(srv.registry.by_name("a").is_none());
    assert!(sup.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_vm_per_volume_and_stop_escalates_to_sigterm() {
    let (srv, sup, _run) = setup(&["a", "b"]);
    let info = sup
        .start(vm("v3", vec![Disk::export("a", Role::Boot)]))
        .await
        .unwrap();
    assert_eq!(info.state, VmState::Running);
    assert!(
        srv.registry.by_name("a").is_some(),
        "export started for the VM"
    );

    let err = sup
        .start(vm("v4", vec![Disk::export("a", Role::Boot)]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SupervisorError::VolumeInUse { vm, .. } if vm == "v3"),
        "{err}"
    );
    let err = sup.attach("v3", "a", false).await.unwrap_err();
    assert!(matches!(err, SupervisorError::VolumeInUse { .. }), "{err}");
    let err = sup
        .detach("v3", "a", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::ColdAttached { .. }), "{err}");

    sup.attach("v3", "b", false).await.unwrap();
    assert!(srv.registry.by_name("b").is_some());
    // One hot-plug port, and it is taken.
    let err = sup.attach("v3", "c", false).await.unwrap_err();
    assert!(matches!(err, SupervisorError::NoFreePort { .. }), "{err}");

    // No guest to answer the power button: SIGTERM ends it.
    let outcome = sup.stop("v3", Duration::from_millis(300)).await.unwrap();
    assert_eq!(outcome, StopOutcome::Sigterm);
    assert!(srv.registry.by_name("a").is_none());
    assert!(srv.registry.by_name("b").is_none());
    assert!(!info.qmp_socket.exists());
    assert!(sup.list().is_empty());
}
