//! The runtime object volumes' uploaders run on: threads of their own at a
//! lower CPU priority than the reactors. Packing segments into chunks,
//! putting them, checkpoints and garbage collection are background work
//! whose only deadline is the backlog limit (writes wait when it is
//! reached); on a busy host they took CPU from the reactors at the same
//! priority, which showed as scheduling delays of the request path. Reads
//! that miss the cache stay on the control runtime: a guest waits on them.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};
use tracing::warn;

/// How much lower than the reactors uploaders run: at nice 5 a busy
/// reactor gets about three times the CPU of a busy uploader.
const NICE: libc::c_int = 5;

static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();

/// The uploaders' runtime, or the control runtime if this one could not
/// be started.
pub(super) fn runtime() -> &'static Runtime {
    let own = RUNTIME.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
        match Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("vbd-upload")
            .on_thread_start(|| crate::runtime::lower_thread_priority(NICE, "upload"))
            .enable_all()
            .build()
        {
            Ok(rt) => Some(rt),
            Err(e) => {
                warn!("cannot start the uploaders' runtime, uploading on the control runtime: {e}");
                None
            }
        }
    });
    own.as_ref().unwrap_or_else(crate::runtime::runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_run_at_a_lower_priority() {
        let theirs = runtime()
            .block_on(async { tokio::task::spawn_blocking(crate::runtime::thread_nice).await })
            .expect("the blocking task ran");
        // Test threads inherit the process's nice value, as the runtime's
        // threads do before they lower theirs.
        let ours = crate::runtime::thread_nice().expect("our nice value");
        assert_eq!(theirs, Some((ours + NICE).min(19)));
    }
}
