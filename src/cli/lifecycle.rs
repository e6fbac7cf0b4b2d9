//! `vbd volume` lifecycle commands: import, export, snapshot, clone,
//! flatten, resize and gc. Each goes through the control API of the `vbd
//! serve` that has the volume open on this host, or straight to the store
//! when nobody has it open (see `route`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vbd::control::model::{ResizeRequest, SnapshotInfo};
use vbd::objstore::Store;
use vbd::runtime::runtime;
use vbd::server::{Registry, Server, ServerConfig, signals};
use vbd::volume::Volume;
use vbd::volume::object::transfer::{self, Progress};
use vbd::volume::object::{ObjectOptions, ObjectVolume, admin, clone, layout, snapshot};

use super::progress::Shown;
use super::route::{Route, locate};

/// Set when SIGINT or SIGTERM arrives during an import or export.
static STOP: AtomicBool = AtomicBool::new(false);

/// Turns SIGINT and SIGTERM into [`STOP`]. Must run before any other
/// thread starts, so that they all inherit the blocked mask.
pub(crate) fn catch_interrupts() -> Result<()> {
    signals::block_termination().context("blocking SIGTERM/SIGINT")?;
    std::thread::spawn(|| {
        if signals::wait_for_termination().is_ok() {
            STOP.store(true, Ordering::Relaxed);
        }
    });
    Ok(())
}

/// How to open volumes here.
pub(crate) fn options(wal_dir: Option<&Path>, read_only: bool) -> ObjectOptions {
    let mut o = ObjectOptions {
        read_only,
        ..ObjectOptions::default()
    };
    if let Some(d) = wal_dir {
        o.wal_root = d.to_owned();
    }
    o
}

/// Opens `name` here, runs `f`, then closes it (draining its WAL and
/// releasing its lock).
fn direct<T>(
    store: &Store,
    name: &str,
    wal_dir: Option<&Path>,
    f: impl FnOnce(&ObjectVolume) -> Result<T>,
) -> Result<T> {
    runtime().block_on(transfer::check_finished(store, name))?;
    let v = ObjectVolume::open(store.clone(), name, options(wal_dir, false))
        .with_context(|| format!("opening volume {name}"))?;
    let r = f(&v);
    v.shutdown();
    r
}

/// `vbd volume snapshot NAME@SNAP`.
pub(crate) fn snapshot(
    store: &Store,
    spec: &str,
    wal: Option<&Path>,
    ctl: Option<&Path>,
) -> Result<String> {
    let (volume, Some(snap)) = snapshot::split(spec) else {
        bail!("{spec:?}: name the snapshot as VOLUME@SNAPSHOT");
    };
    let meta = match locate(store, volume, ctl)? {
        Route::Server { client, name } => client.snapshot(&name, snap)?,
        Route::Direct => direct(store, volume, wal, |v| Ok(v.snapshot(snap)?))?,
    };
    Ok(format!(
        "snapshot {}@{} taken ({} bytes)\n",
        meta.volume, meta.name, meta.size
    ))
}

