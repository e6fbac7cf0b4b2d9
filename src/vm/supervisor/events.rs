//! Watching VMs: a task per VM waits for QEMU to exit, tells a requested
//! stop from a guest shutdown from a crash, and releases what the VM held.
//! Lifecycle counters for metrics live here too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;
use tracing::{error, info};

use super::handle::Vm;
use super::process::Exit;
use super::types::{StopOutcome, VmEventCounts, VmState};
use super::{Supervisor, remove_if_present};
use crate::lock::MutexExt;

/// Lifecycle counters, bumped a few times per VM.
#[derive(Default)]
pub(super) struct Events {
    pub(super) starts: AtomicU64,
    pub(super) start_failures: AtomicU64,
    pub(super) powerdowns: AtomicU64,
    pub(super) sigterms: AtomicU64,
    pub(super) sigkills: AtomicU64,
    pub(super) guest_shutdowns: AtomicU64,
    pub(super) crashes: AtomicU64,
    pub(super) attaches: AtomicU64,
    pub(super) attach_failures: AtomicU64,
    pub(super) detaches: AtomicU64,
    pub(super) detach_failures: AtomicU64,
}

impl Events {
    /// Counts `r` as a success or a failure.
    pub(super) fn count<T, E>(r: &Result<T, E>, ok: &AtomicU64, failed: &AtomicU64) {
        if r.is_ok() { ok } else { failed }.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts how a requested stop ended.
    pub(super) fn stopped(&self, outcome: StopOutcome) {
        let counter = match outcome {
            StopOutcome::Powerdown => &self.powerdowns,
            StopOutcome::Sigterm => &self.sigterms,
            StopOutcome::Sigkill => &self.sigkills,
            StopOutcome::AlreadyExited => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> VmEventCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VmEventCounts {
            starts: get(&self.starts),
            start_failures: get(&self.start_failures),
            powerdowns: get(&self.powerdowns),
            sigterms: get(&self.sigterms),
            sigkills: get(&self.sigkills),
            guest_shutdowns: get(&self.guest_shutdowns),
            crashes: get(&self.crashes),
            attaches: get(&self.attaches),
            attach_failures: get(&self.attach_failures),
            detaches: get(&self.detaches),
            detach_failures: get(&self.detach_failures),
        }
    }
}

impl Supervisor {
    /// Lifecycle counters so far.
    pub fn events(&self) -> VmEventCounts {
        self.events.snapshot()
    }

    /// Watches `vm` until QEMU exits, then records the exit and tells
    /// `cleaned` so that a stop can return.
    pub(super) fn watch(self: &Arc<Self>, vm: Arc<Vm>, cleaned: watch::Sender<bool>) {
        let me = self.clone();
        tokio::spawn(async move {
            let exit = vm.process.wait_exit().await;
            me.exited(&vm, exit);
            let _ = cleaned.send(true);
        });
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
}
