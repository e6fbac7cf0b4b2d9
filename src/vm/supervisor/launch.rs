//! Starting a VM: check its disks are free, export the ones not yet
//! served (and, over vhost-user, give each boot and data disk its device),
//! run QEMU and wait for its QMP socket; on any failure undo what was done,
//! so a failed start leaves no export, device, socket or record behind.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::events::Events;
use super::handle::Vm;
use super::proc_identity::ProcIdentity;
use super::process::Process;
use super::record::{VmRecord, now_ms};
use super::types::{SupervisorError, VmInfo, VmState};
use super::{Supervisor, remove_if_present};
use crate::error::Chain;
use crate::vm::config::{DiskTransport, Role, RunPaths, Source, VmConfig, argv};
use crate::vm::qmp::{Qmp, QmpError};

/// How long a QEMU that failed to come up may take to die after SIGKILL.
const START_KILL_WAIT: Duration = Duration::from_secs(5);

/// How often the QMP socket is looked for while QEMU starts.
const START_POLL: Duration = Duration::from_millis(25);

/// Lines of QEMU's output quoted when it fails to start.
const LOG_TAIL_LINES: usize = 10;

impl Supervisor {
    /// Starts the exports for `config`'s volumes, then QEMU, and returns
    /// once QMP answers.
    pub async fn start(self: &Arc<Self>, config: VmConfig) -> Result<VmInfo, SupervisorError> {
        let name = config.name.clone();
        let r = self.start_vm(config).await;
        let e = &self.events;
        Events::count(&r, &e.starts, &e.start_failures);
        if let Err(e) = &r {
            warn!(vm = %name, "VM did not start: {}", Chain(e));
        }
        r
    }

    async fn start_vm(self: &Arc<Self>, mut config: VmConfig) -> Result<VmInfo, SupervisorError> {
        // Recorded in the config, so the VM keeps its delay across restarts.
        config
            .disk_reconnect_delay_secs
            .get_or_insert(self.cfg.disk_reconnect_delay_secs);
        config.disk_transport.get_or_insert(self.cfg.disk_transport);
        let _g = self.volumes.lock().await;
        let name = config.name.clone();
        if self.vms().get(&name).is_some_and(|old| old.alive()) {
            return Err(SupervisorError::Exists(name));
        }
        let dir = self.vm_dir(&name);
        if let Ok(old) = VmRecord::load(&VmRecord::path(&dir)) {
            // Left by an earlier vbd and not adopted (see the log of this
            // vbd's start): its QEMU may still run on these sockets.
            return Err(SupervisorError::Unadopted {
                vm: name,
                pid: old.pid,
            });
        }
        let mut paths = RunPaths {
            nbd_socket: self.cfg.nbd_socket.clone(),
            qmp_socket: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            serial_log: dir.join("serial.log"),
            vhost: BTreeMap::new(),
        };
        // The config is checked before anything is started; the argv QEMU
        // runs with is built once the disks' vhost-user devices are known.
        argv(&config, &paths)?;
        for d in &config.disks {
            if let Some(vm) = self.user_of(&d.name) {
                return Err(SupervisorError::VolumeInUse {
                    volume: d.name.clone(),
                    vm,
                });
            }
        }
        let mut owned = Vec::new();
        let mut owned_vhost = Vec::new();
        let started = self
            .launch(&config, &mut paths, &dir, &mut owned, &mut owned_vhost)
            .await;
        let started_at_ms = now_ms();
        let (process, qmp) = match started {
            Ok(p) => p,
            Err(e) => {
                for v in &owned_vhost {
                    self.drop_vhost(v);
                }
                for v in &owned {
                    self.drop_export(v);
                }
                self.remove_run_files(&name, &paths);
                return Err(e);
            }
        };
        // QEMU has exec'd by now (it answered QMP), so this is its identity,
        // not that of the vbd it was forked from.
        let identity = match ProcIdentity::read(process.pid) {
            Ok(id) => Some(id),
            Err(e) => {
                warn!(vm = %name, pid = process.pid,
                    "cannot read QEMU's identity from /proc; the VM would not be adopted after a vbd restart: {e}");
                None
            }
        };
        let (cleaned_tx, cleaned) = watch::channel(false);
        let vm = Arc::new(Vm {
            config,
            paths,
            process,
            identity,
            qmp: Some(qmp),
            state: Mutex::new(VmState::Running),
            stopping: AtomicBool::new(false),
            released: AtomicBool::new(false),
            owned,
            owned_vhost,
            hot: Mutex::new(BTreeMap::new()),
            op: tokio::sync::Mutex::new(()),
            cleaned,
            started_at_ms,
            adopted_at_ms: None,
            reconnects: Mutex::new(BTreeMap::new()),
        });
        info!(vm = %name, pid = vm.process.pid, "VM started");
        self.save(&vm, None);
        self.vms().insert(name, vm.clone());
        self.watch(vm.clone(), cleaned_tx);
        Ok(vm.info())
    }

    /// Exports the VM's volumes (recording in `owned` those this call
    /// exported) and, over vhost-user, serves its boot and data disks on
    /// devices (noting them in `paths`, and in `owned_vhost` those this
    /// call started); then runs QEMU until its QMP socket answers.
    async fn launch(
        &self,
        config: &VmConfig,
        paths: &mut RunPaths,
        dir: &Path,
        owned: &mut Vec<String>,
        owned_vhost: &mut Vec<String>,
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
        if config.transport() == DiskTransport::VhostUser {
            for d in &config.disks {
                if d.source != Source::Export || !matches!(d.role, Role::Boot | Role::Data) {
                    continue;
                }
                let Some(served) = self.ensure_vhost(&config.name, &d.name)? else {
                    info!(vm = %config.name, volume = %d.name,
                        "no vhost-user transport here; the disk goes over NBD");
                    continue;
                };
                if served.started {
                    owned_vhost.push(d.name.clone());
                }
                paths.vhost.insert(d.name.clone(), served.socket);
            }
        }
        let args = argv(config, paths)?;
        remove_if_present(&paths.qmp_socket);
        remove_if_present(&paths.pidfile);
        let log = dir.join("qemu.log");
        let process = Process::spawn(&args, &log)
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
                        process.wait(START_KILL_WAIT).await;
                        return Err(fail(format!("QMP failed: {}", Chain(&e))));
                    }
                }
            }
            if Instant::now() > deadline {
                process.signal(libc::SIGKILL);
                process.wait(START_KILL_WAIT).await;
                return Err(fail(format!(
                    "no QMP socket after {:?}",
                    self.cfg.start_timeout
                )));
            }
            tokio::time::sleep(START_POLL).await;
        }
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> SupervisorError {
    move |source| SupervisorError::Io { what, source }
}

/// The last lines of QEMU's output, for a start error; whatever bytes it
/// wrote, and empty if the log cannot be read.
fn log_tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
