//! `vbd volume`: create, list, inspect and delete object-store volumes,
//! straight in the store (no running vbd needed), their lifecycle
//! (import, export, snapshots, clones, resize), which goes through a
//! running `vbd serve` that has the volume open (see `lifecycle`), and
//! their moves between hosts: release a volume to another host (through
//! the control API of the vbd serving it here) or take one over from a
//! host that is gone.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::route::{self, Route};
use super::{ControlArg, default_store_url, lifecycle, print};
use vbd::control::model::ReleaseRequest;
use vbd::objstore::Store;
use vbd::runtime::runtime;
use vbd::size::parse_size;
use vbd::volume::object::generation;
use vbd::volume::object::layout::{Keys, default_wal_root};
use vbd::volume::object::{ObjectOptions, admin, snapshot};

#[derive(Args)]
pub(crate) struct StoreArg {
    /// Object store URL: file:///DIR or s3://BUCKET[/PREFIX] (S3 settings and
    /// credentials come from AWS_* variables or ~/.aws/credentials).
    /// Default: the embedded local store.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
}

impl StoreArg {
    fn url(&self) -> String {
        self.store.clone().unwrap_or_else(default_store_url)
    }

    fn open(&self) -> Result<Store> {
        let url = self.url();
        Store::open(&url).with_context(|| format!("opening store {url}"))
    }
}

