//! Watching VMs: a task per VM waits for QEMU to exit, tells a requested
//! stop from a guest shutdown from a crash, and releases what the VM held.
//! Lifecycle counters for metrics live here too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};

use super::Supervisor;
use super::handle::Vm;
use super::process::Exit;
use super::types::{StopOutcome, VmEventCounts, VmState};
use crate::lock::MutexExt;
use crate::vm::qmp::EventStream;

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
    pub(super) adoptions: AtomicU64,
    pub(super) adoptions_exited: AtomicU64,
    pub(super) adoptions_pid_reused: AtomicU64,
    pub(super) adoption_failures: AtomicU64,
    pub(super) disk_reconnects: AtomicU64,
    pub(super) disk_reconnect_ms: AtomicU64,
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
            adoptions: get(&self.adoptions),
            adoptions_exited: get(&self.adoptions_exited),
            adoptions_pid_reused: get(&self.adoptions_pid_reused),
            adoption_failures: get(&self.adoption_failures),
            disk_reconnects: get(&self.disk_reconnects),
            disk_reconnect_ms: get(&self.disk_reconnect_ms),
        }
    }
}

impl Supervisor {
    /// Lifecycle counters so far.
    pub fn events(&self) -> VmEventCounts {
        self.events.snapshot()
    }

    /// Watches `vm` until QEMU exits, then records the exit and tells
    /// `cleaned` so that a stop can return. QMP's `SHUTDOWN` event is
    /// watched too: for an adopted QEMU, whose exit status vbd cannot
    /// read, it tells a guest power-off from a crash.
    pub(super) fn watch(self: &Arc<Self>, vm: Arc<Vm>, cleaned: watch::Sender<bool>) {
        let me = self.clone();
        let shutdown = vm
            .qmp
            .as_ref()
            .map(|q| tokio::spawn(shutdown_reason(q.subscribe())));
        tokio::spawn(async move {
            let exit = vm.process.wait_exit().await;
            // Needed only when the status is not (an adopted QEMU). The
            // event stream ends when QEMU's side of QMP closes, which it
            // does as it exits.
            let reason = match shutdown {
                Some(t) if exit != Exit::unknown() => {
                    t.abort();
                    None
                }
                Some(t) => tokio::time::timeout(SHUTDOWN_EVENT_WAIT, t)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten(),
                None => None,
            };
            me.exited(&vm, exit, reason);
            let _ = cleaned.send(true);
        });
    }

    /// Records how `vm` ended and releases what it held; `shutdown` is the
    /// reason of QEMU's last `SHUTDOWN` event, if it sent one.
    fn exited(&self, vm: &Vm, exit: Exit, shutdown: Option<String>) {
        if vm.is_released() {
            // A vbd that let go of the VM on its way out: the next one
            // finds out and cleans up.
            return;
        }
        let requested = vm.stopping.load(Ordering::SeqCst);
        let e = &self.events;
        let unknown = exit == Exit::unknown();
        // Counted once the state is set, so that a scrape that sees the
        // count also sees the VM in that state.
        let mut count: Option<&AtomicU64> = None;
        let state = if requested {
            VmState::Stopped {
                reason: format!("stopped on request ({exit})"),
            }
        } else if exit.clean() || (unknown && shutdown.as_deref() == Some("guest-shutdown")) {
            info!(vm = %vm.config.name, pid = vm.process.pid, "guest shut down");
            count = Some(&e.guest_shutdowns);
            VmState::Stopped {
                reason: "guest shut down".into(),
            }
        } else if let (true, Some(why)) = (unknown, &shutdown) {
            info!(vm = %vm.config.name, pid = vm.process.pid, reason = %why, "QEMU shut down");
            VmState::Stopped {
                reason: format!("QEMU shut down ({why})"),
            }
        } else if unknown {
            error!(vm = %vm.config.name, pid = vm.process.pid, "QEMU exited without a shutdown event");
            count = Some(&e.crashes);
            VmState::Crashed {
                reason: format!("QEMU exited without shutting down; {UNKNOWN_STATUS}"),
            }
        } else {
            error!(vm = %vm.config.name, pid = vm.process.pid, %exit, "QEMU crashed");
            count = Some(&e.crashes);
            VmState::Crashed {
                reason: format!("QEMU {exit}"),
            }
        };
        for v in &vm.owned_vhost {
            self.drop_vhost(v);
        }
        for v in &vm.owned {
            self.drop_export(v);
        }
        let hot = std::mem::take(&mut *vm.hot.locked());
        for (v, h) in hot {
            self.release_disk(&v, h.owned_export, h.owned_vhost);
        }
        self.remove_run_files(&vm.config.name, &vm.paths);
        vm.set_state(state);
        if let Some(c) = count {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How long an exit waits for QMP's event stream to end, to learn whether
/// QEMU sent `SHUTDOWN` first.
const SHUTDOWN_EVENT_WAIT: Duration = Duration::from_secs(2);

/// Why an adopted QEMU's exit status is not known, for crash reasons.
pub(super) const UNKNOWN_STATUS: &str =
    "exit status unknown (vbd adopted it after a restart and is not its parent, so cannot read it)";

/// The reason of the last `SHUTDOWN` event on `events`, read until the
/// stream ends.
async fn shutdown_reason(mut events: EventStream) -> Option<String> {
    let mut reason = None;
    while let Some(e) = events.next().await {
        if e.name == "SHUTDOWN" {
            reason = Some(
                e.data
                    .get("reason")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("unknown reason")
                    .to_owned(),
            );
        }
    }
    reason
}
