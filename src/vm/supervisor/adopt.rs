//! Adopting the VMs an earlier vbd left running. For each run record under
//! the run directory: the pid (the pidfile's, and the record's) must still
//! be that QEMU — same start time, boot, executable and command line — or
//! the VM is reported as crashed and its run files removed, and a process
//! that took the pid over is left alone. A live QEMU gets its disks served
//! again first (it is retrying them: NBD disks on vbd's socket, vhost-user
//! disks on their recorded sockets), then a new QMP session, then the
//! same supervision as a VM this vbd started, watched through a pidfd.
//! How long each disk took to reconnect is measured from vbd's side.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::Supervisor;
use super::events::UNKNOWN_STATUS;
use super::handle::{HotDisk, Vm};
use super::pidfd::PidFd;
use super::proc_identity::Verdict;
use super::process::Process;
use super::record::{VmRecord, now_ms};
use super::types::{DiskReconnect, SupervisorError, VmState};
use crate::error::Chain;
use crate::lock::MutexExt;
use crate::vm::config::{Role, Source, VhostSocket};
use crate::vm::qmp::Qmp;
use crate::vm::volume_host::ExportError;

/// How often an adopted VM's exports are looked at for QEMU's reconnect.
const RECONNECT_POLL: Duration = Duration::from_millis(50);

/// How long reconnects are waited for: QEMU only reconnects a disk when
/// the guest uses it, so an idle disk may never; past this, it stays listed
/// as not reconnected.
const RECONNECT_WATCH: Duration = Duration::from_secs(600);

/// What became of one run record.
enum Found {
    /// Its QEMU runs and is supervised again.
    Adopted,
    /// Its QEMU is gone; reported as crashed, run files removed.
    Dead,
}

