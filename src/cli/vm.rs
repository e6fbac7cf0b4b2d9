//! `vbd vm …` (including `vbd vm volume …`): thin commands over the
//! control API of a running `vbd serve`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::{ControlArg, print};
use vbd::control::client::ControlClient;
use vbd::control::model::{
    Accel, AttachRequest, CloneRequest, CreateVolume, Disk, DiskInfo, DiskTransport, DiskTuning,
    MAX_READ, ResizeRequest, Role, Source, VmConfig, VmInfo, VmState, VolumeListing,
};
use vbd::size::parse_size;

/// `vbd vm` arguments.
#[derive(Args, Debug)]
pub(crate) struct VmArgs {
    #[command(flatten)]
    control: ControlArg,
    #[command(subcommand)]
    command: VmCommand,
}

/// VM subcommands.
#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Start a VM whose disks are vbd volumes.
    Run(Box<RunArgs>),
    /// Stop a VM: ACPI power-down, then SIGTERM, then SIGKILL.
    Stop {
        name: String,
        /// Seconds the guest gets to power off before SIGTERM.
        #[arg(long, default_value_t = 30.0)]
        grace: f64,
    },
    /// List VMs, running and exited.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Hot-attach a volume to a running VM.
    Attach {
        vm: String,
        volume: String,
        #[arg(long)]
        read_only: bool,
    },
    /// Hot-detach a volume from a running VM.
    Detach {
        vm: String,
        volume: String,
        /// Seconds to wait for the guest to release the disk.
        #[arg(long, default_value_t = 30.0)]
        wait: f64,
    },
    /// Create, list, delete and read the volumes VMs use.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshot every object-volume disk of a running VM (VOLUME@SNAP each).
    Snapshot { vm: String, snapshot: String },
}

/// `vbd vm run` arguments.
#[derive(Args, Debug)]
struct RunArgs {
    name: String,
    /// A disk: NAME[:ROLE][:raw=PATH]; ROLE is boot, data, cloud-init or efi
    /// (default: boot for the first, data for the rest); raw=PATH has QEMU
    /// open a raw file itself instead of the vbd export (comparisons only).
    #[arg(long = "volume", value_name = "SPEC")]
    volumes: Vec<String>,
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    #[arg(long, default_value = "q35")]
    machine: String,
    /// kvm, or tcg where KVM is missing or unusable.
    #[arg(long, default_value = "kvm")]
    accel: Accel,
    /// -cpu model (default: host under kvm, max under tcg).
    #[arg(long)]
    cpu: Option<String>,
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    append: Option<String>,
    /// UEFI code image (e.g. /usr/share/OVMF/OVMF_CODE_4M.fd).
    #[arg(long)]
    firmware: Option<PathBuf>,
    /// Empty PCIe root ports for hot-attach.
    #[arg(long, default_value_t = 4)]
    hotplug_ports: u32,
    /// Extra -device value (repeatable).
    #[arg(long = "device", value_name = "DEVICE")]
    devices: Vec<String>,
    /// QEMU's default block flags (no iothread, host cache, one queue), to
    /// measure what the tuned ones buy.
    #[arg(long)]
    untuned: bool,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Seconds the disks hold guest I/O while vbd is away before failing
    /// it (default: vbd serve's --disk-reconnect-delay); 0 fails at once.
    #[arg(long, value_name = "SECS")]
    disk_reconnect_delay: Option<u32>,
    /// How boot and data disks reach QEMU: vhost-user (vbd serves the
    /// guest's virtqueues from shared memory) or nbd (QEMU's NBD client).
    /// Default: vbd serve's --disk-transport. Cloud-init and EFI volumes
    /// are NBD either way.
    #[arg(long, value_name = "nbd|vhost-user")]
    disk_transport: Option<DiskTransport>,
}

/// Parses a `--volume` spec; `first` picks the default role.
fn parse_disk(spec: &str, first: bool) -> Result<Disk, String> {
    // A raw path may itself contain ':', so it is split off first.
    let (head, source) = match spec.split_once(":raw=") {
        Some((h, path)) => (h, Source::RawFile(PathBuf::from(path))),
        None => (spec, Source::Export),
    };
    let (name, role) = match head.split_once(':') {
        Some((n, r)) => (n, r.parse()?),
        None => (head, if first { Role::Boot } else { Role::Data }),
    };
    if name.is_empty() {
        return Err(format!("--volume {spec:?} needs a volume name"));
    }
    Ok(Disk {
        name: name.to_owned(),
        role,
        source,
    })
}

