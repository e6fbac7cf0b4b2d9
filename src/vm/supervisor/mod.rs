//! Runs QEMU VMs whose disks are exports of this vbd process: starts the
//! exports, launches and watches QEMU, reports crashes, stops VMs in
//! escalating steps and cleans up sockets and exports, and hot-plugs
//! volumes over QMP.

pub mod process;

use crate::lock::MutexExt;
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qapi::qmp::system_powerdown;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::config::{
    ConfigError, Disk, DiskTuning, Role, RunPaths, Source, VmConfig, argv, hotplug_port,
    valid_qemu_name,
};
use super::hotplug::{self, AttachSpec, HotplugError};
use super::qmp::{Qmp, QmpError};
use crate::control::volumes::VolumeCatalog;
use crate::server::{Registry, RegistryError};
use process::{Exit, Process};

/// How long a SIGKILLed QEMU may take to be reaped.
const SIGKILL_WAIT: Duration = Duration::from_secs(10);

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
        }
    }
}

/// Why a supervisor operation failed.
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
    #[error("cannot export volume: {0}")]
    Export(#[from] RegistryError),
    #[error("{what}: {source}")]
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

struct HotDisk {
    port: String,
    owned_export: bool,
}

struct Vm {
    config: VmConfig,
    paths: RunPaths,
    process: Process,
    qmp: Qmp,
    state: Mutex<VmState>,
    stopping: AtomicBool,
    /// Exports started for this VM at launch, removed when it exits.
    owned: Vec<String>,
    hot: Mutex<BTreeMap<String, HotDisk>>,
    /// Serialises attach and detach on this VM.
    op: tokio::sync::Mutex<()>,
    cleaned: watch::Receiver<bool>,
}

impl Vm {
    fn state(&self) -> VmState {
        self.state.locked().clone()
    }

    fn set_state(&self, s: VmState) {
        *self.state.locked() = s;
    }

    fn alive(&self) -> bool {
        matches!(self.state(), VmState::Running | VmState::Stopping)
    }

    fn uses(&self, volume: &str) -> bool {
        self.config.disks.iter().any(|d| d.name == volume) || self.hot.locked().contains_key(volume)
    }

    fn info(&self) -> VmInfo {
        let mut disks: Vec<DiskInfo> = self
            .config
            .disks
            .iter()
            .map(|d| DiskInfo {
                volume: d.name.clone(),
                role: d.role,
                port: None,
            })
            .collect();
        for (v, h) in self.hot.locked().iter() {
            disks.push(DiskInfo {
                volume: v.clone(),
                role: Role::Data,
                port: Some(h.port.clone()),
            });
        }
        VmInfo {
            name: self.config.name.clone(),
            state: self.state(),
            pid: self.process.pid,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            disks,
            serial_log: self.paths.serial_log.clone(),
            qmp_socket: self.paths.qmp_socket.clone(),
        }
    }

    async fn wait_cleaned(&self) {
        let mut rx = self.cleaned.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Runs and tracks VMs.
pub struct Supervisor {
    cfg: SupervisorConfig,
    registry: Arc<Registry>,
    catalog: Arc<VolumeCatalog>,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    /// Serialises decisions about which VM holds which volume.
    volumes: tokio::sync::Mutex<()>,
    events: Events,
}

/// Lifecycle counters, bumped a few times per VM.
#[derive(Default)]
struct Events {
    starts: AtomicU64,
    start_failures: AtomicU64,
    powerdowns: AtomicU64,
    sigterms: AtomicU64,
    sigkills: AtomicU64,
    guest_shutdowns: AtomicU64,
    crashes: AtomicU64,
    attaches: AtomicU64,
    attach_failures: AtomicU64,
    detaches: AtomicU64,
    detach_failures: AtomicU64,
}

fn count<T, E>(r: &Result<T, E>, ok: &AtomicU64, failed: &AtomicU64) {
    if r.is_ok() { ok } else { failed }.fetch_add(1, Ordering::Relaxed);
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

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

fn remove_if_present(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %p.display(), "cannot remove: {e}"),
    }
}

impl Supervisor {
    /// A supervisor whose VMs use `registry`'s server and `catalog`'s volumes.
    pub fn new(
        cfg: SupervisorConfig,
        registry: Arc<Registry>,
        catalog: Arc<VolumeCatalog>,
    ) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            cfg,
            registry,
            catalog,
            vms: Mutex::new(BTreeMap::new()),
            volumes: tokio::sync::Mutex::new(()),
            events: Events::default(),
        })
    }

    /// Lifecycle counters so far.
    pub fn events(&self) -> VmEventCounts {
        let e = &self.events;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VmEventCounts {
            starts: get(&e.starts),
            start_failures: get(&e.start_failures),
            powerdowns: get(&e.powerdowns),
            sigterms: get(&e.sigterms),
            sigkills: get(&e.sigkills),
            guest_shutdowns: get(&e.guest_shutdowns),
            crashes: get(&e.crashes),
            attaches: get(&e.attaches),
            attach_failures: get(&e.attach_failures),
            detaches: get(&e.detaches),
            detach_failures: get(&e.detach_failures),
        }
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Vm>>> {
        self.vms.locked()
    }

    fn get(&self, name: &str) -> Result<Arc<Vm>, SupervisorError> {
        self.vms()
            .get(name)
            .cloned()
            .ok_or_else(|| SupervisorError::NoVm(name.to_owned()))
    }

    /// Which running VM holds `volume`, if any.
    pub fn user_of(&self, volume: &str) -> Option<String> {
        self.vms()
            .values()
            .find(|vm| vm.alive() && vm.uses(volume))
            .map(|vm| vm.config.name.clone())
    }

    /// Exports `volume` unless it already is; `true` if this call added it.
    fn ensure_export(&self, volume: &str, read_only: bool) -> Result<bool, SupervisorError> {
        if self.registry.by_name(volume).is_some() {
            return Ok(false);
        }
        let (vol, _) = self
            .catalog
            .get(volume)
            .ok_or_else(|| SupervisorError::NoVolume(volume.to_owned()))?;
        self.registry.add(volume, vol, read_only)?;
        info!(volume, "export started for a VM");
        Ok(true)
    }

    fn drop_export(&self, volume: &str) {
        match self.registry.remove(volume) {
            Ok(_) => info!(volume, "export removed"),
            Err(e) => warn!(volume, "cannot remove export: {e}"),
        }
    }

    /// Every VM, running or exited, by name.
    pub fn list(&self) -> Vec<VmInfo> {
        self.vms().values().map(|vm| vm.info()).collect()
    }

    /// Starts the exports for `config`'s volumes, then QEMU, and returns
    /// once QMP answers.
    pub async fn start(self: &Arc<Self>, config: VmConfig) -> Result<VmInfo, SupervisorError> {
        let name = config.name.clone();
        let r = self.start_vm(config).await;
        count(&r, &self.events.starts, &self.events.start_failures);
        if let Err(e) = &r {
            warn!(vm = %name, "VM did not start: {e}");
        }
        r
    }

    async fn start_vm(self: &Arc<Self>, config: VmConfig) -> Result<VmInfo, SupervisorError> {
        let _g = self.volumes.lock().await;
        let name = config.name.clone();
        if self.vms().get(&name).is_some_and(|old| old.alive()) {
            return Err(SupervisorError::Exists(name));
        }
        let dir = self.cfg.run_dir.join(&name);
        let paths = RunPaths {
            nbd_socket: self.cfg.nbd_socket.clone(),
            qmp_socket: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            serial_log: dir.join("serial.log"),
        };
        let args = argv(&config, &paths)?;
        for d in &config.disks {
            if let Some(vm) = self.user_of(&d.name) {
                return Err(SupervisorError::VolumeInUse {
                    volume: d.name.clone(),
                    vm,
                });
            }
        }
        let mut owned = Vec::new();
        let started = self.launch(&config, &paths, &dir, &args, &mut owned).await;
        let (process, qmp) = match started {
            Ok(p) => p,
            Err(e) => {
                for v in &owned {
                    self.drop_export(v);
                }
                remove_if_present(&paths.qmp_socket);
                remove_if_present(&paths.pidfile);
                return Err(e);
            }
        };
        let (cleaned_tx, cleaned) = watch::channel(false);
        let vm = Arc::new(Vm {
            config,
            paths,
            process,
            qmp,
            state: Mutex::new(VmState::Running),
            stopping: AtomicBool::new(false),
            owned,
            hot: Mutex::new(BTreeMap::new()),
            op: tokio::sync::Mutex::new(()),
            cleaned,
        });
        info!(vm = %name, pid = vm.process.pid, "VM started");
        self.vms().insert(name, vm.clone());
        let me = self.clone();
        let watched = vm.clone();
        tokio::spawn(async move {
            let exit = watched.process.wait_exit().await;
            me.exited(&watched, exit);
            let _ = cleaned_tx.send(true);
        });
        Ok(vm.info())
    }

    async fn launch(
        &self,
        config: &VmConfig,
        paths: &RunPaths,
        dir: &Path,
        args: &[String],
        owned: &mut Vec<String>,
    ) -> Result<(Process, Qmp), SupervisorError> {
        for d in &config.disks {
            if d.source == Source::Export
                && self.ensure_export(&d.name, d.role == Role::CloudInit)?
            {
                owned.push(d.name.clone());
            }
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(format!("cannot create {}", dir.display())))?;
        remove_if_present(&paths.qmp_socket);
        remove_if_present(&paths.pidfile);
        let log = dir.join("qemu.log");
        let process = Process::spawn(args, &log)
            .map_err(io_err(format!("cannot run {}", config.qemu.display())))?;
        let deadline = Instant::now() + self.cfg.start_timeout;
        let fail = |reason: String| SupervisorError::Start {
            vm: config.name.clone(),
            reason,
            log_tail: log_tail(&log),
        };
        loop {
            if let Some(exit) = process.exited() {
                return Err(fail(format!("QEMU exited at once ({exit})")));
            }
            if paths.qmp_socket.exists() {
                match Qmp::connect(&paths.qmp_socket, self.cfg.qmp_timeout).await {
                    Ok((qmp, _events)) => return Ok((process, qmp)),
                    Err(QmpError::Connect { .. }) => {}
                    Err(e) => {
                        process.signal(libc::SIGKILL);
                        process.wait(Duration::from_secs(5)).await;
                        return Err(fail(format!("QMP failed: {e}")));
                    }
                }
            }
            if Instant::now() > deadline {
                process.signal(libc::SIGKILL);
                process.wait(Duration::from_secs(5)).await;
                return Err(fail(format!(
                    "no QMP socket after {:?}",
                    self.cfg.start_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Records how `vm` ended and releases what it held.
    fn exited(&self, vm: &Vm, exit: Exit) {
        let requested = vm.stopping.load(Ordering::SeqCst);
        let e = &self.events;
        let state = if requested {
            VmState::Stopped {
                reason: format!("stopped on request ({exit})"),
            }
        } else if exit.clean() {
            info!(vm = %vm.config.name, pid = vm.process.pid, "guest shut down");
            e.guest_shutdowns.fetch_add(1, Ordering::Relaxed);
            VmState::Stopped {
                reason: "guest shut down".into(),
            }
        } else {
            error!(vm = %vm.config.name, pid = vm.process.pid, %exit, "QEMU crashed");
            e.crashes.fetch_add(1, Ordering::Relaxed);
            VmState::Crashed {
                reason: format!("QEMU {exit}"),
            }
        };
        for v in &vm.owned {
            self.drop_export(v);
        }
        let hot = std::mem::take(&mut *vm.hot.locked());
        for (v, h) in hot {
            if h.owned_export {
                self.drop_export(&v);
            }
        }
        remove_if_present(&vm.paths.qmp_socket);
        remove_if_present(&vm.paths.pidfile);
        vm.set_state(state);
    }

    /// Stops a VM: `system_powerdown`, then SIGTERM, then SIGKILL, each
    /// after a bounded wait; returns once its exports and sockets are gone.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<StopOutcome, SupervisorError> {
        let vm = self.get(name)?;
        if !vm.alive() {
            vm.wait_cleaned().await;
            self.forget(name, &vm);
            return Ok(StopOutcome::AlreadyExited);
        }
        vm.stopping.store(true, Ordering::SeqCst);
        vm.set_state(VmState::Stopping);
        info!(vm = name, "stopping: system_powerdown");
        let outcome = if let Err(e) = vm
            .qmp
            .execute_for(system_powerdown {}, self.cfg.qmp_timeout)
            .await
            && vm.process.exited().is_none()
        {
            warn!(vm = name, "system_powerdown failed: {e}");
            self.escalate(&vm).await?
        } else if vm.process.wait(grace).await.is_some() {
            StopOutcome::Powerdown
        } else {
            self.escalate(&vm).await?
        };
        vm.wait_cleaned().await;
        self.forget(name, &vm);
        let e = &self.events;
        let counter = match outcome {
            StopOutcome::Powerdown => Some(&e.powerdowns),
            StopOutcome::Sigterm => Some(&e.sigterms),
            StopOutcome::Sigkill => Some(&e.sigkills),
            StopOutcome::AlreadyExited => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        info!(vm = name, pid = vm.process.pid, ?outcome, "VM stopped");
        Ok(outcome)
    }

    async fn escalate(&self, vm: &Vm) -> Result<StopOutcome, SupervisorError> {
        info!(vm = %vm.config.name, "guest did not power off; sending SIGTERM");
        vm.process.signal(libc::SIGTERM);
        if vm.process.wait(self.cfg.sigterm_wait).await.is_some() {
            return Ok(StopOutcome::Sigterm);
        }
        warn!(vm = %vm.config.name, "QEMU ignored SIGTERM; sending SIGKILL");
        vm.process.signal(libc::SIGKILL);
        if vm.process.wait(SIGKILL_WAIT).await.is_none() {
            error!(vm = %vm.config.name, pid = vm.process.pid, "QEMU survived SIGKILL (stuck in the kernel?)");
            return Err(SupervisorError::Unkillable {
                vm: vm.config.name.clone(),
                pid: vm.process.pid,
            });
        }
        Ok(StopOutcome::Sigkill)
    }

    fn forget(&self, name: &str, vm: &Arc<Vm>) {
        let mut vms = self.vms();
        if vms.get(name).is_some_and(|v| Arc::ptr_eq(v, vm)) {
            vms.remove(name);
        }
    }

    /// Stops every VM (used when vbd itself shuts down).
    pub async fn stop_all(self: &Arc<Self>, grace: Duration) {
        let names: Vec<String> = self.vms().keys().cloned().collect();
        let mut tasks = Vec::new();
        for n in names {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = me.stop(&n, grace).await {
                    warn!(vm = %n, "stop failed: {e}");
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    fn running(&self, name: &str) -> Result<Arc<Vm>, SupervisorError> {
        let vm = self.get(name)?;
        if vm.state() != VmState::Running {
            return Err(SupervisorError::NotRunning(name.to_owned()));
        }
        Ok(vm)
    }

    /// Hot-attaches `volume` to a running VM on a free hot-plug port.
    pub async fn attach(
        &self,
        vm_name: &str,
        volume: &str,
        read_only: bool,
    ) -> Result<DiskInfo, SupervisorError> {
        let r = self.attach_volume(vm_name, volume, read_only).await;
        count(&r, &self.events.attaches, &self.events.attach_failures);
        match &r {
            Ok(d) => info!(
                vm = vm_name,
                volume,
                port = d.port.as_deref().unwrap_or("-"),
                read_only,
                "volume hot-attached"
            ),
            Err(e) => warn!(vm = vm_name, volume, "hot attach failed: {e}"),
        }
        r
    }

    async fn attach_volume(
        &self,
        vm_name: &str,
        volume: &str,
        read_only: bool,
    ) -> Result<DiskInfo, SupervisorError> {
        if !valid_qemu_name(volume) {
            return Err(SupervisorError::BadVolumeName(volume.to_owned()));
        }
        let _g = self.volumes.lock().await;
        let vm = self.running(vm_name)?;
        let _op = vm.op.lock().await;
        if let Some(user) = self.user_of(volume) {
            return Err(SupervisorError::VolumeInUse {
                volume: volume.to_owned(),
                vm: user,
            });
        }
        let port = {
            let hot = vm.hot.locked();
            (0..vm.config.hotplug_ports)
                .map(hotplug_port)
                .find(|p| !hot.values().any(|h| &h.port == p))
        }
        .ok_or_else(|| SupervisorError::NoFreePort {
            vm: vm_name.to_owned(),
            ports: vm.config.hotplug_ports,
        })?;
        let owned_export = self.ensure_export(volume, read_only)?;
        let spec = AttachSpec {
            volume,
            nbd_socket: &self.cfg.nbd_socket,
            bus: &port,
            queues: vm.config.vcpus,
            tuning: vm.config.tuning,
            read_only,
        };
        if let Err(e) = hotplug::attach(&vm.qmp, &spec).await {
            if owned_export {
                self.drop_export(volume);
            }
            return Err(e.into());
        }
        vm.hot.locked().insert(
            volume.to_owned(),
            HotDisk {
                port: port.clone(),
                owned_export,
            },
        );
        Ok(DiskInfo {
            volume: volume.to_owned(),
            role: Role::Data,
            port: Some(port),
        })
    }

    /// Hot-detaches `volume`, waiting up to `wait` for the guest to let go.
    pub async fn detach(
        &self,
        vm_name: &str,
        volume: &str,
        wait: Duration,
    ) -> Result<(), SupervisorError> {
        let r = self.detach_volume(vm_name, volume, wait).await;
        count(&r, &self.events.detaches, &self.events.detach_failures);
        match &r {
            Ok(()) => info!(vm = vm_name, volume, "volume hot-detached"),
            Err(e) => warn!(vm = vm_name, volume, "hot detach failed: {e}"),
        }
        r
    }

    async fn detach_volume(
        &self,
        vm_name: &str,
        volume: &str,
        wait: Duration,
    ) -> Result<(), SupervisorError> {
        let vm = self.running(vm_name)?;
        let _op = vm.op.lock().await;
        let hot = vm.hot.locked().get(volume).map(|h| h.owned_export);
        let Some(owned_export) = hot else {
            let cold = vm.config.disks.iter().any(|d: &Disk| d.name == volume);
            return Err(if cold {
                SupervisorError::ColdAttached {
                    vm: vm_name.to_owned(),
                    volume: volume.to_owned(),
                }
            } else {
                SupervisorError::NotAttached {
                    vm: vm_name.to_owned(),
                    volume: volume.to_owned(),
                }
            });
        };
        let tuning: DiskTuning = vm.config.tuning;
        hotplug::detach(&vm.qmp, volume, tuning, wait).await?;
        vm.hot.locked().remove(volume);
        if owned_export {
            self.drop_export(volume);
        }
        Ok(())
    }
}
