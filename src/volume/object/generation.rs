//! Writer generations: who may change a volume, and which of its objects
//! count.
//!
//! Taking a volume for writing creates `gens/<n>` with a create-if-absent
//! PUT (`If-None-Match: *`), `n` one past the newest record: of writers
//! racing for the same `n`, exactly one wins. That is the one conditional
//! write every store vbd was tested against honours (docs/object-stores.md:
//! Ceph RGW 16.2 refuses `If-Match` with a quoted ETag, a local directory
//! has no `If-Match` at all), so nothing here needs more.
//!
//! Every object a writer creates that later readers must judge carries an
//! id from one sequence per writer, its generation in the middle bits
//! (`id = generation << 32 | n`, `n` counting from 1; the top 8 bits stay
//! free for the layer tag of `lineage`): chunks and checkpoints (in their
//! keys), snapshots (in their description), a clone's flatten marks and
//! resize records (in their keys). Every object names its writer, and a
//! later generation's objects sort after an earlier one's.
//!
//! Right after taking generation `n`, the writer lists the store and writes
//! `gens/<n>.start`: for each earlier generation, the highest id of its
//! objects that it found (and that counted before). That is the fence:
//! an earlier generation's objects above it (a paused writer's uploads
//! that landed after the take-over) are ignored by readers, recovery and
//! garbage collection, and deleted by the holder. Because a writer checks,
//! after each put, that no later generation exists before it treats the
//! object as published (`fence::verify`), everything a writer published
//! was in the store before its successor listed it, so the fence never cuts
//! off an acknowledged write. And because a writer allocates a new id and
//! puts its object under one lock (`fence::Fence::put_order`), its objects
//! land in id order: a successor that found id `k` of a generation has
//! every lower id of it that will ever land, so nothing put late falls
//! under the fence. (An import's parallel chunk puts are the one
//! exception: nobody may open a volume while it is being imported.)
//!
//! A clean release writes `gens/<n>.released`; `gens/` records are never
//! rewritten, only created, so no store needs more than create-if-absent.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::ObjectError;
use super::durability::Durability;
use super::layout::{self, Keys, Owner, id_of};
use crate::objstore::{Store, StoreError};

/// Bits of an id below the generation: 2^32 ids per generation (16 PiB of
/// 4 MiB chunks), far more than one writer's session uses.
pub const GENERATION_SHIFT: u32 = 32;
/// The highest generation an id can carry: 24 bits, so that the id keeps
/// clear of the top 8 bits, which a map uses for the layer tag of a
/// clone's parents (`lineage::LAYER_SHIFT`).
pub const MAX_GENERATION: u64 = (1 << 24) - 1;

/// The generation an id belongs to (0: written before vbd had
/// generations). Ignores a layer tag, if any.
pub fn generation_of(id: u64) -> u64 {
    (id >> GENERATION_SHIFT) & MAX_GENERATION
}

/// The lowest id of a generation: its checkpoints are never below it, and
/// its first chunk is one above it.
pub fn base_id(generation: u64) -> u64 {
    generation << GENERATION_SHIFT
}

/// `gens/<n>`: who took generation `n`, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// The generation.
    pub generation: u64,
    /// The process that took it.
    pub holder: Owner,
    /// The holder's WAL directory (on its host): where writes it acknowledged
    /// but did not upload are, if it is lost.
    pub wal_dir: String,
    /// What the holder's FLUSH promised.
    pub durability: Durability,
    /// Seconds since the Unix epoch.
    pub taken_unix: u64,
    /// The generation this one took the volume from without a release.
    #[serde(default)]
    pub took_over: Option<u64>,
}

/// `gens/<n>.start`: the fences generation `n` started from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRecord {
    /// The generation.
    pub generation: u64,
    /// For each earlier generation with objects that count, the highest id
    /// that counts.
    pub limits: BTreeMap<u64, u64>,
}

