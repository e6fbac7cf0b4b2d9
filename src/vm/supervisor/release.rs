//! Letting go of VMs as vbd exits with `--vms-on-exit keep`: each running
//! VM's run record is written with the time vbd let go, and its QMP
//! session is closed so that the next vbd can open its own. QEMU keeps
//! running in its own session; its NBD disks wait (`reconnect-delay`)
//! while vbd is away. A VM with a disk whose data lives in vbd's memory is
//! stopped instead: that disk would not come back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use super::Supervisor;
use super::record::now_ms;
use super::types::VmState;
use crate::vm::volume_host::Restart;

impl Supervisor {
    /// Leaves every running VM to the next vbd, except those that could
    /// not survive vbd's exit, which are stopped (each gets `grace` to
    /// power off). Returns once every VM is released or stopped.
    pub async fn release_all(self: &Arc<Self>, grace: Duration) {
        let vms: Vec<_> = self.vms().values().cloned().collect();
        let mut doomed = Vec::new();
        for vm in vms {
            let name = vm.config.name.clone();
            match vm.state() {
                VmState::Running => {}
                // A stop is under way: finish it rather than leave a VM
                // half powered off to the next vbd.
                VmState::Stopping => {
                    doomed.push(name);
                    continue;
                }
                VmState::Stopped { .. } | VmState::Crashed { .. } => continue,
            }
            let lost: Vec<String> = vm
                .exported_disks()
                .into_iter()
                .map(|(v, _)| v)
                .filter(|v| self.host.restart(v) == Restart::Lost)
                .collect();
            if !lost.is_empty() {
                warn!(vm = %name, volumes = ?lost,
                    "stopping the VM: its volumes live in vbd's memory and would not survive vbd's exit");
                doomed.push(name);
                continue;
            }
            // An attach or detach in flight finishes first, so the record
            // names the disks QEMU really has.
            let _op = vm.op.lock().await;
            vm.released.store(true, Ordering::SeqCst);
            self.save(&vm, Some(now_ms()));
            if let Ok(qmp) = vm.qmp() {
                qmp.close().await;
            }
            info!(vm = %name, pid = vm.process.pid, "VM left running for the next vbd to adopt");
        }
        self.stop_each(doomed, grace).await;
    }
}
