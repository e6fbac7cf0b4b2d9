//! The one process-wide control runtime.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The control runtime, started on first use with two worker threads: the
/// work it carries is latency-tolerant and must not compete with reactors.
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        match Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vbd-control")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            // Without threads or an epoll instance nothing else would work either.
            Err(e) => panic!("cannot start the control runtime: {e}"),
        }
    })
}