impl RunArgs {
    /// The VM config these arguments describe.
    fn config(&self) -> Result<VmConfig, String> {
        let disks = self
            .volumes
            .iter()
            .enumerate()
            .map(|(i, s)| parse_disk(s, i == 0))
            .collect::<Result<Vec<_>, _>>()?;
        let mut cfg = VmConfig::new(&self.name, self.vcpus, (self.memory >> 20).max(1), disks);
        cfg.machine = self.machine.clone();
        cfg.accel = self.accel;
        cfg.cpu = self.cpu.clone();
        cfg.kernel = self.kernel.clone();
        cfg.initrd = self.initrd.clone();
        cfg.append = self.append.clone();
        cfg.firmware = self.firmware.clone();
        cfg.hotplug_ports = self.hotplug_ports;
        cfg.extra_devices = self.devices.clone();
        cfg.tuning = if self.untuned {
            DiskTuning::Untuned
        } else {
            DiskTuning::Tuned
        };
        cfg.qemu = self.qemu.clone();
        cfg.disk_reconnect_delay_secs = self.disk_reconnect_delay;
        cfg.disk_transport = self.disk_transport;
        Ok(cfg)
    }
}

/// A VM state as the tables show it.
pub(crate) fn state_text(s: &VmState) -> String {
    match s {
        VmState::Running => "running".into(),
        VmState::Stopping => "stopping".into(),
        VmState::Stopped { reason } => format!("stopped ({reason})"),
        VmState::Crashed { reason } => format!("CRASHED ({reason})"),
    }
}

/// A VM's state with how it came to this vbd: "running, adopted".
pub(crate) fn vm_state_text(v: &VmInfo) -> String {
    let s = state_text(&v.state);
    match (&v.state, v.adopted_at_ms) {
        (VmState::Running | VmState::Stopping, Some(_)) => format!("{s}, adopted"),
        _ => s,
    }
}

