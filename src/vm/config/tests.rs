use super::*;

fn paths() -> RunPaths {
    RunPaths {
        nbd_socket: "/run/vbd/vbd.sock".into(),
        qmp_socket: "/run/vbd/vm/web/qmp.sock".into(),
        pidfile: "/run/vbd/vm/web/qemu.pid".into(),
        serial_log: "/run/vbd/vm/web/serial.log".into(),
        vhost: BTreeMap::new(),
    }
}

/// The part of the argv every VM shares, after the program name.
fn common(name: &str, machine: &str, accel: &str, cpu: &str, smp: &str, mem: &str) -> Vec<String> {
    [
        "-no-user-config",
        "-nodefaults",
        "-name",
        &format!("guest={name},debug-threads=on"),
        "-machine",
        machine,
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-smp",
        smp,
        "-m",
        mem,
        "-display",
        "none",
        "-pidfile",
        "/run/vbd/vm/web/qemu.pid",
        "-chardev",
        "socket,id=qmp,path=/run/vbd/vm/web/qmp.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        "file,id=serial0,path=/run/vbd/vm/web/serial.log",
        "-serial",
        "chardev:serial0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn sv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn boot_volume_kvm() {
    let mut cfg = VmConfig::new("web", 4, 2048, vec![Disk::export("web-root", Role::Boot)]);
    cfg.hotplug_ports = 0;
    let mut want = vec!["qemu-system-x86_64".to_string()];
    want.extend(common("web", "q35", "kvm", "host", "4", "2048M"));
    want.extend(sv(&[
        "-object",
        "iothread,id=ioth-web-root",
        "-blockdev",
        "driver=nbd,node-name=vol-web-root,server.type=unix,server.path=/run/vbd/vbd.sock,export=web-root,reconnect-delay=30,cache.direct=on,cache.no-flush=off",
        "-device",
        "virtio-blk-pci,id=disk-web-root,drive=vol-web-root,iothread=ioth-web-root,num-queues=4,bootindex=1",
    ]));
    assert_eq!(argv(&cfg, &paths()).unwrap(), want);
}

#[test]
fn boot_and_data_volumes_tcg_with_kernel_and_hotplug_ports() {
    let mut cfg = VmConfig::new(
        "web",
        2,
        512,
        vec![
            Disk::export("root", Role::Boot),
            Disk::export("db", Role::Data),
            Disk::export("logs", Role::Data),
        ],
    );
    cfg.accel = Accel::Tcg;
    cfg.hotplug_ports = 2;
    cfg.kernel = Some("/boot/vmlinuz".into());
    cfg.initrd = Some("/boot/initrd.img".into());
    cfg.append = Some("console=ttyS0 quiet".into());
    cfg.extra_devices = vec!["virtio-rng-pci".into()];
    let mut want = vec!["qemu-system-x86_64".to_string()];
    want.extend(common("web", "q35", "tcg,thread=multi", "max", "2", "512M"));
    want.extend(sv(&[
        "-kernel",
        "/boot/vmlinuz",
        "-initrd",
        "/boot/initrd.img",
        "-append",
        "console=ttyS0 quiet",
        // Three volumes, three iothreads, each device bound to its own.
        "-object",
        "iothread,id=ioth-root",
        "-blockdev",
        "driver=nbd,node-name=vol-root,server.type=unix,server.path=/run/vbd/vbd.sock,export=root,reconnect-delay=30,cache.direct=on,cache.no-flush=off",
        "-device",
        "virtio-blk-pci,id=disk-root,drive=vol-root,iothread=ioth-root,num-queues=2,bootindex=1",
        "-object",
        "iothread,id=ioth-db",
        "-blockdev",
        "driver=nbd,node-name=vol-db,server.type=unix,server.path=/run/vbd/vbd.sock,export=db,reconnect-delay=30,cache.direct=on,cache.no-flush=off",
        "-device",
        "virtio-blk-pci,id=disk-db,drive=vol-db,iothread=ioth-db,num-queues=2",
        "-object",
        "iothread,id=ioth-logs",
        "-blockdev",
        "driver=nbd,node-name=vol-logs,server.type=unix,server.path=/run/vbd/vbd.sock,export=logs,reconnect-delay=30,cache.direct=on,cache.no-flush=off",
        "-device",
        "virtio-blk-pci,id=disk-logs,drive=vol-logs,iothread=ioth-logs,num-queues=2",
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        "-device",
        "pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
        "-device",
        "pcie-root-port,id=hp1,bus=pcie.0,chassis=2",
        "-device",
        "virtio-rng-pci",
    ]));
    assert_eq!(argv(&cfg, &paths()).unwrap(), want);
}

#[test]
fn cloud_init_is_a_read_only_cdrom_without_iothread() {
    let mut cfg = VmConfig::new(
        "web",
        1,
        256,
        vec![
            Disk::export("root", Role::Boot),
            Disk::export("seed", Role::CloudInit),
        ],
    );
    cfg.hotplug_ports = 0;
    let got = argv(&cfg, &paths()).unwrap();
    let tail = &got[got.len() - 8..];
    assert_eq!(
        tail,
        sv(&[
            "-blockdev",
            "driver=nbd,node-name=vol-root,server.type=unix,server.path=/run/vbd/vbd.sock,export=root,reconnect-delay=30,cache.direct=on,cache.no-flush=off",
            "-device",
            "virtio-blk-pci,id=disk-root,drive=vol-root,iothread=ioth-root,num-queues=1,bootindex=1",
            "-blockdev",
            "driver=nbd,node-name=vol-seed,server.type=unix,server.path=/run/vbd/vbd.sock,export=seed,reconnect-delay=30,cache.direct=on,cache.no-flush=off,read-only=on",
            "-device",
            "ide-cd,id=disk-seed,drive=vol-seed,bus=ide.0",
        ])
    );
    assert!(!got.iter().any(|a| a.contains("ioth-seed")));
    assert_eq!(
        got.iter().filter(|a| *a == "iothread,id=ioth-root").count(),
        1
    );
}

#[test]
fn efi_volume_is_pflash_with_firmware_code() {
    let mut cfg = VmConfig::new(
        "web",
        2,
        1024,
        vec![
            Disk::export("root", Role::Boot),
            Disk::export("vars", Role::Efi),
        ],
    );
    cfg.hotplug_ports = 0;
    cfg.firmware = Some("/usr/share/OVMF/OVMF_CODE_4M.fd".into());
    let mut want = vec!["qemu-system-x86_64".to_string()];
    want.extend(common(
        "web",
        "q35,pflash0=fw-code,pflash1=vol-vars",
        "kvm",
        "host",
        "2",
        "1024M",
    ));
    want.extend(sv(&[
        "-blockdev",
        "driver=raw,node-name=fw-code,read-only=on,file.driver=file,file.filename=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "-object",
        "iothread,id=ioth-root",
        "-blockdev",
        "driver=nbd,node-name=vol-root,server.type=unix,server.path=/run/vbd/vbd.sock,export=root,reconnect-delay=30,cache.direct=on,cache.no-flush=off",
        "-device",
        "virtio-blk-pci,id=disk-root,drive=vol-root,iothread=ioth-root,num-queues=2,bootindex=1",
        "-blockdev",
        "driver=nbd,node-name=vol-vars,server.type=unix,server.path=/run/vbd/vbd.sock,export=vars,reconnect-delay=30,cache.direct=on,cache.no-flush=off",
    ]));
    assert_eq!(argv(&cfg, &paths()).unwrap(), want);
}

#[test]
fn efi_volume_alone_is_pflash0() {
    let mut cfg = VmConfig::new("web", 1, 256, vec![Disk::export("fw", Role::Efi)]);
    cfg.hotplug_ports = 0;
    let got = argv(&cfg, &paths()).unwrap();
    let i = got.iter().position(|a| a == "-machine").unwrap();
    assert_eq!(got[i + 1], "q35,pflash0=vol-fw");
    assert!(got.contains(&"driver=nbd,node-name=vol-fw,server.type=unix,server.path=/run/vbd/vbd.sock,export=fw,reconnect-delay=30,cache.direct=on,cache.no-flush=off".to_string()));
}

#[test]
fn untuned_has_no_iothread_default_cache_one_queue() {
    let mut cfg = VmConfig::new("web", 4, 512, vec![Disk::export("root", Role::Boot)]);
    cfg.hotplug_ports = 0;
    cfg.tuning = DiskTuning::Untuned;
    let got = argv(&cfg, &paths()).unwrap();
    assert_eq!(
        got[got.len() - 4..],
        sv(&[
            "-blockdev",
            "driver=nbd,node-name=vol-root,server.type=unix,server.path=/run/vbd/vbd.sock,export=root,reconnect-delay=30",
            "-device",
            "virtio-blk-pci,id=disk-root,drive=vol-root,num-queues=1,bootindex=1",
        ])
    );
    assert!(!got.iter().any(|a| a.starts_with("iothread")));
}

#[test]
fn raw_file_source_and_comma_escaping() {
    let mut cfg = VmConfig::new(
        "web",
        2,
        512,
        vec![Disk {
            name: "raw".into(),
            role: Role::Data,
            source: Source::RawFile("/tmp/a,b.img".into()),
        }],
    );
    cfg.hotplug_ports = 0;
    let mut p = paths();
    p.serial_log = "/tmp/x,y.log".into();
    let got = argv(&cfg, &p).unwrap();
    assert!(got.contains(&"file,id=serial0,path=/tmp/x,,y.log".to_string()));
    assert!(got.contains(&"driver=raw,node-name=vol-raw,file.driver=file,file.filename=/tmp/a,,b.img,file.aio=native,cache.direct=on,cache.no-flush=off".to_string()));
}

#[test]
fn rejects_bad_configs_with_reasons() {
    let p = paths();
    let two_boot = VmConfig::new(
        "web",
        1,
        256,
        vec![Disk::export("a", Role::Boot), Disk::export("b", Role::Boot)],
    );
    assert_eq!(
        argv(&two_boot, &p),
        Err(ConfigError::TwoBootDisks("a".into(), "b".into()))
    );
    let dup = VmConfig::new(
        "web",
        1,
        256,
        vec![Disk::export("a", Role::Boot), Disk::export("a", Role::Data)],
    );
    assert_eq!(argv(&dup, &p), Err(ConfigError::DuplicateDisk("a".into())));
    let bad = VmConfig::new("web", 1, 256, vec![Disk::export("9lives", Role::Data)]);
    assert_eq!(argv(&bad, &p), Err(ConfigError::BadName("9lives".into())));
    let long = VmConfig::new(
        "web",
        1,
        256,
        vec![Disk::export(&"a".repeat(27), Role::Data)],
    );
    assert!(matches!(argv(&long, &p), Err(ConfigError::BadName(_))));
    let efi2 = VmConfig::new(
        "web",
        1,
        256,
        vec![Disk::export("e1", Role::Efi), Disk::export("e2", Role::Efi)],
    );
    assert!(matches!(argv(&efi2, &p), Err(ConfigError::TwoEfiDisks(..))));
    let mut pc = VmConfig::new("web", 1, 256, vec![]);
    pc.machine = "pc".into();
    assert_eq!(
        argv(&pc, &p),
        Err(ConfigError::HotplugNeedsQ35("pc".into()))
    );
    pc.hotplug_ports = 0;
    assert!(argv(&pc, &p).is_ok());
    let none = VmConfig::new("web", 0, 256, vec![]);
    assert!(matches!(argv(&none, &p), Err(ConfigError::NoResources(_))));
}

#[test]
fn json_config_uses_defaults_and_rejects_unknown_fields() {
    let cfg: VmConfig = serde_json::from_str(
        r#"{"name":"web","vcpus":2,"memory_mib":512,"disks":[{"name":"root","role":"boot"}]}"#,
    )
    .unwrap();
    assert_eq!(
        cfg,
        VmConfig::new("web", 2, 512, vec![Disk::export("root", Role::Boot)])
    );
    let err = serde_json::from_str::<VmConfig>(
        r#"{"name":"web","vcpus":2,"memory_mib":512,"disks":[],"iothreads":false}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("iothreads"), "{err}");
}

#[test]
fn reconnect_delay_is_set_per_vm_and_zero_leaves_qemus_default() {
    let mut cfg: VmConfig = serde_json::from_str(
        r#"{"name":"web","vcpus":1,"memory_mib":256,"hotplug_ports":0,
            "disks":[{"name":"root","role":"boot"},{"name":"seed","role":"cloud-init"}],
            "disk_reconnect_delay_secs":7}"#,
    )
    .unwrap();
    let nbd = |cfg: &VmConfig| -> Vec<String> {
        argv(cfg, &paths())
            .unwrap()
            .into_iter()
            .filter(|a| a.starts_with("driver=nbd"))
            .collect()
    };
    assert_eq!(
        nbd(&cfg),
        sv(&[
            "driver=nbd,node-name=vol-root,server.type=unix,server.path=/run/vbd/vbd.sock,export=root,reconnect-delay=7,cache.direct=on,cache.no-flush=off",
            "driver=nbd,node-name=vol-seed,server.type=unix,server.path=/run/vbd/vbd.sock,export=seed,reconnect-delay=7,cache.direct=on,cache.no-flush=off,read-only=on",
        ])
    );
    cfg.disk_reconnect_delay_secs = Some(0);
    assert_eq!(
        nbd(&cfg),
        sv(&[
            "driver=nbd,node-name=vol-root,server.type=unix,server.path=/run/vbd/vbd.sock,export=root,cache.direct=on,cache.no-flush=off",
            "driver=nbd,node-name=vol-seed,server.type=unix,server.path=/run/vbd/vbd.sock,export=seed,cache.direct=on,cache.no-flush=off,read-only=on",
        ])
    );
}

/// Where vbd's devices listen in the vhost-user tests, offering `queues`.
fn vhost_paths(disks: &[&str], queues: u16) -> RunPaths {
    let mut p = paths();
    for d in disks {
        p.vhost.insert(
            d.to_string(),
            VhostSocket {
                socket: format!("/run/vbd/vm/web/{d}.vhost").into(),
                queues,
            },
        );
    }
    p
}

#[test]
fn vhost_user_disks_share_guest_ram_and_reconnect() {
    let mut cfg = VmConfig::new(
        "web",
        4,
        2048,
        vec![
            Disk::export("root", Role::Boot),
            Disk::export("db", Role::Data),
            Disk::export("seed", Role::CloudInit),
        ],
    );
    cfg.hotplug_ports = 1;
    cfg.disk_transport = Some(DiskTransport::VhostUser);
    let mut want = vec!["qemu-system-x86_64".to_string()];
    let mut head = common("web", "q35,memory-backend=mem", "kvm", "host", "4", "2048M");
    // Guest RAM is a shared memfd right after -m, so vbd can map it.
    let at = head.iter().position(|a| a == "2048M").unwrap() + 1;
    head.splice(
        at..at,
        sv(&["-object", "memory-backend-memfd,id=mem,size=2048M,share=on"]),
    );
    want.extend(head);
    want.extend(sv(&[
        // No iothread and no block node: vbd serves the queues itself.
        "-chardev",
        "socket,id=chr-root,path=/run/vbd/vm/web/root.vhost,reconnect=1",
        "-device",
        "vhost-user-blk-pci,id=disk-root,chardev=chr-root,num-queues=4,bootindex=1",
        "-chardev",
        "socket,id=chr-db,path=/run/vbd/vm/web/db.vhost,reconnect=1",
        "-device",
        "vhost-user-blk-pci,id=disk-db,chardev=chr-db,num-queues=4",
        // Cloud-init stays a read-only NBD CD-ROM.
        "-blockdev",
        "driver=nbd,node-name=vol-seed,server.type=unix,server.path=/run/vbd/vbd.sock,export=seed,reconnect-delay=30,cache.direct=on,cache.no-flush=off,read-only=on",
        "-device",
        "ide-cd,id=disk-seed,drive=vol-seed,bus=ide.0",
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        "-device",
        "pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
    ]));
    assert_eq!(argv(&cfg, &vhost_paths(&["root", "db"], 16)).unwrap(), want);
}

#[test]
fn vhost_user_queues_stop_at_what_the_device_offers() {
    let mut cfg = VmConfig::new("web", 8, 512, vec![Disk::export("root", Role::Boot)]);
    cfg.hotplug_ports = 0;
    cfg.disk_transport = Some(DiskTransport::VhostUser);
    let got = argv(&cfg, &vhost_paths(&["root"], 2)).unwrap();
    assert_eq!(
        got.last().unwrap(),
        "vhost-user-blk-pci,id=disk-root,chardev=chr-root,num-queues=2,bootindex=1"
    );
    assert_eq!(vhost_queues(0, 16), 1);
    assert_eq!(vhost_queues(3, 0), 1);
}

/// A vhost-user VM whose disks stayed NBD (no device for them) still gets
/// shared RAM, so a disk can be hot-attached over vhost-user later; an NBD
/// VM gets none. Raw files are never vhost-user, whatever the map says.
#[test]
fn shared_ram_comes_with_the_transport_and_raw_files_stay_files() {
    let mut cfg = VmConfig::new(
        "web",
        1,
        256,
        vec![Disk {
            name: "img".into(),
            role: Role::Boot,
            source: Source::RawFile("/tmp/a.img".into()),
        }],
    );
    cfg.hotplug_ports = 0;
    let nbd = argv(&cfg, &vhost_paths(&["img"], 16)).unwrap();
    assert!(nbd.iter().any(|a| a == "q35,memory-backend=mem"));
    assert!(!nbd.iter().any(|a| a.contains("vhost-user")), "{nbd:?}");
    assert!(
        nbd.iter()
            .any(|a| a.starts_with("driver=raw,node-name=vol-img"))
    );
    cfg.disk_transport = Some(DiskTransport::Nbd);
    let plain = argv(&cfg, &paths()).unwrap();
    assert!(
        !plain.iter().any(|a| a.contains("memory-backend")),
        "{plain:?}"
    );
    cfg.disk_transport = Some(DiskTransport::VhostUser);
    let shared = argv(&cfg, &paths()).unwrap();
    assert!(
        shared
            .iter()
            .any(|a| a == "memory-backend-memfd,id=mem,size=256M,share=on"),
        "{shared:?}"
    );
    assert_eq!("vhost-user".parse(), Ok(DiskTransport::VhostUser));
    assert_eq!("nbd".parse(), Ok(DiskTransport::Nbd));
    assert!("virtio".parse::<DiskTransport>().is_err());
}