/// `gens/<n>.released`: generation `n` left nothing behind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// The generation.
    pub generation: u64,
    /// Seconds since the Unix epoch.
    pub released_unix: u64,
    /// Highest sequence number in the store at release.
    pub max_seq: u64,
}

/// Which chunk and checkpoint ids count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fences {
    /// Objects of this generation and later all count.
    pub from: u64,
    /// For earlier generations, the highest id that counts (absent: none).
    pub limits: BTreeMap<u64, u64>,
}

impl Fences {
    /// Every object counts: a volume from before generations.
    pub fn all() -> Fences {
        Fences::default()
    }

    /// Whether the object with this id counts.
    pub fn counts(&self, id: u64) -> bool {
        let g = generation_of(id);
        g >= self.from || self.limits.get(&g).is_some_and(|&max| id <= max)
    }
}

/// What `gens/` holds, per generation.
#[derive(Clone, Debug, Default)]
struct Listing {
    /// generation → (record, start, released) present.
    gens: BTreeMap<u64, [bool; 3]>,
}

impl Listing {
    async fn read(store: &Store, keys: &Keys) -> Result<Listing, StoreError> {
        let prefix = keys.generations();
        let mut l = Listing::default();
        for (key, _) in store.list(&prefix).await? {
            let Some(name) = key.rsplit('/').next() else {
                continue;
            };
            let (num, kind) = name.split_once('.').unwrap_or((name, ""));
            let Ok(g) = u64::from_str_radix(num, 16) else {
                continue;
            };
            let slot = match kind {
                "" => 0,
                "start" => 1,
                "released" => 2,
                _ => continue,
            };
            l.gens.entry(g).or_default()[slot] = true;
        }
        Ok(l)
    }

    /// The newest generation taken (0: none).
    fn latest(&self) -> u64 {
        self.gens
            .iter()
            .rev()
            .find(|(_, p)| p[0])
            .map_or(0, |(g, _)| *g)
    }

    fn released(&self, g: u64) -> bool {
        self.gens.get(&g).is_some_and(|p| p[2])
    }

    fn latest_start(&self) -> Option<u64> {
        self.gens.iter().rev().find(|(_, p)| p[1]).map(|(g, _)| *g)
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    store: &Store,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match store.get(key).await {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                warn!(key, "unreadable generation record ignored: {e}");
                Ok(None)
            }
        },
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn to_json<T: Serialize>(what: &'static str, v: &T) -> Result<Bytes, ObjectError> {
    serde_json::to_vec_pretty(v)
        .map(Bytes::from)
        .map_err(|source| ObjectError::Encode { what, source })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a volume's writer stands, as `vbd volume info` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Holding {
    /// The newest generation (0: never opened for writing since generations).
    pub generation: u64,
    /// Its record, if readable.
    pub record: Option<GenerationRecord>,
    /// Whether it released the volume cleanly (or none was ever taken).
    pub released: bool,
}

impl Holding {
    /// Who holds the volume now, as text; `None` when it is free.
    pub fn holder(&self) -> Option<String> {
        if self.released {
            return None;
        }
        Some(match &self.record {
            Some(r) => format!("pid {} on {}", r.holder.pid, r.holder.host),
            None => format!("generation {} (its record is unreadable)", self.generation),
        })
    }
}

/// Reads where a volume's writer stands.
pub async fn holding(store: &Store, keys: &Keys) -> Result<Holding, StoreError> {
    let l = Listing::read(store, keys).await?;
    let generation = l.latest();
    if generation == 0 {
        return Ok(Holding {
            released: true,
            ..Holding::default()
        });
    }
    Ok(Holding {
        generation,
        record: read_json(store, &keys.generation(generation)).await?,
        released: l.released(generation),
    })
}

/// The fences a reader applies: those of the newest generation that wrote
/// its start record (every object counts on a volume without generations).
pub async fn read_fences(store: &Store, keys: &Keys) -> Result<Fences, StoreError> {
    let l = Listing::read(store, keys).await?;
    match l.latest_start() {
        Some(g) => start_fences(store, keys, g).await,
        None => Ok(Fences::all()),
    }
}

async fn start_fences(store: &Store, keys: &Keys, g: u64) -> Result<Fences, StoreError> {
    Ok(
        match read_json::<StartRecord>(store, &keys.generation_start(g)).await? {
            Some(s) => Fences {
                from: s.generation,
                limits: s.limits,
            },
            // Unreadable: the next older start record would be a guess, and
            // counting everything is what a volume without generations does.
            None => Fences::all(),
        },
    )
}

/// The newest generation if it has not written its start record yet: a
/// take under way (or one whose taker died), whose fence is not drawn, so
/// whether older generations' latest objects count is not settled.
pub async fn unsettled(store: &Store, keys: &Keys) -> Result<Option<u64>, StoreError> {
    let l = Listing::read(store, keys).await?;
    let latest = l.latest();
    Ok((latest > 0 && l.latest_start() != Some(latest)).then_some(latest))
}

/// How the volume came to this writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handover {
    /// No earlier generation (a new volume, or one from before generations
    /// that no live writer holds).
    Fresh,
    /// The previous generation released it: nothing to recover.
    Released,
    /// The previous holder was a process on this host that is gone.
    StaleLocal,
    /// The previous holder did not release it and was fenced (take-over).
    TakeOver,
}

