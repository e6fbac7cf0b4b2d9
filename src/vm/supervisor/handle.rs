//! The supervisor's record of one VM: its configuration, its QEMU process
//! and QMP connection, its state, and the disks hot-plugged into it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use tokio::sync::watch;

use super::process::Process;
use super::types::{DiskInfo, VmInfo, VmState};
use crate::lock::MutexExt;
use crate::vm::config::{Role, RunPaths, VmConfig};
use crate::vm::qmp::Qmp;

/// A hot-attached disk.
pub(super) struct HotDisk {
    /// The hot-plug port (`hpN`) it sits on.
    pub(super) port: String,
    /// Whether the supervisor started its export (and so removes it).
    pub(super) owned_export: bool,
}

/// One VM, from launch until its record is forgotten after a stop.
pub(super) struct Vm {
    pub(super) config: VmConfig,
    pub(super) paths: RunPaths,
    pub(super) process: Process,
    pub(super) qmp: Qmp,
    pub(super) state: Mutex<VmState>,
    /// Set by a stop request, so that the exit counts as asked for.
    pub(super) stopping: AtomicBool,
    /// Exports started for this VM at launch, removed when it exits.
    pub(super) owned: Vec<String>,
    /// Hot-attached disks by volume name.
    pub(super) hot: Mutex<BTreeMap<String, HotDisk>>,
    /// Serialises attach and detach on this VM.
    pub(super) op: tokio::sync::Mutex<()>,
    /// Turns `true` once the exit has been recorded and cleaned up after.
    pub(super) cleaned: watch::Receiver<bool>,
}

impl Vm {
    pub(super) fn state(&self) -> VmState {
        self.state.locked().clone()
    }

    pub(super) fn set_state(&self, s: VmState) {
        *self.state.locked() = s;
    }

    /// Whether QEMU is still running (a stopping VM still holds its disks).
    pub(super) fn alive(&self) -> bool {
        matches!(self.state(), VmState::Running | VmState::Stopping)
    }

    /// Whether `volume` is one of its disks, from launch or hot-plugged.
    pub(super) fn uses(&self, volume: &str) -> bool {
        self.config.disks.iter().any(|d| d.name == volume) || self.hot.locked().contains_key(volume)
    }

    pub(super) fn info(&self) -> VmInfo {
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

    /// Waits until the exit watcher has recorded the exit and cleaned up.
    pub(super) async fn wait_cleaned(&self) {
        let mut rx = self.cleaned.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}