impl Supervisor {
    /// Supervises again the VMs an earlier vbd left in the run directory;
    /// run it once, before VMs are started, with the NBD server already
    /// serving. Returns how many VMs were adopted.
    pub async fn adopt_all(self: &Arc<Self>) -> usize {
        let entries = match std::fs::read_dir(&self.cfg.run_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                error!(dir = %self.cfg.run_dir.display(), "cannot look for VMs to adopt: {e}");
                return 0;
            }
        };
        let mut dirs: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|d| VmRecord::path(d).exists())
            .collect();
        dirs.sort();
        // Side by side: a QEMU whose QMP does not answer costs a timeout.
        let tasks: Vec<_> = dirs
            .into_iter()
            .map(|dir| {
                let me = self.clone();
                tokio::spawn(async move { me.adopt_dir(&dir).await })
            })
            .collect();
        let mut adopted = 0;
        for t in tasks {
            if matches!(t.await, Ok(Some(Found::Adopted))) {
                adopted += 1;
            }
        }
        adopted
    }

    /// Adopts the VM whose run directory is `dir`; `None` if it could not
    /// be (logged, counted, files kept).
    async fn adopt_dir(self: &Arc<Self>, dir: &Path) -> Option<Found> {
        let path = VmRecord::path(dir);
        let dir_name = dir.file_name().and_then(|n| n.to_str());
        let r = match VmRecord::load(&path) {
            Ok(record) if Some(record.config.name.as_str()) == dir_name => self.adopt(record).await,
            Ok(record) => Err(SupervisorError::Record {
                path: path.clone(),
                source: format!("it names VM {:?}", record.config.name).into(),
            }),
            Err(e) => Err(SupervisorError::Record {
                path: path.clone(),
                source: Box::new(e),
            }),
        };
        match r {
            Ok(found) => Some(found),
            Err(e) => {
                error!(path = %path.display(), "VM not adopted: {}", Chain(&e));
                self.events
                    .adoption_failures
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    async fn adopt(self: &Arc<Self>, record: VmRecord) -> Result<Found, SupervisorError> {
        let name = record.config.name.clone();
        if record.paths.nbd_socket != self.cfg.nbd_socket {
            return Err(SupervisorError::OtherSocket {
                vm: name,
                theirs: record.paths.nbd_socket,
                ours: self.cfg.nbd_socket.clone(),
            });
        }
        if self.vms().contains_key(&name) {
            return Err(SupervisorError::Exists(name));
        }
        let (pid, pidfd) = match find_qemu(&record)? {
            Ok(found) => found,
            Err(reason) => {
                let e = &self.events;
                let counter = match reason {
                    Missing::Exited { .. } => &e.adoptions_exited,
                    Missing::Replaced { .. } => &e.adoptions_pid_reused,
                };
                self.found_dead(record, reason.to_string(), counter);
                return Ok(Found::Dead);
            }
        };
        let from_clean_stop = record.released_at_ms.is_some();
        let since_ms = record.released_at_ms.unwrap_or(self.started_at_ms);
        // Its disks first: QEMU is retrying them.
        let (owned, owned_vhost, hot, reconnects) = {
            let _g = self.volumes.lock().await;
            let republish = |volume: &str, read_only: bool, vhost: Option<&VhostSocket>| {
                let r = self.republish(&record, volume, read_only, vhost);
                let entry = DiskReconnect {
                    after_ms: None,
                    from_clean_stop,
                    error: r.as_ref().err().map(|e| {
                        error!(vm = %name, volume, "{}", Chain(e));
                        Chain(e).to_string()
                    }),
                };
                (r.unwrap_or((false, false)), entry)
            };
            let mut owned = Vec::new();
            let mut owned_vhost = Vec::new();
            let mut reconnects = BTreeMap::new();
            for d in record.config.disks.iter() {
                if d.source != Source::Export {
                    continue;
                }
                let vhost = record.paths.vhost.get(&d.name);
                let ((export, device), entry) =
                    republish(&d.name, d.role == Role::CloudInit, vhost);
                if export {
                    owned.push(d.name.clone());
                }
                if device {
                    owned_vhost.push(d.name.clone());
                }
                reconnects.insert(d.name.clone(), entry);
            }
            let mut hot = BTreeMap::new();
            for (v, h) in &record.hot {
                let ((owned_export, owned_vhost), entry) =
                    republish(v, h.read_only, h.vhost.as_ref());
                reconnects.insert(v.clone(), entry);
                hot.insert(
                    v.clone(),
                    HotDisk {
                        port: h.port.clone(),
                        owned_export,
                        read_only: h.read_only,
                        vhost: h.vhost.clone(),
                        owned_vhost,
                    },
                );
            }
            (owned, owned_vhost, hot, reconnects)
        };
        let qmp = match Qmp::connect(&record.paths.qmp_socket, self.cfg.qmp_timeout).await {
            Ok((qmp, _events)) => qmp,
            Err(source) => {
                return Err(SupervisorError::AdoptQmp {
                    vm: name,
                    pid,
                    source,
                });
            }
        };
        let process = Process::adopt(pid, pidfd).map_err(|source| SupervisorError::Io {
            what: format!("cannot watch QEMU pid {pid}"),
            source,
        })?;
        let (cleaned_tx, cleaned) = watch::channel(false);
        let vm = Arc::new(Vm {
            config: record.config,
            paths: record.paths,
            process,
            identity: Some(record.identity),
            qmp: Some(qmp),
            state: Mutex::new(VmState::Running),
            stopping: AtomicBool::new(false),
            released: AtomicBool::new(false),
            owned,
            owned_vhost,
            hot: Mutex::new(hot),
            op: tokio::sync::Mutex::new(()),
            cleaned,
            started_at_ms: record.started_at_ms,
            adopted_at_ms: Some(now_ms()),
            reconnects: Mutex::new(reconnects),
        });
        self.save(&vm, None);
        self.vms().insert(name.clone(), vm.clone());
        self.watch(vm.clone(), cleaned_tx);
        self.watch_reconnects(&vm, since_ms);
        self.events.adoptions.fetch_add(1, Ordering::Relaxed);
        info!(vm = %name, pid, from_clean_stop, "VM adopted");
        Ok(Found::Adopted)
    }

    /// Serves `volume` for an adopted VM unless something already does
    /// (a `vbd serve --export`), and over vhost-user on its recorded socket
    /// when it was a vhost-user disk; says whether this call started the
    /// export and the device.
    fn republish(
        &self,
        record: &VmRecord,
        volume: &str,
        read_only: bool,
        vhost: Option<&VhostSocket>,
    ) -> Result<(bool, bool), SupervisorError> {
        let export = self.republish_export(record, volume, read_only)?;
        let Some(recorded) = vhost else {
            return Ok((export, false));
        };
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| {
            if export {
                self.drop_export(volume);
            }
            SupervisorError::Export(ExportError::Vhost {
                volume: volume.to_owned(),
                source,
            })
        };
        let served = match self.serve_vhost_at(volume, &recorded.socket) {
            Ok(Some(s)) => s,
            Ok(None) => return Err(fail("this vbd serves no vhost-user devices".into())),
            Err(e) => return Err(fail(Box::new(e))),
        };
        if served.socket.socket != recorded.socket {
            warn!(vm = %record.config.name, volume, recorded = %recorded.socket.display(),
                serving = %served.socket.socket.display(),
                "the export's vhost-user device listens elsewhere than QEMU reconnects to");
        }
        Ok((export, served.started))
    }

    /// The NBD export half of [`Supervisor::republish`]: `true` if this
    /// call started the export.
    fn republish_export(
        &self,
        record: &VmRecord,
        volume: &str,
        read_only: bool,
    ) -> Result<bool, SupervisorError> {
        if self.host.is_exported(volume) {
            return Ok(false);
        }
        if let Some(spec) = record.reopen.get(volume) {
            self.host.reopen(volume, spec)?;
        }
        match self.host.export(volume, read_only) {
            Ok(()) => {
                info!(vm = %record.config.name, volume, "export started again for an adopted VM");
                Ok(true)
            }
            Err(ExportError::NoVolume(_)) => Err(SupervisorError::MissingDisk {
                vm: record.config.name.clone(),
                volume: volume.to_owned(),
                delay_secs: record.config.reconnect_delay_secs(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists a VM whose QEMU is gone as crashed, counts it, and removes
    /// its QMP socket, pidfile and run record (its logs stay).
    fn found_dead(&self, record: VmRecord, reason: String, counter: &AtomicU64) {
        let name = record.config.name.clone();
        error!(vm = %name, pid = record.pid, "{reason}");
        self.remove_run_files(&name, &record.paths);
        let (_, cleaned) = watch::channel(true);
        let vm = Vm {
            config: record.config,
            paths: record.paths,
            process: Process::gone(record.pid),
            identity: None,
            qmp: None,
            state: Mutex::new(VmState::Crashed { reason }),
            stopping: AtomicBool::new(false),
            released: AtomicBool::new(false),
            owned: Vec::new(),
            owned_vhost: Vec::new(),
            hot: Mutex::new(BTreeMap::new()),
            op: tokio::sync::Mutex::new(()),
            cleaned,
            started_at_ms: record.started_at_ms,
            adopted_at_ms: None,
            reconnects: Mutex::new(BTreeMap::new()),
        };
        self.vms().insert(name, Arc::new(vm));
        // Counted once listed, so that a scrape that sees the count sees the VM.
        counter.fetch_add(1, Ordering::Relaxed);
        self.events.crashes.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes, for each disk of `vm` still waiting, when QEMU is attached to
    /// its export again, counting from `since_ms`.
    fn watch_reconnects(self: &Arc<Self>, vm: &Arc<Vm>, since_ms: u64) {
        let me = self.clone();
        let weak = Arc::downgrade(vm);
        tokio::spawn(async move {
            let deadline = Instant::now() + RECONNECT_WATCH;
            loop {
                let Some(vm) = weak.upgrade() else { return };
                if !vm.alive() {
                    return;
                }
                let waiting: Vec<String> = vm
                    .reconnects
                    .locked()
                    .iter()
                    .filter(|(_, r)| r.after_ms.is_none() && r.error.is_none())
                    .map(|(v, _)| v.clone())
                    .collect();
                if waiting.is_empty() {
                    return;
                }
                for v in waiting {
                    if me.host.connections(&v) == 0 {
                        continue;
                    }
                    let after_ms = now_ms().saturating_sub(since_ms);
                    if let Some(r) = vm.reconnects.locked().get_mut(&v) {
                        r.after_ms = Some(after_ms);
                    }
                    let e = &me.events;
                    e.disk_reconnects.fetch_add(1, Ordering::Relaxed);
                    e.disk_reconnect_ms.fetch_add(after_ms, Ordering::Relaxed);
                    info!(vm = %vm.config.name, volume = %v, after_ms, "disk reconnected");
                }
                if Instant::now() > deadline {
                    warn!(vm = %vm.config.name, "some disks did not reconnect (QEMU reconnects a disk when the guest uses it)");
                    return;
                }
                drop(vm);
                tokio::time::sleep(RECONNECT_POLL).await;
            }
        });
    }
}

/// Why a recorded QEMU is not there to adopt.
enum Missing {
    /// No process has its pid any more.
    Exited { pid: u32 },
    /// Another process holds the pid now.
    Replaced { pid: u32, what: String },
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Exited { pid } => {
                write!(
                    f,
                    "QEMU (pid {pid}) exited while vbd was away; {UNKNOWN_STATUS}"
                )
            }
            Missing::Replaced { pid, what } => write!(
                f,
                "QEMU is gone: pid {pid} now belongs to another process ({what}), which was left alone"
            ),
        }
    }
}

/// The pids the record points at: its pidfile's (what QEMU wrote) and the
/// one vbd recorded at launch, which should be the same.
fn candidates(record: &VmRecord) -> Vec<u32> {
    let from_file = std::fs::read_to_string(&record.paths.pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let mut pids: Vec<u32> = from_file.into_iter().collect();
    if !pids.contains(&record.pid) {
        pids.push(record.pid);
    }
    pids
}

/// Finds the recorded QEMU: its pid with a pidfd opened before the
/// identity check (so the descriptor cannot name a later holder of the
/// pid), or why it is not there.
fn find_qemu(record: &VmRecord) -> Result<Result<(u32, PidFd), Missing>, SupervisorError> {
    let mut missing = None;
    for pid in candidates(record) {
        let pidfd = match PidFd::open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                missing.get_or_insert(Missing::Exited { pid });
                continue;
            }
            Err(source) => {
                return Err(SupervisorError::Io {
                    what: format!("cannot open a pidfd for pid {pid}"),
                    source,
                });
            }
        };
        match record.identity.check(pid) {
            Verdict::Same => return Ok(Ok((pid, pidfd))),
            Verdict::Gone => {
                missing.get_or_insert(Missing::Exited { pid });
            }
            // Another process outranks a plain exit in the report: it is
            // the one an operator must not be surprised by.
            Verdict::Other { what } => missing = Some(Missing::Replaced { pid, what }),
        }
    }
    Ok(Err(missing.unwrap_or(Missing::Exited { pid: record.pid })))
}
