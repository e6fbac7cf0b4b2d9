//! A VM's run record, `vm.json` in its run directory: everything another
//! vbd process needs to find the VM's QEMU again and supervise it — the
//! config, the run paths, which process QEMU is, the disks hot-plugged
//! since launch and how to serve its volumes again. Written whole and
//! renamed into place, so a reader sees the old record or the new one,
//! never half of either; removed when the VM's exit has been cleaned up.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::proc_identity::ProcIdentity;
use crate::vm::config::{RunPaths, VhostSocket, VmConfig};

/// The record's file name inside the VM's run directory.
pub(super) const RECORD_FILE: &str = "vm.json";

/// The record format this vbd writes; a reader refuses newer ones.
pub(super) const FORMAT: u32 = 1;

/// A hot-plugged disk, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RecordedHotDisk {
    /// The hot-plug port (`hpN`) it sits on.
    pub port: String,
    /// Attached read-only (and so exported read-only).
    pub read_only: bool,
    /// Its vhost-user-blk device, when attached over vhost-user (absent:
    /// NBD, as in records written before vhost-user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost: Option<VhostSocket>,
}

/// What `vm.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct VmRecord {
    /// [`FORMAT`] when written.
    pub format: u32,
    /// The VM as started (with its reconnect delay filled in).
    pub config: VmConfig,
    /// Its sockets, pidfile and serial log; `nbd_socket` is where its
    /// disks reconnect, so only a vbd serving that socket can adopt it.
    pub paths: RunPaths,
    /// QEMU's pid when vbd started it.
    pub pid: u32,
    /// Which process that pid was.
    pub identity: ProcIdentity,
    /// When QEMU started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Hot-plugged disks by volume name.
    #[serde(default)]
    pub hot: BTreeMap<String, RecordedHotDisk>,
    /// How to open its volumes again, by name: the volume host's own
    /// descriptions (see [`crate::vm::Restart::Reopen`]).
    #[serde(default)]
    pub reopen: BTreeMap<String, serde_json::Value>,
    /// When the last vbd let go of the VM on a clean stop (ms since the
    /// epoch); absent if it was killed.
    #[serde(default)]
    pub released_at_ms: Option<u64>,
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecordError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("not a VM run record")]
    Json(#[from] serde_json::Error),
    #[error("record format {0} is newer than this vbd understands ({FORMAT}); run a newer vbd")]
    Newer(u32),
}

/// Milliseconds since the Unix epoch now.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl VmRecord {
    /// Where the record of the VM whose run directory is `dir` lives.
    pub(super) fn path(dir: &Path) -> PathBuf {
        dir.join(RECORD_FILE)
    }

    /// Reads the record at `path`.
    pub(super) fn load(path: &Path) -> Result<VmRecord, RecordError> {
        let r: VmRecord = serde_json::from_slice(&std::fs::read(path)?)?;
        if r.format > FORMAT {
            return Err(RecordError::Newer(r.format));
        }
        Ok(r)
    }

    /// Writes the record to `path` through a temporary file and a rename,
    /// synced so that a host crash leaves the old record or the new one.
    pub(super) fn store(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::config::{Disk, Role};
    use crate::vm::testing::Scratch;

    fn record() -> VmRecord {
        let mut config = VmConfig::new("web", 2, 512, vec![Disk::export("root", Role::Boot)]);
        config.disk_reconnect_delay_secs = Some(30);
        VmRecord {
            format: FORMAT,
            config,
            paths: RunPaths {
                nbd_socket: "/run/vbd/vbd.sock".into(),
                qmp_socket: "/run/vbd/vm/web/qmp.sock".into(),
                pidfile: "/run/vbd/vm/web/qemu.pid".into(),
                serial_log: "/run/vbd/vm/web/serial.log".into(),
                vhost: BTreeMap::from([(
                    "root".into(),
                    VhostSocket {
                        socket: "/run/vbd/vm/web/root.vhost".into(),
                        queues: 16,
                    },
                )]),
            },
            pid: 4242,
            identity: ProcIdentity {
                start_ticks: 987654,
                boot_id: "b0".into(),
                exe: "/usr/bin/qemu-system-x86_64".into(),
                cmdline: vec!["qemu-system-x86_64".into(), "-nodefaults".into()],
            },
            started_at_ms: 1_700_000_000_000,
            hot: BTreeMap::from([(
                "data".into(),
                RecordedHotDisk {
                    port: "hp0".into(),
                    read_only: true,
                    vhost: Some(VhostSocket {
                        socket: "/run/vbd/vm/web/data.vhost".into(),
                        queues: 16,
                    }),
                },
            )]),
            reopen: BTreeMap::from([(
                "data".into(),
                serde_json::json!({"name": "data", "backend": "file", "path": "/d.img"}),
            )]),
            released_at_ms: Some(1_700_000_100_000),
        }
    }

    #[test]
    fn round_trips_and_replaces_atomically() {
        let dir = Scratch::new("record");
        let path = VmRecord::path(&dir.0);
        let mut r = record();
        r.store(&path).unwrap();
        assert_eq!(VmRecord::load(&path).unwrap(), r);
        r.released_at_ms = None;
        r.hot.clear();
        r.store(&path).unwrap();
        assert_eq!(VmRecord::load(&path).unwrap(), r);
        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [RECORD_FILE], "no temporary file left");
    }

    /// A record written before vhost-user (no transport, no sockets) reads
    /// as the NBD VM it was.
    #[test]
    fn records_from_before_vhost_user_mean_nbd() {
        let dir = Scratch::new("record");
        let path = VmRecord::path(&dir.0);
        let mut json = serde_json::to_value(record()).unwrap();
        json["config"]
            .as_object_mut()
            .unwrap()
            .remove("disk_transport");
        json["paths"].as_object_mut().unwrap().remove("vhost");
        json["hot"]["data"].as_object_mut().unwrap().remove("vhost");
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        let r = VmRecord::load(&path).unwrap();
        assert_eq!(r.config.transport(), crate::vm::config::DiskTransport::Nbd);
        assert!(r.paths.vhost.is_empty());
        assert_eq!(r.hot["data"].vhost, None);
        assert!(r.hot["data"].read_only);
    }

    #[test]
    fn refuses_newer_formats_and_other_json() {
        let dir = Scratch::new("record");
        let path = VmRecord::path(&dir.0);
        let mut r = record();
        r.format = FORMAT + 1;
        r.store(&path).unwrap();
        assert!(matches!(VmRecord::load(&path), Err(RecordError::Newer(f)) if f == FORMAT + 1));
        std::fs::write(&path, b"{\"name\": \"web\"}").unwrap();
        assert!(matches!(VmRecord::load(&path), Err(RecordError::Json(_))));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(VmRecord::load(&path), Err(RecordError::Io(_))));
    }
}
