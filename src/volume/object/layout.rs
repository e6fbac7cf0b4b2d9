//! Where a volume's pieces live: object keys in the store, the local WAL
//! directory, the volume descriptor, and the one-writer lock.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::ObjectError;
use crate::objstore::{Store, StoreError};

/// Keys of one volume's objects.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys for volume `name`.
    pub fn new(name: &str) -> Keys {
        Keys {
            root: format!("volumes/{name}"),
        }
    }
    /// Prefix of every object of this volume: `volumes/<name>`.
    pub fn root(&self) -> &str {
        &self.root
    }
    /// The volume's descriptor, `volume.json`.
    pub fn descriptor(&self) -> String {
        format!("{}/volume.json", self.root)
    }
    /// The writer-lock object naming the volume's owner.
    pub fn lock(&self) -> String {
        format!("{}/lock", self.root)
    }
    /// Prefix of the chunk objects, for listing.
    pub fn chunks(&self) -> String {
        format!("{}/chunks", self.root)
    }
    /// Chunk `id`, in hex so keys sort in id order.
    pub fn chunk(&self, id: u64) -> String {
        format!("{}/chunks/{id:016x}", self.root)
    }
    /// Prefix of the checkpoint objects, for listing.
    pub fn checkpoints(&self) -> String {
        format!("{}/checkpoints", self.root)
    }
    /// Checkpoint as of chunk `id`, in hex so keys sort in id order.
    pub fn checkpoint(&self, id: u64) -> String {
        format!("{}/checkpoints/{id:016x}", self.root)
    }
    /// Prefix of a clone's flatten marks, for listing: `flattened/<id>`
    /// says the clone stands alone (once its id counts, see `generation`).
    pub fn flattened(&self) -> String {
        format!("{}/flattened", self.root)
    }
    /// The flatten mark with id `id`.
    pub fn flattened_mark(&self, id: u64) -> String {
        format!("{}/flattened/{id:016x}", self.root)
    }
    /// Prefix of the resize records, for listing: the size is the one in
    /// the newest record that counts, else the descriptor's.
    pub fn sizes(&self) -> String {
        format!("{}/sizes", self.root)
    }
    /// The resize record with id `id`.
    pub fn size(&self, id: u64) -> String {
        format!("{}/sizes/{id:016x}", self.root)
    }
    /// Prefixes of the objects whose keys end in their writer's id (see
    /// `generation`): what a take-over's fence is drawn through.
    pub fn with_ids(&self) -> [String; 4] {
        [
            self.chunks(),
            self.checkpoints(),
            self.flattened(),
            self.sizes(),
        ]
    }
    /// Prefix of the writer-generation records, for listing.
    pub fn generations(&self) -> String {
        format!("{}/gens", self.root)
    }
    /// The record of a generation, created if absent by the writer that takes it.
    pub fn generation(&self, generation: u64) -> String {
        format!("{}/gens/{generation:016x}", self.root)
    }
    /// The fences a generation started from, written before its first chunk.
    pub fn generation_start(&self, generation: u64) -> String {
        format!("{}/gens/{generation:016x}.start", self.root)
    }
    /// Written when a generation released the volume with nothing left locally.
    pub fn generation_released(&self, generation: u64) -> String {
        format!("{}/gens/{generation:016x}.released", self.root)
    }
}

/// The id at the end of a key of one of [`Keys::with_ids`]' prefixes.
pub fn id_of(key: &str) -> Option<u64> {
    u64::from_str_radix(key.rsplit('/').next()?, 16).ok()
}

/// `volume.json`: what a volume is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Descriptor format version; this vbd reads and writes 1.
    pub format: u32,
    /// The volume's name, as in its keys.
    pub name: String,
    /// The volume's size in bytes.
    pub size: u64,
    /// Block size in bytes; this vbd supports 4096 only.
    pub block_size: u32,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// Whether `name` can name a volume (it becomes part of object keys and a
/// local directory, so no separators or dot-only names).
pub fn valid_name(name: &str) -> bool {
    crate::volume::valid_name(name)
}

/// Reads a volume's descriptor.
pub async fn read_descriptor(store: &Store, name: &str) -> Result<Descriptor, ObjectError> {
    // Every way into a volume (open, info, delete) comes through here.
    if !valid_name(name) {
        return Err(ObjectError::BadName(name.to_owned()));
    }
    let key = Keys::new(name).descriptor();
    let bytes = match store.get(&key).await {
        Ok(b) => b,
        Err(StoreError::NotFound(_)) => return Err(ObjectError::NoSuchVolume(name.to_owned())),
        Err(e) => return Err(e.into()),
    };
    let mut d: Descriptor = match serde_json::from_slice(&bytes) {
        Ok(d) => d,
        Err(source) => return Err(ObjectError::Descriptor { key, source }),
    };
    if d.format != 1 || d.block_size as usize != super::format::BLOCK {
        return Err(ObjectError::Unsupported {
            key,
            format: d.format,
            block_size: d.block_size,
        });
    }
    // The size a resize set, if one did (the descriptor keeps the size
    // the volume was created with).
    if let Some(size) = super::resize::resized(store, &Keys::new(name)).await? {
        d.size = size;
    }
    Ok(d)
}

