//! A VM's configuration and the pure function that turns it into QEMU argv.
//!
//! Over NBD, every boot and data volume gets its own iothread, an NBD block
//! node on vbd's own socket with `cache.direct=on` (QEMU's `cache=none`),
//! and a `virtio-blk-pci` with one queue per vCPU: the flags that close the
//! gap between a default QEMU disk and the backend's speed. Over
//! vhost-user-blk (the supervisor's default), a boot or data volume is a
//! `vhost-user-blk-pci` on a socket chardev that reconnects, with one queue
//! per vCPU up to what vbd's device offers; guest RAM is then a shared memfd
//! (`share=on`), which vbd maps to reach the guest's buffers. Cloud-init and
//! EFI volumes stay NBD block nodes: a CD-ROM and pflash need QEMU's block
//! layer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a volume is for inside the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The disk the guest boots from (`bootindex=1`).
    Boot,
    /// Any other read-write disk.
    Data,
    /// A cloud-init seed, attached as a read-only CD-ROM.
    CloudInit,
    /// UEFI variable store (or a whole firmware image), attached as pflash.
    Efi,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "boot" => Ok(Role::Boot),
            "data" => Ok(Role::Data),
            "cloud-init" | "cloudinit" => Ok(Role::CloudInit),
            "efi" => Ok(Role::Efi),
            _ => Err(format!(
                "unknown volume role {s:?}; use boot, data, cloud-init or efi"
            )),
        }
    }
}

/// Where a disk's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The vbd export of the same name, over vbd's own Unix socket.
    Export,
    /// A raw image file opened by QEMU itself (for comparisons only).
    RawFile(PathBuf),
}

/// One volume attached to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Volume (and export) name; also names the QEMU objects.
    pub name: String,
    /// How the guest sees the disk: boot, data, cloud-init or EFI.
    pub role: Role,
    /// Where its bytes come from (default: the vbd export of that name).
    #[serde(default = "default_source")]
    pub source: Source,
}

fn default_source() -> Source {
    Source::Export
}

impl Disk {
    /// A disk backed by the vbd export `name`.
    pub fn export(name: &str, role: Role) -> Self {
        Disk {
            name: name.to_owned(),
            role,
            source: Source::Export,
        }
    }
}

/// How the disks this vbd serves reach QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskTransport {
    /// NBD on vbd's socket, through QEMU's block layer and NBD client (at
    /// most 16 requests in flight per disk).
    Nbd,
    /// vhost-user-blk: vbd serves the guest's virtqueues straight from
    /// shared guest memory, one vbd core per queue.
    VhostUser,
}

impl std::str::FromStr for DiskTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nbd" => Ok(DiskTransport::Nbd),
            "vhost-user" => Ok(DiskTransport::VhostUser),
            _ => Err(format!(
                "unknown disk transport {s:?}; use vhost-user or nbd"
            )),
        }
    }
}

/// The QEMU accelerator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accel {
    /// Hardware virtualisation; the production default.
    #[default]
    Kvm,
    /// Multi-threaded software emulation, for hosts where KVM is missing
    /// or unusable (such as nested guests that hang).
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(format!("unknown accelerator {s:?}; use kvm or tcg")),
        }
    }
}

/// Which block flags disks get; `Untuned` exists to measure the difference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskTuning {
    /// iothread per disk, `cache=none`, one queue per vCPU.
    #[default]
    Tuned,
    /// QEMU's defaults: no iothread, host page cache, one queue.
    Untuned,
}

