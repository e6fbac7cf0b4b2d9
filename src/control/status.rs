//! `GET /v1/status`: what a running vbd serves right now — its exports, the
//! connections on every core and the VMs. `vbd status` renders it.

use std::sync::Arc;
use std::time::Duration;

use super::metrics::Sources;
use super::model::{ExportStatus, Status, VhostQueueStatus, VhostUserStatus};
use crate::vhost::metrics::{DeviceStatus, OpKind};

/// How long the cores get to describe their connections.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// Gathers the status; the connection list comes from the cores
/// themselves, so this waits (off the async workers) for their answers.
pub async fn gather(sources: &Arc<Sources>) -> Status {
    let server = sources.server.clone();
    let connections = tokio::task::spawn_blocking(move || server.connections(SNAPSHOT_TIMEOUT))
        .await
        .unwrap_or_default();
    let s = &sources.server;
    let devices = sources.vhost.list();
    let exports = s
        .registry
        .all()
        .iter()
        .map(|e| ExportStatus {
            name: e.name.clone(),
            backend: e.volume.backend().to_owned(),
            description: e.description.clone(),
            size: e.volume.size(),
            read_only: e.read_only,
            connections: e.metrics.totals().connections,
            vhost_user: devices
                .iter()
                .find(|(n, _)| *n == e.name)
                .map(|(_, d)| vhost_status(d)),
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: s.started.elapsed().as_secs(),
        listeners: s.addresses.clone(),
        connections_open: s.gauges.connections(),
        exports,
        connections,
        vms: sources
            .supervisor
            .as_ref()
            .map(|sup| sup.list())
            .unwrap_or_default(),
    }
}

/// A device's status, listing only the queues that run or have served.
fn vhost_status(d: &DeviceStatus) -> VhostUserStatus {
    VhostUserStatus {
        socket: d.socket.display().to_string(),
        attached: d.attached,
        queues_offered: d.num_queues,
        queues_running: d.running_queues,
        queues: d
            .queues
            .iter()
            .filter(|q| q.core.is_some() || q.requests() > 0)
            .map(|q| VhostQueueStatus {
                index: q.index,
                core: q.core,
                requests: q.requests(),
                errors: q.ops.iter().map(|o| o.errors).sum(),
                bytes_read: q.ops[OpKind::Read as usize].bytes,
                bytes_written: q.ops[OpKind::Write as usize].bytes,
            })
            .collect(),
    }
}