/// A VM's disks as the tables show them: `name:role`, or `name@port` if hot-attached.
pub(crate) fn disks_text(d: &[DiskInfo]) -> String {
    d.iter()
        .map(|d| match &d.port {
            Some(p) => format!("{}@{p}", d.volume),
            None => format!(
                "{}:{}",
                d.volume,
                serde_json::to_value(d.role)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn secs(v: f64, what: &str) -> Result<f64> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("--{what} must be a number of seconds");
    }
    Ok(v)
}

/// Runs a `vbd vm` subcommand.
pub(crate) fn run(args: VmArgs) -> Result<()> {
    let c = args.control.client();
    let text = match args.command {
        VmCommand::Run(run) => {
            let cfg = run.config().map_err(anyhow::Error::msg)?;
            let info = c.start_vm(&cfg)?;
            format!(
                "started VM {} (pid {}); serial log {}\n",
                info.name,
                info.pid,
                info.serial_log.display()
            )
        }
        VmCommand::Stop { name, grace } => {
            let outcome = serde_json::to_value(c.stop_vm(&name, secs(grace, "grace")?)?)?;
            format!("stopped VM {name} ({})\n", outcome.as_str().unwrap_or("?"))
        }
        VmCommand::List { json: true } => {
            format!("{}\n", serde_json::to_string_pretty(&c.vms()?)?)
        }
        VmCommand::List { json: false } => vm_table(&c.vms()?),
        VmCommand::Attach {
            vm,
            volume,
            read_only,
        } => {
            let d = c.attach(&vm, &AttachRequest { volume, read_only })?;
            format!(
                "attached {} to VM {vm} on port {}\n",
                d.volume,
                d.port.unwrap_or_default()
            )
        }
        VmCommand::Detach { vm, volume, wait } => {
            c.detach(&vm, &volume, secs(wait, "wait")?)?;
            format!("detached {volume} from VM {vm}\n")
        }
        VmCommand::Volume(cmd) => return run_volume(&c, cmd),
        VmCommand::Snapshot { vm, snapshot } => c
            .snapshot_vm(&vm, &snapshot)?
            .iter()
            .map(|d| format!("snapshot {}@{} taken\n", d.volume, d.snapshot.name))
            .collect(),
    };
    print(text.as_bytes())
}

/// `vbd vm list`'s table.
fn vm_table(vms: &[VmInfo]) -> String {
    let mut t = format!(
        "{:<16} {:<10} {:>4} {:>7}  {:<30} DISKS\n",
        "NAME", "PID", "CPUS", "MEMORY", "STATE"
    );
    for v in vms {
        t += &format!(
            "{:<16} {:<10} {:>4} {:>6}M  {:<30} {}\n",
            v.name,
            v.pid,
            v.vcpus,
            v.memory_mib,
            vm_state_text(v),
            disks_text(&v.disks)
        );
    }
    t
}

/// `vbd vm volume list`'s table.
fn volume_table(vols: &[VolumeListing]) -> String {
    let mut t = format!(
        "{:<20} {:<8} {:>14} {:<8} {:<12} DESCRIPTION\n",
        "NAME", "BACKEND", "SIZE", "EXPORTED", "USED BY"
    );
    for v in vols {
        t += &format!(
            "{:<20} {:<8} {:>14} {:<8} {:<12} {}\n",
            v.name,
            v.backend,
            v.size,
            if v.exported { "yes" } else { "no" },
            v.used_by.as_deref().unwrap_or("-"),
            v.description
        );
    }
    t
}

/// `vbd vm volume` subcommands.
#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a volume in the running vbd (memory, file or object backend).
    Create {
        name: String,
        /// memory, file or object.
        #[arg(long, default_value = "memory")]
        backend: String,
        /// Size, e.g. 1G (required for memory; creates a missing file).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Backing file (file backend).
        #[arg(long)]
        path: Option<PathBuf>,
        /// Store URL (object backend; default: the server's local store).
        #[arg(long)]
        store: Option<String>,
        /// Cache size or "auto" (object backend).
        #[arg(long)]
        cache: Option<String>,
        #[arg(long)]
        read_only: bool,
    },
    /// List volumes and static exports.
    List,
    /// Forget a volume (a file backend's file stays on disk).
    Delete { name: String },
    /// Snapshot an object volume the server has open: NAME@SNAP.
    Snapshot { name: String },
    /// Clone NAME@SNAP into NEW, in the same store.
    Clone {
        snapshot: String,
        new: String,
        /// Also open the clone here, ready to attach to a VM.
        #[arg(long)]
        open: bool,
    },
    /// Resize an object volume the server has open; clients see the new size.
    Resize {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Copy bytes of a volume to stdout.
    Read {
        name: String,
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
        #[arg(long, value_parser = parse_size)]
        length: u64,
    },
}

/// Runs a `vbd vm volume` subcommand.
fn run_volume(c: &ControlClient, command: VolumeCommand) -> Result<()> {
    let text = match command {
        VolumeCommand::Create {
            name,
            backend,
            size,
            path,
            store,
            cache,
            read_only,
        } => {
            let mut options = serde_json::Map::new();
            if let Some(p) = path {
                options.insert("path".into(), Value::from(p.to_string_lossy().into_owned()));
            }
            if let Some(s) = store {
                options.insert("store".into(), Value::from(s));
            }
            if let Some(c) = cache {
                options.insert("cache".into(), Value::from(c));
            }
            let v = c.create_volume(&CreateVolume {
                name,
                backend,
                size,
                read_only,
                options,
            })?;
            format!(
                "created volume {} ({} bytes): {}\n",
                v.name, v.size, v.description
            )
        }
        VolumeCommand::List => volume_table(&c.volumes()?),
        VolumeCommand::Delete { name } => {
            c.delete_volume(&name)?;
            format!("deleted volume {name}\n")
        }
        VolumeCommand::Read {
            name,
            offset,
            length,
        } => return read_volume(c, &name, offset, length),
        VolumeCommand::Snapshot { name } => {
            let Some((volume, snap)) = name.split_once('@') else {
                bail!("{name:?}: name the snapshot as VOLUME@SNAPSHOT");
            };
            let m = c.snapshot(volume, snap)?;
            format!("snapshot {volume}@{} taken\n", m.name)
        }
        VolumeCommand::Clone {
            snapshot,
            new,
            open,
        } => {
            let Some((volume, snap)) = snapshot.split_once('@') else {
                bail!("{snapshot:?}: name the snapshot as VOLUME@SNAPSHOT");
            };
            let r = c.clone_volume(
                volume,
                &CloneRequest {
                    snapshot: snap.to_owned(),
                    name: new,
                    open,
                },
            )?;
            format!(
                "created clone {} of {} ({} bytes){}\n",
                r.name,
                r.parent,
                r.size,
                if r.opened { ", open" } else { "" }
            )
        }
        VolumeCommand::Resize {
            name,
            size,
            allow_shrink,
        } => {
            let r = c.resize(&name, &ResizeRequest { size, allow_shrink })?;
            format!("resized {name} from {} to {} bytes\n", r.old_size, r.size)
        }
    };
    print(text.as_bytes())
}

/// `vbd vm volume read`: copies a volume's bytes to stdout, one API read
/// (at most [`MAX_READ`]) at a time.
fn read_volume(c: &ControlClient, name: &str, offset: u64, length: u64) -> Result<()> {
    let mut done = 0;
    while done < length {
        let n = (length - done).min(MAX_READ);
        print(&c.read_volume(name, offset + done, n)?)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        assert_eq!(
            parse_disk("root", true).unwrap(),
            Disk::export("root", Role::Boot)
        );
        assert_eq!(
            parse_disk("db", false).unwrap(),
            Disk::export("db", Role::Data)
        );
        assert_eq!(
            parse_disk("seed:cloud-init", false).unwrap(),
            Disk::export("seed", Role::CloudInit)
        );
        assert_eq!(
            parse_disk("raw:data:raw=/tmp/a:b.img", true).unwrap(),
            Disk {
                name: "raw".into(),
                role: Role::Data,
                source: Source::RawFile("/tmp/a:b.img".into())
            }
        );
        assert!(
            parse_disk("x:tape", false)
                .unwrap_err()
                .contains("unknown volume role")
        );
        assert!(parse_disk("", false).is_err());
    }
}
