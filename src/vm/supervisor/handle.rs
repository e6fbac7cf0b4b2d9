//! The supervisor's record of one VM: its configuration, its QEMU process
//! and QMP connection, its state, the disks hot-plugged into it and, for a
//! VM adopted after a vbd restart, how its disks came back.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use super::proc_identity::ProcIdentity;
use super::process::Process;
use super::record::{FORMAT, RecordedHotDisk, VmRecord};
use super::types::{DiskInfo, DiskReconnect, SupervisorError, VmInfo, VmState};
use crate::lock::MutexExt;
use crate::vm::config::{Role, RunPaths, Source, VhostSocket, VmConfig};
use crate::vm::qmp::Qmp;

/// A hot-attached disk.
pub(super) struct HotDisk {
    /// The hot-plug port (`hpN`) it sits on.
    pub(super) port: String,
    /// Whether the supervisor started its export (and so removes it).
    pub(super) owned_export: bool,
    /// Attached (and exported) read-only.
    pub(super) read_only: bool,
    /// Its vhost-user-blk device, when attached over vhost-user.
    pub(super) vhost: Option<VhostSocket>,
    /// Whether the supervisor started that device (and so stops it).
    pub(super) owned_vhost: bool,
}

/// One VM, from launch (or adoption) until its record is forgotten after
/// a stop.
pub(super) struct Vm {
    pub(super) config: VmConfig,
    pub(super) paths: RunPaths,
    pub(super) process: Process,
    /// Which process QEMU is; `None` for a VM found dead at adoption, or
    /// if /proc could not be read at launch (then it cannot be adopted).
    pub(super) identity: Option<ProcIdentity>,
    /// `None` only for a VM found dead at adoption, which has no QEMU.
    pub(super) qmp: Option<Qmp>,
    pub(super) state: Mutex<VmState>,
    /// Set by a stop request, so that the exit counts as asked for.
    pub(super) stopping: AtomicBool,
    /// Set when vbd exits leaving the VM running: from then on the VM is
    /// the next vbd's, and its exit is not cleaned up after here.
    pub(super) released: AtomicBool,
    /// Exports started for this VM at launch, removed when it exits.
    pub(super) owned: Vec<String>,
    /// vhost-user devices started for its launch disks, stopped when it exits.
    pub(super) owned_vhost: Vec<String>,
    /// Hot-attached disks by volume name.
    pub(super) hot: Mutex<BTreeMap<String, HotDisk>>,
    /// Serialises attach and detach on this VM.
    pub(super) op: tokio::sync::Mutex<()>,
    /// Turns `true` once the exit has been recorded and cleaned up after.
    pub(super) cleaned: watch::Receiver<bool>,
    /// When QEMU started, in ms since the Unix epoch (0 if unknown).
    pub(super) started_at_ms: u64,
    /// When this vbd adopted it, for a VM an earlier vbd started.
    pub(super) adopted_at_ms: Option<u64>,
    /// For an adopted VM: how each disk came back, by volume.
    pub(super) reconnects: Mutex<BTreeMap<String, DiskReconnect>>,
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

    /// Its QMP connection; every VM whose QEMU runs has one.
    pub(super) fn qmp(&self) -> Result<&Qmp, SupervisorError> {
        self.qmp
            .as_ref()
            .ok_or_else(|| SupervisorError::NotRunning(self.config.name.clone()))
    }

    /// Whether `volume` is one of its disks, from launch or hot-plugged.
    pub(super) fn uses(&self, volume: &str) -> bool {
        self.config.disks.iter().any(|d| d.name == volume) || self.hot.locked().contains_key(volume)
    }

    /// Every disk served by vbd, launch disks first: (volume, read-only).
    pub(super) fn exported_disks(&self) -> Vec<(String, bool)> {
        let mut v: Vec<(String, bool)> = self
            .config
            .disks
            .iter()
            .filter(|d| d.source == Source::Export)
            .map(|d| (d.name.clone(), d.role == Role::CloudInit))
            .collect();
        v.extend(
            self.hot
                .locked()
                .iter()
                .map(|(name, h)| (name.clone(), h.read_only)),
        );
        v
    }

    pub(super) fn info(&self) -> VmInfo {
        let reconnects = self.reconnects.locked();
        let mut disks: Vec<DiskInfo> = self
            .config
            .disks
            .iter()
            .map(|d| DiskInfo {
                volume: d.name.clone(),
                role: d.role,
                port: None,
                reconnect: reconnects.get(&d.name).cloned(),
            })
            .collect();
        for (v, h) in self.hot.locked().iter() {
            disks.push(DiskInfo {
                volume: v.clone(),
                role: Role::Data,
                port: Some(h.port.clone()),
                reconnect: reconnects.get(v).cloned(),
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
            started_at_ms: self.started_at_ms,
            adopted_at_ms: self.adopted_at_ms,
        }
    }

    /// The run record describing it now; `None` for a VM without a QEMU
    /// to find again. `reopen` holds the host's descriptions of its volumes.
    pub(super) fn record(
        &self,
        reopen: BTreeMap<String, serde_json::Value>,
        released_at_ms: Option<u64>,
    ) -> Option<VmRecord> {
        Some(VmRecord {
            format: FORMAT,
            config: self.config.clone(),
            paths: self.paths.clone(),
            pid: self.process.pid,
            identity: self.identity.clone()?,
            started_at_ms: self.started_at_ms,
            hot: self
                .hot
                .locked()
                .iter()
                .map(|(v, h)| {
                    (
                        v.clone(),
                        RecordedHotDisk {
                            port: h.port.clone(),
                            read_only: h.read_only,
                            vhost: h.vhost.clone(),
                        },
                    )
                })
                .collect(),
            reopen,
            released_at_ms,
        })
    }

    /// Whether vbd has let go of it (see [`Vm::released`]).
    pub(super) fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
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
