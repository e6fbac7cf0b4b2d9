//! Where a lifecycle command runs: through the control API of the `vbd
//! serve` on this host that has the volume open (so it is consistent with
//! the writes in flight), straight on the store when nobody has it open,
//! and nowhere when another host holds it (the holder of its newest writer
//! generation, which did not release it, or a writer lock left by a vbd
//! from before generations). `vbd volume release` finds its way the same.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use vbd::control::client::ControlClient;
use vbd::control::service::default_control_socket;
use vbd::objstore::Store;
use vbd::runtime::runtime;
use vbd::volume::object::generation;
use vbd::volume::object::layout::{self, Keys, Owner};

use super::default_socket;

/// Where to run a command on a volume.
pub(crate) enum Route {
    /// A running server has it open, under this name.
    Server {
        /// Its control socket.
        client: ControlClient,
        /// The volume's name in that server (export or catalog).
        name: String,
    },
    /// Nobody has it open (or its holder on this host died): open it here.
    Direct,
}

/// The process holding `volume` for writing, if any.
fn holder(store: &Store, volume: &str) -> Result<Option<Owner>> {
    if let Some(o) = runtime().block_on(layout::lock_owner(store, volume))? {
        return Ok(Some(o));
    }
    let h = runtime().block_on(generation::holding(store, &Keys::new(volume)))?;
    if h.released {
        return Ok(None);
    }
    match h.record {
        Some(r) => Ok(Some(r.holder)),
        None => bail!(
            "volume {volume:?} is held by writer generation {}, whose record is unreadable; \
             if its holder is gone, take the volume over with `vbd volume take-over`",
            h.generation
        ),
    }
}

/// Finds who holds `volume` and how to reach them.
pub(crate) fn locate(store: &Store, volume: &str, control: Option<&Path>) -> Result<Route> {
    let Some(owner) = holder(store, volume)? else {
        return Ok(Route::Direct);
    };
    let me = Owner::me();
    if owner.host != me.host {
        bail!(
            "volume {volume:?} is open for writing by pid {} on {}; run this there (or, if that \
             host is gone, take the volume over with `vbd volume take-over`)",
            owner.pid,
            owner.host
        );
    }
    if !owner.is_alive_here() {
        // Left by a process that died: opening takes the lock over and
        // replays its write-ahead log.
        return Ok(Route::Direct);
    }
    for socket in candidates(owner.pid, control) {
        let client = ControlClient::new(&socket);
        let Ok(list) = client.volumes() else { continue };
        let found = list.into_iter().find(|v| {
            !v.read_only
                && v.store_volume.as_deref() == Some(volume)
                && v.store.as_deref().map(normal) == Some(normal(store.url()))
        });
        if let Some(v) = found {
            return Ok(Route::Server {
                client,
                name: v.name,
            });
        }
    }
    bail!(
        "volume {volume:?} is open for writing by pid {} on this host, but no control socket \
         that serves it was found; pass --control PATH",
        owner.pid
    )
}

fn normal(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// Control sockets to try: the one given, the default, and the one the
/// holder's command line names (`--control`, or beside its first `--unix`).
fn candidates(pid: u32, control: Option<&Path>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = control.map(Path::to_owned).into_iter().collect();
    out.push(default_control_socket(&default_socket()));
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return out;
    };
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let value = |flag: &str| -> Option<String> {
        args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix(&format!("{flag}="))
                .map(str::to_owned)
                .or_else(|| (a == flag).then(|| args.get(i + 1).cloned()).flatten())
        })
    };
    if let Some(c) = value("--control") {
        out.push(cwd.join(c));
    } else if let Some(u) = value("--unix") {
        out.push(default_control_socket(&cwd.join(u)));
    }
    out
}
