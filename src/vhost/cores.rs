//! The [`QueueRunner`] of vbd: each queue runs on one of the server's
//! cores as a [`Hosted`](crate::uring::Hosted) object (`VirtQueue`),
//! beside that core's NBD connections. Queue `i` goes to core `i % cores`,
//! so a VM's queues spread over the cores as its vCPUs spread over them.

use std::collections::HashMap;
use std::sync::Arc;

use super::queue::{QueueLink, VirtQueue};
use super::runner::{QueueRunner, QueueStart, RunnerError};
use crate::uring::Host;
use crate::volume::{RemoteResult, Volume};

/// Serves a device's queues on the cores of a [`Host`] (the server).
pub struct CoreRunner {
    volume: Arc<dyn Volume>,
    host: Arc<dyn Host<RemoteResult>>,
    running: HashMap<u16, QueueLink>,
}

impl CoreRunner {
    /// Serves `volume`'s requests on `host`'s cores.
    pub fn new(volume: Arc<dyn Volume>, host: Arc<dyn Host<RemoteResult>>) -> Self {
        CoreRunner {
            volume,
            host,
            running: HashMap::new(),
        }
    }
}

impl QueueRunner for CoreRunner {
    fn start(&mut self, start: QueueStart) -> Result<(), RunnerError> {
        let index = start.index;
        if self.running.contains_key(&index) {
            return Err(RunnerError::AlreadyRunning(index));
        }
        let (queue, link) = VirtQueue::new(start, self.volume.clone())?;
        let core = usize::from(index) % self.host.cores().max(1);
        self.host
            .host(core, Box::new(queue))
            .map_err(|e| RunnerError::Host(index, e))?;
        self.running.insert(index, link);
        Ok(())
    }

    fn stop(&mut self, index: u16) -> Result<u16, RunnerError> {
        self.running
            .remove(&index)
            .ok_or(RunnerError::NotRunning(index))?
            .stop()
    }
}

impl Drop for CoreRunner {
    fn drop(&mut self) {
        for (_, link) in self.running.drain() {
            // Already logged by whoever stopped the device; nothing waits.
            let _ = link.stop();
        }
    }
}
