//! Runs QEMU VMs whose disks are exports of this vbd process: starts the
//! exports, launches and watches QEMU, reports crashes, stops VMs in
//! escalating steps and cleans up sockets and exports, and hot-plugs
//! volumes over QMP.
//!
//! VMs can outlive vbd: `release` lets go of them when vbd exits with
//! `--vms-on-exit keep`, leaving a run record (`record`) beside each VM's
//! sockets, and `adopt` finds them again in the next vbd process, checking
//! that each pid is still that QEMU (`proc_identity`) and watching it
//! through a pidfd (`pidfd`), since it is no longer vbd's child.
//!
//! One room a job: `launch` starts a VM, `stop` stops it,
//! `attach` hot-plugs disks, `events` watches for exits and counts what
//! happened, `handle` is the record of one VM, `types` what callers see.
//! Exports are reached through [`VolumeHost`], which the layer above
//! implements.

mod adopt;
mod attach;
mod events;
mod handle;
mod launch;
mod pidfd;
mod proc_identity;
pub mod process;
mod record;
mod release;
mod stop;
#[cfg(test)]
mod tests;
mod types;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};

use self::events::Events;
use self::handle::Vm;
use self::record::VmRecord;
pub use self::types::{
    DiskInfo, DiskReconnect, StopOutcome, SupervisorConfig, SupervisorError, VmEventCounts, VmInfo,
    VmState, VmsOnExit,
};
use crate::error::Chain;
use crate::lock::MutexExt;
use crate::vm::config::RunPaths;
use crate::vm::volume_host::{Restart, VhostServed, VolumeHost};

/// Runs and tracks VMs.
pub struct Supervisor {
    cfg: SupervisorConfig,
    host: Arc<dyn VolumeHost>,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    /// Serialises decisions about which VM holds which volume.
    volumes: tokio::sync::Mutex<()>,
    events: Events,
    /// When this supervisor started (ms since the epoch): the earliest a
    /// disk of a VM adopted from a killed vbd can have reconnected.
    started_at_ms: u64,
}

impl Supervisor {
    /// A supervisor whose VMs get their disks from `host`'s exports.
    pub fn new(cfg: SupervisorConfig, host: Arc<dyn VolumeHost>) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            cfg,
            host,
            vms: Mutex::new(BTreeMap::new()),
            volumes: tokio::sync::Mutex::new(()),
            events: Events::default(),
            started_at_ms: record::now_ms(),
        })
    }

    /// Every VM, running or exited, by name.
    pub fn list(&self) -> Vec<VmInfo> {
        self.vms().values().map(|vm| vm.info()).collect()
    }

    /// Which running VM holds `volume`, if any.
    pub fn user_of(&self, volume: &str) -> Option<String> {
        self.vms()
            .values()
            .find(|vm| vm.alive() && vm.uses(volume))
            .map(|vm| vm.config.name.clone())
    }

    fn vms(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Vm>>> {
        self.vms.locked()
    }

    fn get(&self, name: &str) -> Result<Arc<Vm>, SupervisorError> {
        self.vms()
            .get(name)
            .cloned()
            .ok_or_else(|| SupervisorError::NoVm(name.to_owned()))
    }

    /// The VM `name`, if QEMU runs and no stop is under way.
    fn running(&self, name: &str) -> Result<Arc<Vm>, SupervisorError> {
        let vm = self.get(name)?;
        if vm.state() != VmState::Running {
            return Err(SupervisorError::NotRunning(name.to_owned()));
        }
        Ok(vm)
    }

    /// Exports `volume` unless it already is; `true` if this call added it
    /// (and so the VM owns the export and removes it when done).
    fn ensure_export(&self, volume: &str, read_only: bool) -> Result<bool, SupervisorError> {
        if self.host.is_exported(volume) {
            return Ok(false);
        }
        self.host.export(volume, read_only)?;
        info!(volume, "export started for a VM");
        Ok(true)
    }

    /// Removes an export this supervisor started; a failure is logged,
    /// since the VM that used it is gone either way.
    fn drop_export(&self, volume: &str) {
        match self.host.unexport(volume) {
            Ok(()) => info!(volume, "export removed"),
            Err(e) => warn!(volume, "cannot remove export: {}", Chain(&e)),
        }
    }

    /// Serves `volume` over vhost-user for the VM `vm`: the export's own
    /// device, or a new one on a socket in the VM's run directory. `None`
    /// when the host has no vhost-user transport (the disk stays NBD).
    fn ensure_vhost(&self, vm: &str, volume: &str) -> Result<Option<VhostServed>, SupervisorError> {
        self.serve_vhost_at(volume, &self.vm_dir(vm).join(format!("{volume}.vhost")))
    }

    /// Serves `volume` over vhost-user, on `socket` unless the export has
    /// a device already.
    fn serve_vhost_at(
        &self,
        volume: &str,
        socket: &Path,
    ) -> Result<Option<VhostServed>, SupervisorError> {
        let served = self.host.serve_vhost(volume, socket)?;
        if let Some(s) = served.as_ref().filter(|s| s.started) {
            info!(volume, socket = %s.socket.socket.display(), "vhost-user device started for a VM");
        }
        Ok(served)
    }

    /// Stops a vhost-user device this supervisor started; a failure is
    /// logged, as for exports.
    fn drop_vhost(&self, volume: &str) {
        match self.host.stop_vhost(volume) {
            Ok(()) => info!(volume, "vhost-user device stopped"),
            Err(e) => warn!(volume, "cannot stop the vhost-user device: {}", Chain(&e)),
        }
    }

    /// Lets go of what the supervisor started for one disk: its vhost-user
    /// device (which serves the export's volume), then its export.
    fn release_disk(&self, volume: &str, export: bool, vhost: bool) {
        if vhost {
            self.drop_vhost(volume);
        }
        if export {
            self.drop_export(volume);
        }
    }
}

impl Supervisor {
    /// The run directory of the VM `name`.
    fn vm_dir(&self, name: &str) -> PathBuf {
        self.cfg.run_dir.join(name)
    }

    /// Writes `vm`'s run record, so that the next vbd can adopt it. A
    /// failure is logged: the VM runs on, but would not be adopted.
    fn save(&self, vm: &Vm, released_at_ms: Option<u64>) {
        let reopen = vm
            .exported_disks()
            .into_iter()
            .filter_map(|(v, _)| match self.host.restart(&v) {
                Restart::Reopen(spec) => Some((v, spec)),
                Restart::CommandLine | Restart::Lost => None,
            })
            .collect();
        let Some(record) = vm.record(reopen, released_at_ms) else {
            return;
        };
        let path = VmRecord::path(&self.vm_dir(&vm.config.name));
        if let Err(e) = record.store(&path) {
            warn!(vm = %vm.config.name, path = %path.display(),
                "cannot save the run record; the VM would not be adopted after a vbd restart: {e}");
        }
    }

    /// Removes a VM's QMP socket, pidfile and run record; its logs stay,
    /// for whoever wants to know how it ended.
    fn remove_run_files(&self, name: &str, paths: &RunPaths) {
        remove_if_present(&paths.qmp_socket);
        remove_if_present(&paths.pidfile);
        remove_if_present(&VmRecord::path(&self.vm_dir(name)));
    }
}

/// Removes a run file; one already gone is fine.
fn remove_if_present(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %p.display(), "cannot remove: {e}"),
    }
}