/// `vbd volume` subcommands.
#[derive(Subcommand)]
pub(crate) enum VolumeCmd {
    /// Create a volume (instant, whatever its size).
    Create {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        /// Size, e.g. 10G or 1T (a multiple of 4 KiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Show a volume's size, storage use and lock holder (as JSON).
    Info {
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
    /// Drain a volume's WAL to the store and release it, so another host
    /// opens it with nothing to recover: through the control API of the vbd
    /// on this host that serves it, or directly if its holder on this host
    /// is gone (replaying the WAL it left here first).
    Release {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        #[command(flatten)]
        control: ControlArg,
        /// Where this host keeps WALs (as `vbd serve --wal-dir`).
        #[arg(long, value_name = "DIR")]
        wal_dir: Option<PathBuf>,
    },
    /// Take a volume whose holder is gone or unreachable: fence its
    /// generation, settle the volume at what the store holds, print what may
    /// be lost, and release it for the next host to open.
    TakeOver {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        /// Where this host keeps WALs (as `vbd serve --wal-dir`).
        #[arg(long, value_name = "DIR")]
        wal_dir: Option<PathBuf>,
    },
    /// Delete a volume and all its objects (and its snapshots), or one
    /// snapshot (NAME@SNAP). Refused while clones read through them.
    Delete {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        at: Where,
        name: String,
        /// Delete even if a writer lock is held (for a lock left by a lost machine).
        #[arg(long)]
        force: bool,
    },
    /// Create NAME from an image file: raw is read directly, other formats
    /// (qcow2, vmdk, vhdx, ...) through qemu-img. Zero blocks are not
    /// stored. An interrupted import deletes what it made.
    Import {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        at: Where,
        name: String,
        file: PathBuf,
        /// The image's format (default: what qemu-img detects; raw without qemu-img).
        #[arg(long)]
        format: Option<String>,
    },
    /// Write a volume or snapshot (NAME[@SNAP]) to a sparse raw file.
    Export {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        at: Where,
        name: String,
        file: PathBuf,
    },
    /// Take a crash-consistent snapshot, NAME@SNAP (instant; no data copied).
    Snapshot {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        at: Where,
        name: String,
    },
    /// List a volume's snapshots: name, time, size and the bytes only each holds.
    Snapshots {
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
    /// Make NEW, a writable clone of NAME@SNAP (instant; reads through to it).
    Clone {
        #[command(flatten)]
        store: StoreArg,
        snapshot: String,
        new: String,
    },
    /// Copy into a clone what it still reads from its parents, so they can go.
    Flatten {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        at: Where,
        name: String,
    },
    /// Grow a volume (instant), or shrink it with --allow-shrink (the tail is discarded).
    Resize {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        at: Where,
        name: String,
        /// New size, e.g. 20G (a multiple of 4 KiB).
        #[arg(value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Collect garbage now: delete chunks no map or snapshot points into.
    Gc {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        at: Where,
        name: String,
    },
}

/// Where a volume open in a running vbd is reached, and where it keeps its
/// write-ahead log when opened here.
#[derive(Args)]
pub(crate) struct Where {
    /// Control socket of the `vbd serve` that may have the volume open
    /// (default: the default one, then the one the lock holder's command line names).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// WAL directory root when the volume is opened here (as `vbd serve --wal-dir`).
    #[arg(long, value_name = "DIR")]
    wal_dir: Option<PathBuf>,
}

/// Runs a `vbd volume` subcommand.
pub(crate) fn run(cmd: VolumeCmd) -> Result<()> {
    if matches!(cmd, VolumeCmd::Import { .. } | VolumeCmd::Export { .. }) {
        // Before the runtime's threads start, so they inherit the mask.
        lifecycle::catch_interrupts()?;
    }
    let rt = runtime();
    match cmd {
        VolumeCmd::Create { store, name, size } => {
            let d = rt.block_on(admin::create(&store.open()?, &name, size))?;
            println!(
                "created volume {} of {} bytes in {}",
                d.name,
                d.size,
                store.url()
            );
        }
        VolumeCmd::List { store } => {
            for d in rt.block_on(admin::list(&store.open()?))? {
                println!("{}\t{}", d.name, d.size);
            }
        }
        VolumeCmd::Info { store, name } => {
            let i = rt.block_on(admin::info(&store.open()?, &name))?;
            println!("{}", serde_json::to_string_pretty(&i)?);
        }
        VolumeCmd::Release {
            store,
            name,
            control,
            wal_dir,
        } => release(&store, &name, &control, wal_dir)?,
        VolumeCmd::TakeOver {
            store,
            name,
            wal_dir,
        } => {
            let url = store.url();
            let h = admin::settle(&url, &name, options(wal_dir, true))
                .with_context(|| format!("taking over volume {name} in {url}"))?;
            println!(
                "took over volume {name} in {url} as generation {} ({})",
                h.generation, h.handover
            );
            match &h.loss {
                Some(loss) => println!("may be lost: {loss}"),
                None => println!("nothing lost: the previous holder released the volume"),
            }
            if !h.released {
                bail!("volume {name} could not be released after the take-over; see the log");
            }
            println!("released: any host can open volume {name} now");
        }
        VolumeCmd::Delete {
            store,
            at,
            name,
            force,
        } => match snapshot::split(&name) {
            (volume, Some(snap)) => {
                lifecycle::delete_snapshot(&store.open()?, volume, snap, at.control.as_deref())?;
                println!("deleted snapshot {name}");
            }
            (_, None) => {
                rt.block_on(admin::delete(&store.open()?, &name, force))?;
                println!("deleted volume {name}");
            }
        },
        VolumeCmd::Import {
            store,
            at,
            name,
            file,
            format,
        } => {
            let s = lifecycle::import(
                &store.open()?,
                &name,
                &file,
                format.as_deref(),
                at.wal_dir.as_deref(),
            )?;
            print(s.as_bytes())?;
        }
        VolumeCmd::Export {
            store,
            at,
            name,
            file,
        } => {
            let s = lifecycle::export(
                &store.open()?,
                &name,
                &file,
                at.wal_dir.as_deref(),
                at.control.as_deref(),
            )?;
            print(s.as_bytes())?;
        }
        VolumeCmd::Snapshot { store, at, name } => {
            let s = lifecycle::snapshot(
                &store.open()?,
                &name,
                at.wal_dir.as_deref(),
                at.control.as_deref(),
            )?;
            print(s.as_bytes())?;
        }
        VolumeCmd::Snapshots { store, name } => {
            print(lifecycle::snapshots(&store.open()?, &name)?.as_bytes())?;
        }
        VolumeCmd::Clone {
            store,
            snapshot,
            new,
        } => {
            print(lifecycle::clone_volume(&store.open()?, &snapshot, &new)?.as_bytes())?;
        }
        VolumeCmd::Flatten { store, at, name } => {
            let s = lifecycle::flatten(
                &store.open()?,
                &name,
                at.wal_dir.as_deref(),
                at.control.as_deref(),
            )?;
            print(s.as_bytes())?;
        }
        VolumeCmd::Resize {
            store,
            at,
            name,
            size,
            allow_shrink,
        } => {
            let s = lifecycle::resize(
                &store.open()?,
                &name,
                size,
                allow_shrink,
                at.wal_dir.as_deref(),
                at.control.as_deref(),
            )?;
            print(s.as_bytes())?;
        }
        VolumeCmd::Gc { store, at, name } => {
            let s = lifecycle::gc(
                &store.open()?,
                &name,
                at.wal_dir.as_deref(),
                at.control.as_deref(),
            )?;
            print(s.as_bytes())?;
        }
    }
    Ok(())
}

fn options(wal_dir: Option<PathBuf>, take_over: bool) -> ObjectOptions {
    ObjectOptions {
        wal_root: wal_dir.unwrap_or_else(default_wal_root),
        take_over,
        ..ObjectOptions::default()
    }
}

/// `vbd volume release`: asks the vbd on this host that holds the volume,
/// or settles it here if that vbd is gone.
fn release(
    store: &StoreArg,
    name: &str,
    control: &ControlArg,
    wal_dir: Option<PathBuf>,
) -> Result<()> {
    let url = store.url();
    let s = store.open()?;
    match route::locate(&s, name, control.control.as_deref())? {
        Route::Server {
            client,
            name: export,
        } => {
            let reply = client
                .release_volume(&ReleaseRequest {
                    store: url.clone(),
                    volume: name.to_owned(),
                })
                .with_context(|| {
                    format!(
                        "asking the vbd that serves volume {name} (export {export}) through {} \
                         to release it",
                        client.socket.display()
                    )
                })?;
            match reply.outcome.as_str() {
                "released" => println!(
                    "released volume {name} (export {}, generation {}): any host can open it now",
                    reply.export, reply.generation
                ),
                other => bail!(
                    "volume {name} (export {}, generation {}) was not released: {other}; see the \
                     server's log",
                    reply.export,
                    reply.generation
                ),
            }
        }
        Route::Direct => {
            let h = runtime().block_on(generation::holding(&s, &Keys::new(name)))?;
            if h.released {
                println!(
                    "volume {name} is not held (generation {} released it)",
                    h.generation
                );
                return Ok(());
            }
            // Its holder was a process on this host that is gone.
            let gone = h
                .record
                .map_or_else(|| "?".to_owned(), |r| r.holder.pid.to_string());
            let settled = admin::settle(&url, name, options(wal_dir, false))
                .with_context(|| format!("releasing volume {name} in {url}"))?;
            if !settled.released {
                bail!("volume {name} could not be drained to the store; see the log");
            }
            println!(
                "released volume {name} (its holder, pid {gone}, is gone; generation {} drained \
                 what it left here)",
                settled.generation
            );
        }
    }
    Ok(())
}