/// Everything that describes one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The VM's name; also names its run directory and QEMU's `-name`.
    pub name: String,
    /// Virtual CPUs; also the queue count of each tuned virtio-blk disk.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// QEMU machine type (default `q35`, which hot-plug needs).
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Accelerator: `kvm` (default) or `tcg`.
    #[serde(default)]
    pub accel: Accel,
    /// `-cpu` model; default `host` under KVM and `max` under TCG.
    #[serde(default)]
    pub cpu: Option<String>,
    /// The VM's volumes, in attachment order.
    pub disks: Vec<Disk>,
    /// Kernel for a direct boot (`-kernel`), skipping firmware and bootloader.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for a direct boot (`-initrd`).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for a direct boot (`-append`).
    #[serde(default)]
    pub append: Option<String>,
    /// Read-only UEFI code image (e.g. OVMF_CODE.fd); with it, the EFI
    /// volume is the variable store in pflash1.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    /// Empty PCIe root ports reserved for hot-attach.
    #[serde(default = "default_hotplug_ports")]
    pub hotplug_ports: u32,
    /// Extra `-device` values, passed through verbatim.
    #[serde(default)]
    pub extra_devices: Vec<String>,
    /// Whether disks get vbd's iothread/cache/queue settings or QEMU's defaults.
    #[serde(default)]
    pub tuning: DiskTuning,
    /// The QEMU binary.
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    /// Seconds an NBD disk holds guest I/O while vbd is away (a restart)
    /// before failing it: QEMU's `reconnect-delay`. 0 fails at once;
    /// unset takes the supervisor's setting (`vbd serve
    /// --disk-reconnect-delay`), [`DEFAULT_DISK_RECONNECT_DELAY_SECS`]
    /// when argv is built without one.
    #[serde(default)]
    pub disk_reconnect_delay_secs: Option<u32>,
    /// How boot and data disks reach QEMU: `vhost-user` or `nbd`. Unset
    /// takes the supervisor's setting (vhost-user unless `vbd serve
    /// --disk-transport nbd`); argv built without one, and run records
    /// written before this setting existed, mean NBD.
    #[serde(default)]
    pub disk_transport: Option<DiskTransport>,
}

fn default_machine() -> String {
    "q35".to_owned()
}
fn default_hotplug_ports() -> u32 {
    4
}
fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

impl VmConfig {
    /// A config with defaults for everything but name, size and disks.
    pub fn new(name: &str, vcpus: u32, memory_mib: u64, disks: Vec<Disk>) -> Self {
        VmConfig {
            name: name.to_owned(),
            vcpus,
            memory_mib,
            machine: default_machine(),
            accel: Accel::default(),
            cpu: None,
            disks,
            kernel: None,
            initrd: None,
            append: None,
            firmware: None,
            hotplug_ports: default_hotplug_ports(),
            extra_devices: Vec::new(),
            tuning: DiskTuning::default(),
            qemu: default_qemu(),
            disk_reconnect_delay_secs: None,
            disk_transport: None,
        }
    }

    /// The transport its boot and data disks use.
    pub fn transport(&self) -> DiskTransport {
        self.disk_transport.unwrap_or(DiskTransport::Nbd)
    }

    /// The `reconnect-delay` its NBD disks get.
    pub fn reconnect_delay_secs(&self) -> u32 {
        self.disk_reconnect_delay_secs
            .unwrap_or(DEFAULT_DISK_RECONNECT_DELAY_SECS)
    }
}

/// How long NBD disks wait for vbd by default. QEMU 7.x reconnects when
/// the guest next does I/O on the disk and retries 1, 2, 4, 8 and then
/// every 16 s later, so a vbd back within 15 s is found by the attempt at
/// 15 s, inside the 30; a vbd gone for good surfaces as guest I/O errors
/// rather than a silent hang.
pub const DEFAULT_DISK_RECONNECT_DELAY_SECS: u32 = 30;

/// Per-run paths the supervisor chooses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPaths {
    /// vbd's NBD Unix socket that QEMU connects to.
    pub nbd_socket: PathBuf,
    /// QEMU's QMP socket, which the supervisor connects to.
    pub qmp_socket: PathBuf,
    /// File QEMU writes its pid to, for adopting it after a vbd restart.
    pub pidfile: PathBuf,
    /// File the guest's serial console goes to.
    pub serial_log: PathBuf,
    /// Disks served over vhost-user-blk, by volume (empty for NBD only).
    #[serde(default)]
    pub vhost: BTreeMap<String, VhostSocket>,
}

/// Where a vhost-user-blk disk's device listens, and what it offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostSocket {
    /// The device's Unix socket, which QEMU connects to.
    pub socket: PathBuf,
    /// Queues the device offers: QEMU refuses to start a device that asks
    /// for more, so a disk gets one per vCPU up to this.
    pub queues: u16,
}

/// Seconds between QEMU's attempts to reach a vhost-user socket that went
/// away (a vbd restart): meanwhile the guest's requests wait, and those in
/// flight are re-submitted from the inflight log once vbd is back.
pub const VHOST_RECONNECT_SECS: u32 = 1;

/// The queues a vhost-user-blk disk gets: one per vCPU, at most what the
/// device offers.
pub fn vhost_queues(vcpus: u32, offered: u16) -> u32 {
    vcpus.clamp(1, u32::from(offered.max(1)))
}