/// Creates a volume's descriptor; fails if the volume exists.
pub async fn create_descriptor(
    store: &Store,
    name: &str,
    size: u64,
) -> Result<Descriptor, ObjectError> {
    if !valid_name(name) {
        return Err(ObjectError::BadName(name.to_owned()));
    }
    let block = super::format::BLOCK as u64;
    if size == 0 || !size.is_multiple_of(block) {
        return Err(ObjectError::BadSize(size));
    }
    let d = Descriptor {
        format: 1,
        name: name.to_owned(),
        size,
        block_size: block as u32,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let body = serde_json::to_vec_pretty(&d).map_err(|source| ObjectError::Encode {
        what: "volume descriptor",
        source,
    })?;
    let key = Keys::new(name).descriptor();
    match store.put_new(&key, Bytes::from(body.clone())).await {
        Ok(()) => Ok(d),
        Err(StoreError::AlreadyExists(_)) => Err(ObjectError::Exists(name.to_owned())),
        Err(StoreError::NoConditionalPut) => {
            // Without conditional writes, check first (racy, but only
            // between two simultaneous creates of the same name).
            if store.get(&key).await.is_ok() {
                return Err(ObjectError::Exists(name.to_owned()));
            }
            store.put(&key, Bytes::from(body)).await?;
            Ok(d)
        }
        Err(e) => Err(e.into()),
    }
}

/// Local state directory for WAL segments, by default
/// `/var/lib/vbd/wal` as root, else `$XDG_STATE_HOME/vbd/wal` or
/// `~/.local/state/vbd/wal`.
pub fn default_wal_root() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/vbd/wal");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("vbd/wal");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/state/vbd/wal")
}

/// The WAL directory of one volume: stores get their own subdirectory
/// (named by a hash of the URL) so equal volume names never collide.
pub fn wal_dir(root: &Path, store_url: &str, name: &str) -> PathBuf {
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in store_url.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    root.join(format!("{h:016x}")).join(name)
}

/// Who holds a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Host name of the writer's machine.
    pub host: String,
    /// The writer's process id on that host.
    pub pid: u32,
    /// The process's start time (clock ticks since boot), so a reused pid
    /// is not mistaken for the owner.
    #[serde(default)]
    pub started: u64,
}

/// Start time of a live (non-zombie) process, from /proc/PID/stat.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after its ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

impl Owner {
    /// This process.
    pub fn me() -> Owner {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let pid = std::process::id();
        Owner {
            host,
            pid,
            started: process_start(pid).unwrap_or(0),
        }
    }

    /// Whether the owner is a process on this host that still runs.
    pub fn is_alive_here(&self) -> bool {
        self.host == Owner::me().host && process_start(self.pid) == Some(self.started)
    }

    /// Whether the owner is this host's process that no longer runs.
    pub fn is_stale(&self, me: &Owner) -> bool {
        self.host == me.host && process_start(self.pid) != Some(self.started)
    }
}

/// Creates a volume's WAL directory and takes an exclusive flock on its
/// `lock` file, so two processes on one host never share a WAL; the lock
/// lasts as long as the returned file stays open.
pub fn lock_wal_dir(name: &str, wal: &Path) -> Result<File, ObjectError> {
    std::fs::create_dir_all(wal).map_err(|source| ObjectError::Local {
        path: wal.to_owned(),
        source,
    })?;
    let path = wal.join("lock");
    let file = match File::create(&path) {
        Ok(f) => f,
        Err(source) => return Err(ObjectError::Local { path, source }),
    };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(ObjectError::Locked {
            name: name.to_owned(),
            owner: "another vbd process on this host".into(),
        });
    }
    Ok(file)
}

/// The one-writer lock: an exclusive flock on the local WAL directory and a
/// lock object in the store naming the owner.
pub struct WriterLock {
    _file: File,
    key: String,
}

impl WriterLock {
    /// Takes the lock, replacing a lock object left by a dead process on
    /// this host.
    pub async fn take(store: &Store, name: &str, wal: &Path) -> Result<WriterLock, ObjectError> {
        let file = lock_wal_dir(name, wal)?;
        let key = Keys::new(name).lock();
        let me = Owner::me();
        let body = serde_json::to_vec(&me).map_err(|source| ObjectError::Encode {
            what: "lock owner",
            source,
        })?;
        let body = Bytes::from(body);
        match store.put_new(&key, body.clone()).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists(_)) | Err(StoreError::NoConditionalPut) => {
                match store.get(&key).await {
                    Ok(b) => {
                        let owner: Option<Owner> = serde_json::from_slice(&b).ok();
                        match owner {
                            // Left by a process on this host that has died (the
                            // flock alone cannot tell: WAL directories may differ).
                            Some(o) if o.is_stale(&me) => {}
                            Some(o) => {
                                return Err(ObjectError::Locked {
                                    name: name.to_owned(),
                                    owner: format!("pid {} on {}", o.pid, o.host),
                                });
                            }
                            None => {}
                        }
                    }
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                store.put(&key, body).await?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(WriterLock { _file: file, key })
    }

    /// Releases the store lock object (the flock goes with the file).
    pub async fn release(self, store: &Store) -> Result<(), ObjectError> {
        store.delete(&self.key).await?;
        Ok(())
    }
}

/// Reads the owner named by a volume's lock object, if any.
pub async fn lock_owner(store: &Store, name: &str) -> Result<Option<Owner>, ObjectError> {
    match store.get(&Keys::new(name).lock()).await {
        Ok(b) => Ok(serde_json::from_slice(&b).ok()),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ids() {
        let k = Keys::new("os");
        assert_eq!(k.chunk(255), "volumes/os/chunks/00000000000000ff");
        assert_eq!(id_of(&k.chunk(255)), Some(255));
        assert_eq!(id_of("volumes/os/chunks/zz"), None);
        let a = wal_dir(Path::new("/w"), "file:///a", "os");
        let b = wal_dir(Path::new("/w"), "file:///b", "os");
        assert_ne!(a, b);
        assert!(a.ends_with("os"));
    }
}
