//! Runs QEMU VMs whose disks are exports of this vbd process: starts the
//! exports, launches and watches QEMU, reports crashes, stops VMs in
//! escalating steps and cleans up sockets and exports, and hot-plugs
//! volumes over QMP.
//!
//! One room a job: `launch` starts a VM, `stop` stops it,
//! `attach` hot-plugs disks, `events` watches for exits and counts what
//! happened, `handle` is the record of one VM, `types` what callers see.
//! Exports are reached through [`VolumeHost`], which the layer above
//! implements.

mod attach;
mod events;
mod handle;
mod launch;
pub mod process;
mod stop;
#[cfg(test)]
mod tests;
mod types;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};

use self::events::Events;
use self::handle::Vm;
pub use self::types::{
    DiskInfo, StopOutcome, SupervisorConfig, SupervisorError, VmEventCounts, VmInfo, VmState,
};
use crate::error::Chain;
use crate::lock::MutexExt;
use crate::vm::volume_host::VolumeHost;

/// Runs and tracks VMs.
pub struct Supervisor {
    cfg: SupervisorConfig,
    host: Arc<dyn VolumeHost>,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    /// Serialises decisions about which VM holds which volume.
    volumes: tokio::sync::Mutex<()>,
    events: Events,
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
}

/// Removes a run file; one already gone is fine.
fn remove_if_present(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %p.display(), "cannot remove: {e}"),
    }
}
