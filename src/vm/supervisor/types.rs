//! The supervisor's public types: its settings, its errors, and what it
//! reports about VMs.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::vm::config::{ConfigError, DEFAULT_DISK_RECONNECT_DELAY_SECS, DiskTransport, Role};
use crate::vm::hotplug::HotplugError;
use crate::vm::qmp::QmpError;
use crate::vm::volume_host::ExportError;

/// Supervisor settings.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// vbd's own NBD Unix socket, which QEMU connects to.
    pub nbd_socket: PathBuf,
    /// Per-VM directories (QMP socket, pidfile, logs) go below this.
    pub run_dir: PathBuf,
    /// How long QEMU may take to open its QMP socket.
    pub start_timeout: Duration,
    /// How long a QMP command may take.
    pub qmp_timeout: Duration,
    /// How long QEMU gets to exit after SIGTERM before SIGKILL.
    pub sigterm_wait: Duration,
    /// QEMU's `reconnect-delay` for VMs whose config does not set one.
    pub disk_reconnect_delay_secs: u32,
    /// How the disks of VMs whose config does not say reach QEMU.
    pub disk_transport: DiskTransport,
}

impl SupervisorConfig {
    /// Defaults for everything but the two paths.
    pub fn new(nbd_socket: PathBuf, run_dir: PathBuf) -> Self {
        SupervisorConfig {
            nbd_socket,
            run_dir,
            start_timeout: Duration::from_secs(30),
            qmp_timeout: Duration::from_secs(10),
            sigterm_wait: Duration::from_secs(10),
            disk_reconnect_delay_secs: DEFAULT_DISK_RECONNECT_DELAY_SECS,
            disk_transport: DiskTransport::VhostUser,
        }
    }
}