/// Why a config cannot become a QEMU command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The VM's name cannot be part of QEMU ids.
    #[error(
        "name {0:?} cannot name QEMU objects: use a letter first, then up to 25 letters, digits, '-', '_' or '.'"
    )]
    BadName(String),
    /// Zero vCPUs or zero memory.
    #[error("VM {0:?} needs at least one vCPU and some memory")]
    NoResources(String),
    /// One volume appears twice among the disks.
    #[error("volume {0:?} is attached twice; attach each volume once")]
    DuplicateDisk(String),
    /// Two disks have the boot role.
    #[error("more than one boot volume ({0:?} and {1:?}); mark one boot and the others data")]
    TwoBootDisks(String, String),
    /// Two disks have the EFI role.
    #[error("more than one EFI volume ({0:?} and {1:?}); a VM has one variable store")]
    TwoEfiDisks(String, String),
    /// More cloud-init disks than the machine has IDE/SATA ports.
    #[error("{0} cloud-init volumes do not fit the machine's 6 IDE/SATA ports")]
    TooManyCdroms(usize),
    /// Hot-plug ports were asked for on a machine without PCIe root ports.
    #[error(
        "machine {0:?} has no PCIe root ports for hot-plug: use q35, or set hotplug_ports to 0"
    )]
    HotplugNeedsQ35(String),
    /// A path or string would break QEMU's command-line syntax.
    #[error("{0:?} contains a newline, which QEMU's option parser cannot carry")]
    BadValue(String),
}

/// Longest volume name usable in a VM: QEMU ids are at most 31 bytes and
/// the longest prefix is `ioth-`.
pub const MAX_DISK_NAME: usize = 26;

/// Whether `name` can be embedded in QEMU ids (`ioth-<name>`, `vol-<name>`).
pub fn valid_qemu_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && name.len() <= MAX_DISK_NAME
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `machine` is a q35 (PCIe) machine type.
pub fn is_q35(machine: &str) -> bool {
    let base = machine.split(',').next().unwrap_or("");
    base == "q35" || base.starts_with("pc-q35")
}

/// Escapes a value for QEMU's `key=value,...` syntax (commas double).
pub fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

fn path_value(p: &Path) -> Result<String, ConfigError> {
    let s = p.to_string_lossy();
    if s.contains('\n') {
        return Err(ConfigError::BadValue(s.into_owned()));
    }
    Ok(escape(&s))
}

/// QEMU ids of one disk's objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskIds {
    /// The disk's `-object iothread` id (`ioth-<name>`).
    pub iothread: String,
    /// The disk's block node id (`vol-<name>`).
    pub node: String,
    /// The disk's virtio-blk device id (`disk-<name>`).
    pub device: String,
    /// The disk's vhost-user socket chardev id (`chr-<name>`).
    pub chardev: String,
}

/// The ids vbd gives a disk's iothread, block node and device.
pub fn disk_ids(name: &str) -> DiskIds {
    DiskIds {
        iothread: format!("ioth-{name}"),
        node: format!("vol-{name}"),
        device: format!("disk-{name}"),
        chardev: format!("chr-{name}"),
    }
}

/// Id of the `n`th hot-plug root port.
pub fn hotplug_port(n: u32) -> String {
    format!("hp{n}")
}

/// `-blockdev` value for a disk: NBD on vbd's socket (waiting up to
/// `reconnect_delay_secs` for vbd when it goes away; 0 fails at once), or
/// a raw file.
pub fn blockdev(
    disk: &Disk,
    nbd_socket: &Path,
    tuning: DiskTuning,
    read_only: bool,
    reconnect_delay_secs: u32,
) -> Result<String, ConfigError> {
    let node = disk_ids(&disk.name).node;
    let mut v = match &disk.source {
        Source::Export => {
            let mut v = format!(
                "driver=nbd,node-name={node},server.type=unix,server.path={},export={}",
                path_value(nbd_socket)?,
                disk.name
            );
            if reconnect_delay_secs > 0 {
                v.push_str(&format!(",reconnect-delay={reconnect_delay_secs}"));
            }
            v
        }
        Source::RawFile(path) => format!(
            "driver=raw,node-name={node},file.driver=file,file.filename={}{}",
            path_value(path)?,
            if tuning == DiskTuning::Tuned {
                ",file.aio=native"
            } else {
                ""
            }
        ),
    };
    if tuning == DiskTuning::Tuned {
        v.push_str(",cache.direct=on,cache.no-flush=off");
    }
    if read_only {
        v.push_str(",read-only=on");
    }
    Ok(v)
}

