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

/// Lowers the calling thread's priority by `by` (Linux keeps a nice value
/// per thread), for background work that must yield to the reactors;
/// `what` names the thread in the warning. Failing to is harmless: the
/// thread just competes as before.
pub fn lower_thread_priority(by: libc::c_int, what: &str) {
    let Some(now) = thread_nice() else { return };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, (now + by).min(19)) };
    if r != 0 {
        tracing::warn!(
            "cannot lower the priority of a {what} thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The calling thread's nice value.
pub fn thread_nice() -> Option<libc::c_int> {
    // SAFETY: gettid has no preconditions; getpriority takes plain
    // integers. -1 is a valid nice value, so errno is cleared first and
    // read after to tell it from a failure.
    unsafe {
        let tid = libc::gettid();
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        (n != -1 || *libc::__errno_location() == 0).then_some(n)
    }
}