/// Why a supervisor operation failed. A cause is reached through
/// `source()`, not repeated in the message: print with
/// [`crate::error::Chain`].
#[derive(Debug, Error)]
pub enum SupervisorError {
    /// The VM's configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A running VM already has this name.
    #[error("a VM named {0:?} is already running; stop it first or pick another name")]
    Exists(String),
    /// No VM of this name is known.
    #[error("no VM named {0:?}; see vbd vm list")]
    NoVm(String),
    /// The operation needs a running VM and this one has exited.
    #[error("VM {0:?} is not running; stop it to clear its record, then run it again")]
    NotRunning(String),
    /// A disk names neither a volume nor an export this vbd serves.
    #[error(
        "no volume or export named {0:?}; create it (vbd vm volume create) or export it (vbd serve --export)"
    )]
    NoVolume(String),
    /// Another VM already has the volume as a disk.
    #[error("volume {volume:?} is in use by VM {vm:?}; detach it or stop that VM first")]
    VolumeInUse {
        /// The volume asked for.
        volume: String,
        /// The VM using it.
        vm: String,
    },
    /// The volume exists but could not be exported (never
    /// [`ExportError::NoVolume`], which becomes [`SupervisorError::NoVolume`]).
    #[error(transparent)]
    Export(ExportError),
    /// A local file step (run directory, pidfile, log, spawn) failed.
    #[error("{what}")]
    Io {
        /// What was being done, as a sentence for the message.
        what: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited or never opened its QMP socket during start-up.
    #[error("QEMU for VM {vm:?} did not start: {reason}; its output ends with:\n{log_tail}")]
    Start {
        /// The VM's name.
        vm: String,
        /// What went wrong (exit status, or the timeout).
        reason: String,
        /// The last lines of QEMU's log, where QEMU says why.
        log_tail: String,
    },
    /// Talking to QEMU over QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A hot attach or detach failed (and was rolled back).
    #[error(transparent)]
    Hotplug(#[from] HotplugError),
    /// Every hot-plug root port of the VM holds a disk.
    #[error(
        "VM {vm:?} has no free hot-plug port (it has {ports}); detach a volume or run it with more --hotplug-ports"
    )]
    NoFreePort {
        /// The VM's name.
        vm: String,
        /// Hot-plug ports the VM was started with.
        ports: u32,
    },
    /// A launch-time disk cannot be detached while the VM runs.
    #[error(
        "volume {volume:?} was attached to VM {vm:?} at launch, on the root bus, which cannot hot-unplug; stop the VM to release it"
    )]
    ColdAttached {
        /// The VM's name.
        vm: String,
        /// The volume asked for.
        volume: String,
    },
    /// A detach named a volume the VM does not have.
    #[error("volume {volume:?} is not attached to VM {vm:?}")]
    NotAttached {
        /// The VM's name.
        vm: String,
        /// The volume asked for.
        volume: String,
    },
    /// The volume's name cannot be part of QEMU object and device ids.
    #[error(
        "volume name {0:?} cannot name QEMU objects: use a letter first and at most 26 characters"
    )]
    BadVolumeName(String),
    /// QEMU survived SIGKILL (stuck in uninterruptible sleep).
    #[error(
        "QEMU of VM {vm:?} (pid {pid}) did not exit after SIGKILL; it is stuck in the kernel, check its disks and dmesg"
    )]
    Unkillable {
        /// The VM's name.
        vm: String,
        /// QEMU's process id.
        pid: u32,
    },
    /// A VM left by an earlier vbd reconnects its disks to another NBD
    /// socket than this vbd serves, so it cannot be adopted here.
    #[error(
        "VM {vm:?} connects its disks to {theirs}, but this vbd serves {ours}: restart vbd with --unix {theirs} to adopt it"
    )]
    OtherSocket {
        /// The VM's name.
        vm: String,
        /// The socket its disks use.
        theirs: PathBuf,
        /// The socket this vbd serves.
        ours: PathBuf,
    },
    /// The name belongs to a VM an earlier vbd left running that this one
    /// could not adopt; starting another would take its sockets.
    #[error(
        "VM {vm:?} was left running by an earlier vbd (pid {pid}) and not adopted (see this vbd's start-up log); stop that QEMU, or restart vbd once it can be adopted"
    )]
    Unadopted {
        /// The VM's name.
        vm: String,
        /// The pid its run record names.
        pid: u32,
    },
    /// An adopted VM's disk has no volume in this vbd.
    #[error(
        "disk {volume:?} of VM {vm:?} has no volume in this vbd, so the guest's I/O on it waits {delay_secs} s and then fails: give vbd the volume as before (vbd serve --export name={volume},...) and restart it"
    )]
    MissingDisk {
        /// The VM's name.
        vm: String,
        /// The missing volume.
        volume: String,
        /// The disk's reconnect-delay, in seconds.
        delay_secs: u32,
    },
    /// A QEMU left running by an earlier vbd did not answer QMP.
    #[error(
        "VM {vm:?} (pid {pid}) is running but its QMP socket did not answer, so it is not supervised; its disks are served and its run files kept for the next vbd start (is another vbd connected to it?)"
    )]
    AdoptQmp {
        /// The VM's name.
        vm: String,
        /// QEMU's process id.
        pid: u32,
        /// What QMP said, or that it said nothing in time.
        #[source]
        source: QmpError,
    },
    /// A VM's run record could not be read or does not fit its directory.
    #[error("cannot read the run record {path}")]
    Record {
        /// The record file.
        path: PathBuf,
        /// Why it was not usable.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<ExportError> for SupervisorError {
    fn from(e: ExportError) -> Self {
        match e {
            ExportError::NoVolume(v) => SupervisorError::NoVolume(v),
            e => SupervisorError::Export(e),
        }
    }
}

/// Where a VM is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum VmState {
    /// QEMU is up and answered QMP.
    Running,
    /// A stop was requested and is in progress.
    Stopping,
    /// Exited after a stop request or a guest-initiated shutdown.
    Stopped {
        /// How it ended ("guest shut down", "stopped on request (...)").
        reason: String,
    },
    /// Exited without being asked to.
    Crashed {
        /// QEMU's exit status or signal.
        reason: String,
    },
}

/// A VM's disk as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The volume or export behind the disk.
    pub volume: String,
    /// How the guest sees it: boot, data, cloud-init or EFI.
    pub role: Role,
    /// Hot-attached (and so hot-detachable), with its port.
    pub port: Option<String>,
    /// For a VM adopted after a vbd restart: how the disk came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<DiskReconnect>,
}

