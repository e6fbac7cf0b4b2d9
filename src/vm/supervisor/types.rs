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
}