impl Handover {
    /// The word logs and `vbd volume info` use.
    pub fn name(&self) -> &'static str {
        match self {
            Handover::Fresh => "fresh",
            Handover::Released => "released",
            Handover::StaleLocal => "stale-local",
            Handover::TakeOver => "take-over",
        }
    }
}

/// What taking a generation found and decided.
#[derive(Clone, Debug)]
pub struct Taken {
    /// The generation taken.
    pub generation: u64,
    /// Which objects count for it.
    pub fences: Fences,
    /// The generation before (0: none).
    pub previous: u64,
    /// Its record, if there was a readable one.
    pub previous_record: Option<GenerationRecord>,
    /// How the volume came to this writer.
    pub handover: Handover,
    /// Newest last-modified time (seconds since the epoch) of the previous
    /// generation's objects: when it last reached the store.
    pub previous_last_upload_unix: Option<i64>,
    /// Set when the store did not refuse a second create of the same key:
    /// two writers opening at the same instant could both win there.
    pub create_not_exclusive: bool,
}

/// How to take a generation.
#[derive(Clone, Debug)]
pub struct TakeOptions {
    /// Fence a holder that did not release the volume instead of refusing.
    pub take_over: bool,
    /// What this writer's FLUSH promises (recorded for a successor).
    pub durability: Durability,
    /// This writer's WAL directory (recorded for a successor).
    pub wal_dir: String,
}