/// How a disk of an adopted VM came back after vbd restarted, as this vbd
/// can see it: QEMU does not report its NBD reconnects, so vbd times from
/// the old process letting go of the disk until QEMU attached to the
/// export again. QEMU reconnects at the guest's next I/O on the disk and
/// retries 1, 2, 4, 8, then every 16 s later: for a busy disk this is how
/// long its I/O waited; for an idle one, an upper bound.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReconnect {
    /// Milliseconds until QEMU was attached again (to within the 50 ms
    /// this vbd polls at); `None` while it has not.
    pub after_ms: Option<u64>,
    /// `true`: counted from the old vbd's clean stop. `false`: the old vbd
    /// was killed and could not say when, so this counts from the start of
    /// this vbd and the real wait was longer.
    pub from_clean_stop: bool,
    /// Why the disk cannot come back, e.g. its volume is missing here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A VM as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's name, unique on this host.
    pub name: String,
    /// Running, stopping, stopped or crashed (flattened into this JSON).
    #[serde(flatten)]
    pub state: VmState,
    /// QEMU's process id.
    pub pid: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Every disk, launch-time and hot-attached.
    pub disks: Vec<DiskInfo>,
    /// File the guest's serial console is written to.
    pub serial_log: PathBuf,
    /// QEMU's QMP socket, for debugging by hand.
    pub qmp_socket: PathBuf,
    /// When QEMU started, in milliseconds since the Unix epoch (0 if unknown).
    #[serde(default)]
    pub started_at_ms: u64,
    /// When this vbd adopted the VM after a restart (ms since the epoch);
    /// `None` for a VM it started itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_at_ms: Option<u64>,
}

/// What stopping vbd does to its VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmsOnExit {
    /// Stop them in order (power-down, SIGTERM, SIGKILL): the interactive
    /// default.
    #[default]
    Stop,
    /// Leave QEMU running for the next vbd to adopt (the service unit's
    /// choice). A VM with a disk whose data lives in vbd's memory is still
    /// stopped: that disk would not survive.
    Keep,
}

/// How a stop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopOutcome {
    /// The guest shut down after `system_powerdown`.
    Powerdown,
    /// QEMU exited on SIGTERM.
    Sigterm,
    /// QEMU had to be killed.
    Sigkill,
    /// It had already exited; its record was cleared.
    AlreadyExited,
}

/// What the supervisor has seen since it started, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEventCounts {
    /// VMs whose QEMU came up and answered QMP.
    pub starts: u64,
    /// Start requests that failed (bad config, missing volume, QEMU did not come up).
    pub start_failures: u64,
    /// Stops on request that ended with the guest powering off.
    pub powerdowns: u64,
    /// Stops on request that needed SIGTERM.
    pub sigterms: u64,
    /// Stops on request that needed SIGKILL.
    pub sigkills: u64,
    /// Guests that shut down by themselves.
    pub guest_shutdowns: u64,
    /// QEMUs that exited abnormally without being asked.
    pub crashes: u64,
    /// Volumes hot-attached successfully.
    pub attaches: u64,
    /// Hot attaches that failed (and were rolled back).
    pub attach_failures: u64,
    /// Volumes hot-detached successfully.
    pub detaches: u64,
    /// Hot detaches that failed.
    pub detach_failures: u64,
    /// VMs found still running after a vbd restart and supervised again.
    pub adoptions: u64,
    /// VMs whose QEMU exited while vbd was away (also counted as crashes).
    pub adoptions_exited: u64,
    /// Pidfiles naming a pid that another process holds now (not adopted,
    /// that process left alone; also counted as crashes).
    pub adoptions_pid_reused: u64,
    /// Running VMs that could not be adopted (their run files are kept).
    pub adoption_failures: u64,
    /// Disks of adopted VMs whose QEMU attached to their export again.
    pub disk_reconnects: u64,
    /// Summed milliseconds those reconnects took (see [`DiskReconnect`]).
    pub disk_reconnect_ms: u64,
}