/// `-device` value for a virtio-blk disk; `bus` is a hot-plug port or none.
pub fn virtio_blk(disk: &Disk, vcpus: u32, tuning: DiskTuning, bus: Option<&str>) -> String {
    let ids = disk_ids(&disk.name);
    let mut v = format!("virtio-blk-pci,id={},drive={}", ids.device, ids.node);
    if let Some(bus) = bus {
        v.push_str(&format!(",bus={bus}"));
    }
    match tuning {
        DiskTuning::Tuned => v.push_str(&format!(
            ",iothread={},num-queues={}",
            ids.iothread,
            vcpus.max(1)
        )),
        DiskTuning::Untuned => v.push_str(",num-queues=1"),
    }
    if disk.role == Role::Boot {
        v.push_str(",bootindex=1");
    }
    v
}

/// `-chardev` value for a vhost-user disk's socket: a client that
/// reconnects every [`VHOST_RECONNECT_SECS`] when vbd goes away.
pub fn vhost_chardev(disk: &str, socket: &Path) -> Result<String, ConfigError> {
    Ok(format!(
        "socket,id={},path={},reconnect={VHOST_RECONNECT_SECS}",
        disk_ids(disk).chardev,
        path_value(socket)?
    ))
}

/// `-device` value for a vhost-user-blk disk; `bus` is a hot-plug port or none.
pub fn vhost_user_blk(disk: &Disk, vcpus: u32, vhost: &VhostSocket, bus: Option<&str>) -> String {
    let ids = disk_ids(&disk.name);
    let mut v = format!(
        "vhost-user-blk-pci,id={},chardev={}",
        ids.device, ids.chardev
    );
    if let Some(bus) = bus {
        v.push_str(&format!(",bus={bus}"));
    }
    v.push_str(&format!(
        ",num-queues={}",
        vhost_queues(vcpus, vhost.queues)
    ));
    if disk.role == Role::Boot {
        v.push_str(",bootindex=1");
    }
    v
}

/// Id of the shared guest RAM that vhost-user devices map.
pub const SHARED_RAM_ID: &str = "mem";

fn check(cfg: &VmConfig) -> Result<(), ConfigError> {
    if !valid_qemu_name(&cfg.name) {
        return Err(ConfigError::BadName(cfg.name.clone()));
    }
    if cfg.vcpus == 0 || cfg.memory_mib == 0 {
        return Err(ConfigError::NoResources(cfg.name.clone()));
    }
    let mut boot: Option<&str> = None;
    let mut efi: Option<&str> = None;
    for (i, d) in cfg.disks.iter().enumerate() {
        if !valid_qemu_name(&d.name) {
            return Err(ConfigError::BadName(d.name.clone()));
        }
        if cfg.disks[..i].iter().any(|o| o.name == d.name) {
            return Err(ConfigError::DuplicateDisk(d.name.clone()));
        }
        match d.role {
            Role::Boot => match boot {
                Some(b) => return Err(ConfigError::TwoBootDisks(b.into(), d.name.clone())),
                None => boot = Some(&d.name),
            },
            Role::Efi => match efi {
                Some(e) => return Err(ConfigError::TwoEfiDisks(e.into(), d.name.clone())),
                None => efi = Some(&d.name),
            },
            _ => {}
        }
    }
    let cdroms = cfg
        .disks
        .iter()
        .filter(|d| d.role == Role::CloudInit)
        .count();
    if cdroms > 6 {
        return Err(ConfigError::TooManyCdroms(cdroms));
    }
    for s in [&cfg.append].into_iter().flatten() {
        if s.contains('\n') {
            return Err(ConfigError::BadValue(s.clone()));
        }
    }
    Ok(())
}

