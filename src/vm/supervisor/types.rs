//! The supervisor's public types: its settings, its errors, and what it
//! reports about VMs.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::vm::config::{ConfigError, DEFAULT_DISK_RECONNECT_DELAY_SECS, Role};
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
        }
    }
}

/// Why a supervisor operation failed. A cause is reached through
/// `source()`, not repeated in the message: print with
/// [`crate::error::Chain`].
#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("a VM named {0:?} is already running; stop it first or pick another name")]
    Exists(String),
    #[error("no VM named {0:?}; see vbd vm list")]
    NoVm(String),
    #[error("VM {0:?} is not running; stop it to clear its record, then run it again")]
    NotRunning(String),
    #[error(
        "no volume or export named {0:?}; create it (vbd vm volume create) or export it (vbd serve --export)"
    )]
    NoVolume(String),
    #[error("volume {volume:?} is in use by VM {vm:?}; detach it or stop that VM first")]
    VolumeInUse { volume: String, vm: String },
    /// The volume exists but could not be exported (never
    /// [`ExportError::NoVolume`], which becomes [`SupervisorError::NoVolume`]).
    #[error(transparent)]
    Export(ExportError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU for VM {vm:?} did not start: {reason}; its output ends with:\n{log_tail}")]
    Start {
        vm: String,
        reason: String,
        log_tail: String,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Hotplug(#[from] HotplugError),
    #[error(
        "VM {vm:?} has no free hot-plug port (it has {ports}); detach a volume or run it with more --hotplug-ports"
    )]
    NoFreePort { vm: String, ports: u32 },
    #[error(
        "volume {volume:?} was attached to VM {vm:?} at launch, on the root bus, which cannot hot-unplug; stop the VM to release it"
    )]
    ColdAttached { vm: String, volume: String },
    #[error("volume {volume:?} is not attached to VM {vm:?}")]
    NotAttached { vm: String, volume: String },
    #[error(
        "volume name {0:?} cannot name QEMU objects: use a letter first and at most 26 characters"
    )]
    BadVolumeName(String),
    #[error(
        "QEMU of VM {vm:?} (pid {pid}) did not exit after SIGKILL; it is stuck in the kernel, check its disks and dmesg"
    )]
    Unkillable { vm: String, pid: u32 },
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
    Running,
    Stopping,
    /// Exited after a stop request or a guest-initiated shutdown.
    Stopped {
        reason: String,
    },
    /// Exited without being asked to.
    Crashed {
        reason: String,
    },
}

/// A VM's disk as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub volume: String,
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
    pub name: String,
    #[serde(flatten)]
    pub state: VmState,
    pub pid: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskInfo>,
    pub serial_log: PathBuf,
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
    pub attaches: u64,
    pub attach_failures: u64,
    pub detaches: u64,
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