/// `vbd volume snapshots NAME`.
pub(crate) fn snapshots(store: &Store, volume: &str) -> Result<String> {
    let list: Vec<SnapshotInfo> = runtime().block_on(snapshot::list(store, volume))?;
    let mut t = format!(
        "{:<24} {:<24} {:>16} {:>16}\n",
        "NAME", "TAKEN (UTC)", "SIZE", "EXCLUSIVE"
    );
    for s in list {
        t += &format!(
            "{:<24} {:<24} {:>16} {:>16}\n",
            s.meta.name,
            utc(s.meta.created_ms / 1000),
            s.meta.size,
            s.exclusive_bytes
        );
    }
    Ok(t)
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS`.
fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `vbd volume delete NAME@SNAP`.
pub(crate) fn delete_snapshot(
    store: &Store,
    volume: &str,
    snap: &str,
    ctl: Option<&Path>,
) -> Result<()> {
    match locate(store, volume, ctl)? {
        Route::Server { client, name } => client.delete_snapshot(&name, snap)?,
        Route::Direct => runtime().block_on(snapshot::delete(store, volume, snap, 0))?,
    }
    Ok(())
}

/// `vbd volume clone NAME@SNAP NEW`: needs nothing of the parent but its
/// (immutable) snapshot, so it runs on the store whoever holds the parent.
pub(crate) fn clone_volume(store: &Store, spec: &str, new: &str) -> Result<String> {
    let (volume, Some(snap)) = snapshot::split(spec) else {
        bail!("{spec:?}: name the snapshot to clone as VOLUME@SNAPSHOT");
    };
    let d = runtime().block_on(clone::create(store, volume, snap, new))?;
    Ok(format!(
        "created clone {} of {volume}@{snap} ({} bytes)\n",
        d.name, d.size
    ))
}

/// `vbd volume flatten NAME`.
pub(crate) fn flatten(
    store: &Store,
    volume: &str,
    wal: Option<&Path>,
    ctl: Option<&Path>,
) -> Result<String> {
    let n = match locate(store, volume, ctl)? {
        Route::Server { client, name } => client.flatten(&name)?,
        Route::Direct => direct(store, volume, wal, |v| Ok(v.flatten()?))?,
    };
    Ok(format!(
        "flattened {volume}: copied {n} bytes from its parents\n"
    ))
}

/// `vbd volume resize NAME SIZE`.
pub(crate) fn resize(
    store: &Store,
    volume: &str,
    size: u64,
    allow_shrink: bool,
    wal: Option<&Path>,
    ctl: Option<&Path>,
) -> Result<String> {
    let old = match locate(store, volume, ctl)? {
        Route::Server { client, name } => {
            client
                .resize(&name, &ResizeRequest { size, allow_shrink })?
                .old_size
        }
        Route::Direct => direct(store, volume, wal, |v| Ok(v.resize(size, allow_shrink)?))?,
    };
    Ok(format!("resized {volume} from {old} to {size} bytes\n"))
}

/// `vbd volume gc NAME`.
pub(crate) fn gc(
    store: &Store,
    volume: &str,
    wal: Option<&Path>,
    ctl: Option<&Path>,
) -> Result<String> {
    let n = match locate(store, volume, ctl)? {
        Route::Server { client, name } => client.gc(&name)?,
        Route::Direct => direct(store, volume, wal, |v| Ok(v.collect_garbage(true)?))?,
    };
    Ok(format!("collected {n} chunks of {volume}\n"))
}

/// What `qemu-img info` says of an image: its format and virtual size.
fn image_info(path: &Path, format: Option<&str>) -> Result<(String, u64)> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json"]);
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    let out = cmd.arg(path).output();
    match out {
        Ok(o) if o.status.success() => {
            let v: Value = serde_json::from_slice(&o.stdout).context("parsing qemu-img info")?;
            let f = v["format"].as_str().unwrap_or("raw").to_owned();
            let size = v["virtual-size"]
                .as_u64()
                .context("qemu-img info gave no virtual-size")?;
            Ok((f, size))
        }
        Ok(o) => bail!(
            "qemu-img info {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        // Without qemu-img only raw images can be read.
        Err(_) if format.is_none_or(|f| f == "raw") => {
            let len = std::fs::metadata(path)
                .with_context(|| format!("reading {}", path.display()))?
                .len();
            Ok(("raw".into(), len))
        }
        Err(e) => Err(e).context("running qemu-img (package qemu-utils)"),
    }
}

/// `vbd volume import NAME FILE`. An interrupted or failed import deletes
/// the volume it made; one left by a process that died is deleted and
/// started over by the next import of that name.
pub(crate) fn import(
    store: &Store,
    name: &str,
    file: &Path,
    format: Option<&str>,
    wal: Option<&Path>,
) -> Result<String> {
    let rt = runtime();
    let (fmt, size) = image_info(file, format)?;
    let size = size.next_multiple_of(4096);
    if rt.block_on(transfer::is_unfinished(store, name))? {
        if let Some(o) = rt.block_on(layout::lock_owner(store, name))?
            && (o.host != layout::Owner::me().host || o.is_alive_here())
        {
            bail!(
                "volume {name:?} is being imported by pid {} on {}",
                o.pid,
                o.host
            );
        }
        eprintln!("vbd: deleting the unfinished import of {name} left by a process that died");
        rt.block_on(admin::delete(store, name, true))?;
    }
    rt.block_on(transfer::begin_import(
        store,
        name,
        size,
        &file.display().to_string(),
    ))?;
    let shown = Shown::new(&format!("importing {name}"));
    let result = (|| -> Result<u64> {
        let v = Arc::new(
            ObjectVolume::open(store.clone(), name, options(wal, false))
                .with_context(|| format!("opening volume {name}"))?,
        );
        if fmt == "raw" {
            let r = v.import_raw(file, &shown, &STOP);
            v.shutdown();
            Ok(r?.data_bytes)
        } else {
            // Stopping the private server shuts the volume down.
            convert(&v, file, &fmt, size, &shown).map(|()| 0)
        }
    })();
    shown.finish();
    match result {
        Ok(stored) => {
            rt.block_on(transfer::finish_import(store, name))?;
            let i = rt.block_on(admin::info(store, name))?;
            let how = if fmt == "raw" {
                format!("{stored} bytes of data")
            } else {
                format!("{fmt} through qemu-img")
            };
            Ok(format!(
                "imported {} ({how}) into {name}: {size} bytes, {} stored\n",
                file.display(),
                i.stored_bytes
            ))
        }
        Err(e) => {
            // Never leave a half-made volume behind.
            if let Err(d) = rt.block_on(admin::delete(store, name, true)) {
                eprintln!("vbd: cannot delete the partial volume {name}: {d:#}");
            }
            Err(e.context(format!(
                "import of {} into {name} failed; the partial volume is deleted",
                file.display()
            )))
        }
    }
}

/// Converts a non-raw image into `v` with `qemu-img convert`, writing over
/// NBD to a private export of the volume; zeroes are skipped.
fn convert(v: &Arc<ObjectVolume>, file: &Path, fmt: &str, size: u64, shown: &Shown) -> Result<()> {
    shown.total(size);
    let sock = std::env::temp_dir().join(format!("vbd-import-{}.sock", std::process::id()));
    let registry = Arc::new(Registry::new());
    registry.add("import", v.clone() as Arc<dyn Volume>, false)?;
    let cfg = ServerConfig {
        unix: vec![sock.clone()],
        threads: 1,
        ..ServerConfig::default()
    };
    let server = Server::start(cfg, registry)?;
    let target = format!("nbd+unix:///import?socket={}", sock.display());
    let child = Command::new("qemu-img")
        .args([
            "convert",
            "-p",
            "-n",
            "--target-is-zero",
            "-f",
            fmt,
            "-O",
            "raw",
        ])
        .arg(file)
        .arg(&target)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running qemu-img (package qemu-utils)");
    let r = child.and_then(|mut child| {
        // qemu-img -p prints "    (12.34/100%)\r" as it goes.
        let mut out = child.stdout.take().context("qemu-img stdout")?;
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            use std::io::Read;
            let mut last = 0.0f64;
            while out.read(&mut byte).is_ok_and(|n| n == 1) {
                if byte[0] == b'\r' || byte[0] == b'\n' {
                    let s = String::from_utf8_lossy(&buf);
                    if let Some(p) = s.trim().strip_prefix('(').and_then(|s| s.split('/').next())
                        && let Ok(p) = p.parse::<f64>()
                    {
                        last = p;
                    }
                    buf.clear();
                } else {
                    buf.push(byte[0]);
                }
                PERCENT.store(last.to_bits(), Ordering::Relaxed);
            }
        });
        loop {
            if let Some(status) = child.try_wait()? {
                let _ = reader.join();
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    bail!("qemu-img convert failed ({status}): {}", err.trim());
                }
                shown.set_done(size);
                return Ok(());
            }
            if STOP.load(Ordering::Relaxed) {
                let _ = child.kill();
                let _ = child.wait();
                bail!(vbd::volume::object::ObjectError::Interrupted);
            }
            let p = f64::from_bits(PERCENT.load(Ordering::Relaxed));
            shown.set_done((p / 100.0 * size as f64) as u64);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    server.stop()?;
    r
}

/// The last percentage qemu-img printed, as f64 bits.
static PERCENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `vbd volume export NAME[@SNAP] FILE`: a volume open in a server is
/// exported from a snapshot taken for the purpose (and deleted after), so
/// the file is one instant of it.
pub(crate) fn export(
    store: &Store,
    spec: &str,
    file: &Path,
    wal: Option<&Path>,
    ctl: Option<&Path>,
) -> Result<String> {
    let (volume, snap) = snapshot::split(spec);
    let mut temp = None;
    let source = match snap {
        Some(_) => spec.to_owned(),
        None => match locate(store, volume, ctl)? {
            Route::Server { client, name } => {
                let s = format!("export-{}", std::process::id());
                client.snapshot(&name, &s)?;
                temp = Some((client, name, s.clone()));
                format!("{volume}@{s}")
            }
            Route::Direct => volume.to_owned(),
        },
    };
    let shown = Shown::new(&format!("exporting {spec}"));
    let r = ObjectVolume::open(store.clone(), &source, options(wal, true))
        .map_err(anyhow::Error::from)
        .and_then(|v| Ok(v.export_raw(file, &shown, &STOP)?));
    shown.finish();
    if let Some((client, name, s)) = temp
        && let Err(e) = client.delete_snapshot(&name, &s)
    {
        eprintln!("vbd: cannot delete the export's snapshot {volume}@{s}: {e:#}");
    }
    if r.is_err() {
        let _ = std::fs::remove_file(file);
    }
    let stats = r.with_context(|| format!("exporting {spec} to {}", file.display()))?;
    Ok(format!(
        "exported {spec} to {}: {} bytes, {} of data\n",
        file.display(),
        stats.bytes,
        stats.data_bytes
    ))
}