/// The full QEMU command line (program first), exactly as QEMU sees it.
pub fn argv(cfg: &VmConfig, paths: &RunPaths) -> Result<Vec<String>, ConfigError> {
    check(cfg)?;
    let mut a: Vec<String> = Vec::new();
    let mut push = |k: &str, v: String| {
        a.push(k.to_owned());
        a.push(v);
    };
    let mut head = vec![cfg.qemu.to_string_lossy().into_owned()];
    head.extend(["-no-user-config".into(), "-nodefaults".into()]);

    // Firmware: pflash0 is the code (a read-only file, or the EFI volume
    // itself when no separate code image is given), pflash1 the variables.
    let efi = cfg.disks.iter().find(|d| d.role == Role::Efi);
    let mut machine = escape(&cfg.machine);
    // vhost-user devices read and write guest RAM from vbd's process: it
    // must be a shared memfd (QEMU 7.2 hangs at ring set-up without
    // share=on). A vhost-user VM gets it even without such a disk at
    // launch, so that one can be hot-attached later.
    let shared_ram = cfg.transport() == DiskTransport::VhostUser || !paths.vhost.is_empty();
    if shared_ram {
        machine.push_str(&format!(",memory-backend={SHARED_RAM_ID}"));
    }
    let mut firmware_node = None;
    if let Some(fw) = &cfg.firmware {
        firmware_node = Some(format!(
            "driver=raw,node-name=fw-code,read-only=on,file.driver=file,file.filename={}",
            path_value(fw)?
        ));
        machine.push_str(",pflash0=fw-code");
        if let Some(d) = efi {
            machine.push_str(&format!(",pflash1={}", disk_ids(&d.name).node));
        }
    } else if let Some(d) = efi {
        machine.push_str(&format!(",pflash0={}", disk_ids(&d.name).node));
    }

    push("-name", format!("guest={},debug-threads=on", cfg.name));
    push("-machine", machine);
    push(
        "-accel",
        match cfg.accel {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg => "tcg,thread=multi".into(),
        },
    );
    let cpu = cfg.cpu.clone().unwrap_or_else(|| {
        match cfg.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
        .into()
    });
    push("-cpu", escape(&cpu));
    push("-smp", cfg.vcpus.to_string());
    push("-m", format!("{}M", cfg.memory_mib));
    if shared_ram {
        push(
            "-object",
            format!(
                "memory-backend-memfd,id={SHARED_RAM_ID},size={}M,share=on",
                cfg.memory_mib
            ),
        );
    }
    push("-display", "none".into());
    push("-pidfile", path_value(&paths.pidfile)?);
    push(
        "-chardev",
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            path_value(&paths.qmp_socket)?
        ),
    );
    push("-mon", "chardev=qmp,mode=control".into());
    push(
        "-chardev",
        format!("file,id=serial0,path={}", path_value(&paths.serial_log)?),
    );
    push("-serial", "chardev:serial0".into());
    if let Some(k) = &cfg.kernel {
        push("-kernel", k.to_string_lossy().into_owned());
    }
    if let Some(i) = &cfg.initrd {
        push("-initrd", i.to_string_lossy().into_owned());
    }
    if let Some(s) = &cfg.append {
        push("-append", s.clone());
    }
    if let Some(fw) = firmware_node {
        push("-blockdev", fw);
    }

    let delay = cfg.reconnect_delay_secs();
    let mut cdrom = 0;
    for d in &cfg.disks {
        let ids = disk_ids(&d.name);
        let vhost = paths
            .vhost
            .get(&d.name)
            .filter(|_| d.source == Source::Export);
        if let (Role::Boot | Role::Data, Some(vhost)) = (d.role, vhost) {
            push("-chardev", vhost_chardev(&d.name, &vhost.socket)?);
            push("-device", vhost_user_blk(d, cfg.vcpus, vhost, None));
            continue;
        }
        match d.role {
            Role::Boot | Role::Data => {
                if cfg.tuning == DiskTuning::Tuned {
                    push("-object", format!("iothread,id={}", ids.iothread));
                }
                push(
                    "-blockdev",
                    blockdev(d, &paths.nbd_socket, cfg.tuning, false, delay)?,
                );
                push("-device", virtio_blk(d, cfg.vcpus, cfg.tuning, None));
            }
            Role::CloudInit => {
                push(
                    "-blockdev",
                    blockdev(d, &paths.nbd_socket, cfg.tuning, true, delay)?,
                );
                push(
                    "-device",
                    format!(
                        "ide-cd,id={},drive={},bus=ide.{cdrom}",
                        ids.device, ids.node
                    ),
                );
                cdrom += 1;
            }
            Role::Efi => {
                push(
                    "-blockdev",
                    blockdev(d, &paths.nbd_socket, cfg.tuning, false, delay)?,
                );
            }
        }
    }
    if cfg.hotplug_ports > 0 {
        if !is_q35(&cfg.machine) {
            return Err(ConfigError::HotplugNeedsQ35(cfg.machine.clone()));
        }
        // Native PCIe hot-plug on the root ports: an unplug then completes
        // at once when no guest driver owns the slot, and through pciehp
        // when one does, instead of waiting for ACPI cooperation.
        push(
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off".into(),
        );
    }
    for n in 0..cfg.hotplug_ports {
        push(
            "-device",
            format!(
                "pcie-root-port,id={},bus=pcie.0,chassis={}",
                hotplug_port(n),
                n + 1
            ),
        );
    }
    for dev in &cfg.extra_devices {
        if dev.contains('\n') {
            return Err(ConfigError::BadValue(dev.clone()));
        }
        push("-device", dev.clone());
    }
    head.extend(a);
    Ok(head)
}

#[cfg(test)]
mod tests;
