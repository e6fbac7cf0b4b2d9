//! The one process-wide background tokio runtime, on which the control API,
//! QMP and S3 traffic run, apart from the reactors (object-volume uploads
//! have a lower-priority one of their own, `volume::object::background`).
//! Its own module (not part of `control`) so that the object volume and
//! the supervisor can use it without importing the layer above them.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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

/// A task on the control runtime (an accept loop) that runs until stopped.
pub struct StoppableTask {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl StoppableTask {
    /// Spawns `body`, which should return once its receiver fires.
    pub fn spawn<F, Fut>(body: F) -> Self
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        StoppableTask {
            stop: Some(tx),
            task: runtime().spawn(body(rx)),
        }
    }

    /// Tells the task to stop and waits for it.
    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = runtime().block_on(&mut self.task);
    }
}