/// Takes the next generation of volume `name`: refuses while another live
/// writer holds it (unless `take_over`), creates `gens/<n>`, computes the
/// fences from what the store holds now and writes `gens/<n>.start`.
pub async fn take(store: &Store, name: &str, opts: &TakeOptions) -> Result<Taken, ObjectError> {
    let keys = Keys::new(name);
    let me = Owner::me();
    let listing = Listing::read(store, &keys).await?;
    let previous = listing.latest();
    let previous_record: Option<GenerationRecord> = if previous > 0 {
        read_json(store, &keys.generation(previous)).await?
    } else {
        None
    };
    // A lock object left by a vbd from before generations.
    let legacy = layout::lock_owner(store, name).await?;
    let held_by = match (&legacy, previous > 0 && !listing.released(previous)) {
        (Some(o), _) => Some(Some(o.clone())),
        (None, true) => Some(previous_record.as_ref().map(|r| r.holder.clone())),
        (None, false) => None,
    };
    let handover = match held_by {
        None if previous == 0 => Handover::Fresh,
        None => Handover::Released,
        Some(Some(o)) if o.is_stale(&me) => Handover::StaleLocal,
        Some(_) if opts.take_over => Handover::TakeOver,
        Some(o) => {
            let who = o.map_or_else(
                || format!("generation {previous} (its record is unreadable)"),
                |o| format!("pid {} on {} (generation {previous})", o.pid, o.host),
            );
            return Err(ObjectError::Locked {
                name: name.to_owned(),
                owner: who,
            });
        }
    };
    let generation = previous + 1;
    if generation > MAX_GENERATION {
        return Err(ObjectError::GenerationsExhausted(name.to_owned()));
    }
    let record = GenerationRecord {
        generation,
        holder: me,
        wal_dir: opts.wal_dir.clone(),
        durability: opts.durability,
        taken_unix: now_unix(),
        took_over: matches!(handover, Handover::TakeOver | Handover::StaleLocal)
            .then_some(previous),
    };
    let body = to_json("generation record", &record)?;
    let key = keys.generation(generation);
    let create_not_exclusive = match store.put_new(&key, body.clone()).await {
        Ok(()) => {
            // A store that ignores If-None-Match lets this second create
            // through too; one that honours it refuses.
            match store.put_new(&key, body.clone()).await {
                Err(StoreError::AlreadyExists(_)) => false,
                Ok(()) => true,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::AlreadyExists(_)) => {
            return Err(ObjectError::Locked {
                name: name.to_owned(),
                owner: format!("another writer that took generation {generation} just now"),
            });
        }
        Err(StoreError::NoConditionalPut) => {
            if store.exists(&key).await? {
                return Err(ObjectError::Locked {
                    name: name.to_owned(),
                    owner: format!("another writer that took generation {generation} just now"),
                });
            }
            store.put(&key, body).await?;
            true
        }
        Err(e) => return Err(e.into()),
    };
    if create_not_exclusive {
        warn!(
            volume = name,
            store = store.url(),
            "this store does not refuse a create-if-absent PUT of an existing key: vbd falls back \
             to check-then-create, so two hosts opening this volume at the same instant could both \
             take it; a paused or partitioned writer is still fenced"
        );
    }
    let previous_fences = match listing.latest_start() {
        Some(g) => start_fences(store, &keys, g).await?,
        None => Fences::all(),
    };
    let mut limits: BTreeMap<u64, u64> = BTreeMap::new();
    let mut previous_last_upload_unix = None;
    let mut found = |id: u64, modified_unix: Option<i64>| {
        let g = generation_of(id);
        if id == 0 || g >= generation || !previous_fences.counts(id) {
            return;
        }
        let max = limits.entry(g).or_insert(id);
        *max = (*max).max(id);
        if g == previous {
            previous_last_upload_unix = previous_last_upload_unix.max(modified_unix);
        }
    };
    for prefix in keys.with_ids() {
        for o in store.list_modified(&prefix).await? {
            if let Some(id) = id_of(&o.key) {
                found(id, Some(o.modified_unix));
            }
        }
    }
    // Snapshots carry their id in their description.
    for (_, meta) in super::snapshot::all(store, name).await? {
        found(meta.id, None);
    }
    let start = StartRecord {
        generation,
        limits: limits.clone(),
    };
    store
        .put(
            &keys.generation_start(generation),
            to_json("generation start record", &start)?,
        )
        .await?;
    if legacy.is_some() {
        // The generation records say who holds the volume from now on.
        store.delete(&keys.lock()).await?;
    }
    Ok(Taken {
        generation,
        fences: Fences {
            from: generation,
            limits,
        },
        previous,
        previous_record,
        handover,
        previous_last_upload_unix,
        create_not_exclusive,
    })
}

/// Whether a later generation than `generation` was taken: the caller has
/// been fenced and must not publish anything. Generations are taken in
/// order and their records never deleted, so checking the next one is enough.
pub async fn superseded(store: &Store, keys: &Keys, generation: u64) -> Result<bool, StoreError> {
    store.exists(&keys.generation(generation + 1)).await
}

/// Records that `generation` released the volume with nothing left locally.
pub async fn write_release(
    store: &Store,
    keys: &Keys,
    generation: u64,
    max_seq: u64,
) -> Result<(), ObjectError> {
    let r = ReleaseRecord {
        generation,
        released_unix: now_unix(),
        max_seq,
    };
    store
        .put(
            &keys.generation_released(generation),
            to_json("generation release record", &r)?,
        )
        .await?;
    Ok(())
}

/// What a take-over may have lost, as honestly as the store can tell: it
/// holds what the old holder uploaded, never what it acknowledged since.
pub fn loss_report(t: &Taken, store_seq: u64, now_unix: i64) -> Option<String> {
    if !matches!(t.handover, Handover::TakeOver | Handover::StaleLocal) {
        return None;
    }
    let who = match &t.previous_record {
        Some(r) => format!(
            "generation {} (pid {} on {}, durability={}, WAL {})",
            t.previous, r.holder.pid, r.holder.host, r.durability, r.wal_dir
        ),
        None => format!("generation {} (its record is unreadable)", t.previous),
    };
    let when = match t.previous_last_upload_unix {
        Some(at) => format!(
            "its last object reached the store {} s before this take-over",
            (now_unix - at).max(0)
        ),
        None => "it uploaded nothing".to_owned(),
    };
    let promise = match t.previous_record.as_ref().map(|r| r.durability) {
        Some(Durability::Store) => {
            "it ran with durability=store, so every write it acknowledged to a FLUSH or FUA is \
             here; writes it acknowledged without a FLUSH since its last upload are lost"
        }
        _ => {
            "it ran with durability=local: writes it acknowledged after its last upload, \
             flushed ones included, are lost; how many cannot be known from the store (they are \
             in its WAL on its host, which vbd does not replay once the volume has moved on)"
        }
    };
    Some(format!(
        "took the volume over from {who}, which did not release it: the store holds its writes \
         up to sequence {store_seq}; {when}; {promise}"
    ))
}

/// Where a WAL directory records which generation its records belong to.
fn wal_generation_path(wal_dir: &Path) -> std::path::PathBuf {
    wal_dir.join("generation")
}

/// The generation a WAL directory's records were written under (`None`: a
/// WAL from before generations, or an empty one).
pub fn wal_generation(wal_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(wal_generation_path(wal_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Records (durably) that new records in `wal_dir` belong to `generation`.
pub fn set_wal_generation(wal_dir: &Path, generation: u64) -> std::io::Result<()> {
    let path = wal_generation_path(wal_dir);
    let tmp = wal_dir.join("generation.tmp");
    std::fs::write(&tmp, format!("{generation}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(wal_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_generation() {
        assert_eq!(generation_of(0xff), 0);
        assert_eq!(generation_of(base_id(7) + 1), 7);
        assert!(base_id(8) > base_id(7) + 1_000_000);
        assert_eq!(generation_of(base_id(MAX_GENERATION)), MAX_GENERATION);
    }

    #[test]
    fn fences_cut_each_generation_at_its_limit() {
        let f = Fences {
            from: 3,
            limits: BTreeMap::from([(0, 40), (1, base_id(1) + 5)]),
        };
        assert!(f.counts(40));
        assert!(!f.counts(41), "gen 0 beyond its fence");
        assert!(f.counts(base_id(1) + 5));
        assert!(!f.counts(base_id(1) + 6));
        assert!(!f.counts(base_id(2) + 1), "gen 2 had nothing that counts");
        assert!(f.counts(base_id(3) + 1));
        assert!(f.counts(base_id(9)));
        assert!(Fences::all().counts(base_id(5) + 3));
    }
}
