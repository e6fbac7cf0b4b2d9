//! Stopping a VM in escalating steps: `system_powerdown` and a grace
//! period for the guest, then SIGTERM, then SIGKILL, each wait bounded.
//! A stop returns only once the exit watcher has released the VM's
//! exports and sockets.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use qapi::qmp::system_powerdown;
use tracing::{error, info, warn};

use super::Supervisor;
use super::handle::Vm;
use super::types::{StopOutcome, SupervisorError, VmState};
use crate::error::Chain;

/// How long a SIGKILLed QEMU may take to be reaped.
const SIGKILL_WAIT: Duration = Duration::from_secs(10);

impl Supervisor {
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
        let powerdown = match vm.qmp() {
            Ok(qmp) => qmp
                .execute_for(system_powerdown {}, self.cfg.qmp_timeout)
                .await
                .map_err(SupervisorError::from),
            Err(e) => Err(e),
        };
        let outcome = if let Err(e) = powerdown
            && vm.process.exited().is_none()
        {
            warn!(vm = name, "system_powerdown failed: {}", Chain(&e));
            self.escalate(&vm).await?
        } else if vm.process.wait(grace).await.is_some() {
            StopOutcome::Powerdown
        } else {
            self.escalate(&vm).await?
        };
        vm.wait_cleaned().await;
        self.forget(name, &vm);
        self.events.stopped(outcome);
        info!(vm = name, pid = vm.process.pid, ?outcome, "VM stopped");
        Ok(outcome)
    }

    /// SIGTERM, then SIGKILL if QEMU outlives `sigterm_wait`.
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

    /// Drops the record of `name` if it is still `vm` (not a newer VM of
    /// the same name).
    fn forget(&self, name: &str, vm: &Arc<Vm>) {
        let mut vms = self.vms();
        if vms.get(name).is_some_and(|v| Arc::ptr_eq(v, vm)) {
            vms.remove(name);
        }
    }

    /// Stops every VM (used when vbd itself shuts down).
    pub async fn stop_all(self: &Arc<Self>, grace: Duration) {
        let names: Vec<String> = self.vms().keys().cloned().collect();
        self.stop_each(names, grace).await;
    }

    /// Stops the VMs `names` side by side; failures are logged.
    pub(super) async fn stop_each(self: &Arc<Self>, names: Vec<String>, grace: Duration) {
        let mut tasks = Vec::new();
        for n in names {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = me.stop(&n, grace).await {
                    warn!(vm = %n, "stop failed: {}", Chain(&e));
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}
