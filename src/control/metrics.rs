//! What `GET /metrics` reports, gathered at scrape time from the server's
//! per-core counters, its gauges, the volumes and the VM supervisor; and
//! the optional TCP listener (`vbd serve --metrics ADDR`) that serves it to
//! Prometheus. Everything here runs on the control runtime, never on a
//! reactor.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::http::{self, Response};
use super::prometheus::{CONTENT_TYPE, Kind, Text, seconds_from_us};
use super::vhost_exports::VhostExports;
use super::volumes::VolumeCatalog;
use crate::error::Chain;
use crate::runtime::{StoppableTask, runtime};
use crate::server::ServerHandle;
use crate::server::metrics::{BUCKETS, OpKind, OpTotals, bucket_bound_us};
use crate::vhost::metrics::{OpKind as VhostOp, QueueTotals};
use crate::vm::supervisor::{Supervisor, VmState};
use crate::volume::Volume;

/// Where metrics and status come from.
pub struct Sources {
    /// The NBD server: exports, gauges, per-core counters.
    pub server: ServerHandle,
    /// Absent when vbd runs without a control socket.
    pub supervisor: Option<Arc<Supervisor>>,
    /// Volumes created through the API; absent like the supervisor.
    pub catalog: Option<Arc<VolumeCatalog>>,
    /// Exports served over vhost-user too.
    pub vhost: Arc<VhostExports>,
}

/// Most scrapes served at once on the TCP listener.
const MAX_SCRAPES: usize = 16;
/// How long a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Sources {
    /// Sources without a control plane (no VMs, no catalog).
    pub fn server_only(server: ServerHandle, vhost: Arc<VhostExports>) -> Self {
        Sources {
            server,
            supervisor: None,
            catalog: None,
            vhost,
        }
    }

    /// Every volume by name: the exports, then catalogued volumes that are
    /// not exported.
    pub fn volumes(&self) -> Vec<(String, Arc<dyn Volume>)> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for e in self.server.registry.all() {
            seen.insert(e.name.clone());
            out.push((e.name.clone(), e.volume.clone()));
        }
        if let Some(c) = &self.catalog {
            for v in c.list() {
                if !seen.contains(&v.name)
                    && let Some((vol, _)) = c.get(&v.name)
                {
                    out.push((v.name, vol));
                }
            }
        }
        out
    }

    /// The whole exposition.
    pub fn render(&self) -> String {
        let mut t = Text::new();
        t.family("vbd_build_info", Kind::Gauge, "The running vbd's version.");
        t.sample(
            "vbd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        t.single(
            "vbd_uptime_seconds",
            Kind::Gauge,
            "Seconds since the NBD server started.",
            self.server.started.elapsed().as_secs_f64(),
        );
        self.render_connections(&mut t);
        self.render_exports(&mut t);
        self.render_vhost(&mut t);
        self.render_volumes(&mut t);
        if let Some(sup) = &self.supervisor {
            render_vms(&mut t, sup);
        }
        t.finish()
    }

    fn render_connections(&self, t: &mut Text) {
        let g = &self.server.gauges;
        let e = g.events();
        t.single(
            "vbd_nbd_connections_open",
            Kind::Gauge,
            "NBD connections open, negotiating or attached.",
            g.connections(),
        );
        t.single(
            "vbd_nbd_connections_limit",
            Kind::Gauge,
            "The --max-connections limit.",
            g.max_connections(),
        );
        t.single(
            "vbd_nbd_connections_accepted_total",
            Kind::Counter,
            "NBD connections accepted.",
            e.accepted,
        );
        t.single(
            "vbd_nbd_connections_refused_total",
            Kind::Counter,
            "NBD connections closed at accept because --max-connections were open.",
            e.refused,
        );
        t.single(
            "vbd_nbd_handshake_failures_total",
            Kind::Counter,
            "NBD handshakes that ended in a protocol error.",
            e.handshake_failures,
        );
        t.single(
            "vbd_nbd_handshake_timeouts_total",
            Kind::Counter,
            "Clients disconnected for not finishing the handshake within --handshake-timeout.",
            e.handshake_timeouts,
        );
        t.family(
            "vbd_nbd_input_pauses_total",
            Kind::Counter,
            "Times a client's input was paused by a buffer limit (connection: --max-buffered, global: --max-buffered-total).",
        );
        t.sample(
            "vbd_nbd_input_pauses_total",
            &[("limit", "connection")],
            e.paused_connection,
        );
        t.sample(
            "vbd_nbd_input_pauses_total",
            &[("limit", "global")],
            e.paused_global,
        );
        t.single(
            "vbd_nbd_buffered_bytes",
            Kind::Gauge,
            "Request data all connections hold (write payloads, unsent read replies).",
            g.buffered(),
        );
        t.single(
            "vbd_nbd_buffered_bytes_limit",
            Kind::Gauge,
            "The --max-buffered-total limit.",
            g.max_buffered(),
        );
    }

    fn render_exports(&self, t: &mut Text) {
        let exports: Vec<_> = self
            .server
            .registry
            .all()
            .into_iter()
            .map(|e| {
                let totals = e.metrics.totals();
                (e, totals)
            })
            .collect();
        t.family("vbd_export_size_bytes", Kind::Gauge, "Size of each export.");
        for (e, _) in &exports {
            let ro = if e.read_only { "true" } else { "false" };
            t.sample(
                "vbd_export_size_bytes",
                &[
                    ("export", &e.name),
                    ("backend", e.volume.backend()),
                    ("read_only", ro),
                ],
                e.volume.size(),
            );
        }
        t.family(
            "vbd_export_connections",
            Kind::Gauge,
            "NBD connections attached to each export.",
        );
        for (e, s) in &exports {
            t.sample(
                "vbd_export_connections",
                &[("export", &e.name)],
                s.connections,
            );
        }
        type Field = fn(&OpTotals) -> u64;
        let counters: [(&str, &str, Field); 3] = [
            (
                "vbd_nbd_requests_total",
                "NBD requests answered, by export and op.",
                |o| o.requests,
            ),
            (
                "vbd_nbd_request_errors_total",
                "NBD requests answered with an error, by export and op.",
                |o| o.errors,
            ),
            (
                "vbd_nbd_request_bytes_total",
                "Bytes covered by successful NBD requests: data read or written, or the range trimmed, zeroed, cached or described.",
                |o| o.bytes,
            ),
        ];
        for (name, help, field) in counters {
            t.family(name, Kind::Counter, help);
            for (e, s) in &exports {
                for op in OpKind::ALL {
                    t.sample(
                        name,
                        &[("export", &e.name), ("op", op.name())],
                        field(&s.ops[op as usize]),
                    );
                }
            }
        }
        let name = "vbd_nbd_request_duration_seconds";
        t.family(
            name,
            Kind::Histogram,
            "Time from an NBD request's header arriving to its reply being queued, by export and op.",
        );
        for (e, s) in &exports {
            for op in OpKind::ALL {
                latency_histogram(
                    t,
                    name,
                    &[("export", &e.name), ("op", op.name())],
                    &s.ops[op as usize],
                );
            }
        }
    }

    /// Exports served over vhost-user: whether a frontend is attached, its
    /// queues, and per-queue counters and latencies like NBD's (only queues
    /// that run now or have served, so 16 idle queues add no lines).
    fn render_vhost(&self, t: &mut Text) {
        let devices = self.vhost.list();
        if devices.is_empty() {
            return;
        }
        t.family(
            "vbd_vhost_frontend_attached",
            Kind::Gauge,
            "1 when a vhost-user frontend (a VM's QEMU) is connected to the export's device.",
        );
        for (name, d) in &devices {
            t.sample(
                "vbd_vhost_frontend_attached",
                &[("export", name)],
                u8::from(d.attached),
            );
        }
        t.family(
            "vbd_vhost_queues",
            Kind::Gauge,
            "vhost-user queues of each export's device: offered, and running for the attached frontend.",
        );
        for (name, d) in &devices {
            t.sample(
                "vbd_vhost_queues",
                &[("export", name), ("state", "offered")],
                d.num_queues,
            );
            t.sample(
                "vbd_vhost_queues",
                &[("export", name), ("state", "running")],
                d.running_queues,
            );
        }
        let queues: Vec<(&str, String, &QueueTotals)> = devices
            .iter()
            .flat_map(|(name, d)| {
                d.queues
                    .iter()
                    .filter(|q| q.core.is_some() || q.requests() > 0 || q.kicks > 0)
                    .map(move |q| (name.as_str(), q.index.to_string(), q))
            })
            .collect();
        type QueueField = fn(&QueueTotals) -> u64;
        let per_queue: [(&str, &str, QueueField); 2] = [
            (
                "vbd_vhost_kicks_total",
                "Kicks (guest notifications) each vhost-user queue has taken.",
                |q| q.kicks,
            ),
            (
                "vbd_vhost_interrupts_total",
                "Interrupts (call eventfd writes) each vhost-user queue has sent.",
                |q| q.calls,
            ),
        ];
        for (name, help, field) in per_queue {
            t.family(name, Kind::Counter, help);
            for (export, index, q) in &queues {
                t.sample(name, &[("export", export), ("queue", index)], field(q));
            }
        }
        type Field = fn(&OpTotals) -> u64;
        let counters: [(&str, &str, Field); 3] = [
            (
                "vbd_vhost_requests_total",
                "vhost-user-blk requests answered, by export, queue and op.",
                |o| o.requests,
            ),
            (
                "vbd_vhost_request_errors_total",
                "vhost-user-blk requests answered with an error status, by export, queue and op.",
                |o| o.errors,
            ),
            (
                "vbd_vhost_request_bytes_total",
                "Bytes covered by successful vhost-user-blk requests, by export, queue and op.",
                |o| o.bytes,
            ),
        ];
        for (name, help, field) in counters {
            t.family(name, Kind::Counter, help);
            for (export, index, q) in &queues {
                for op in VhostOp::ALL {
                    t.sample(
                        name,
                        &[("export", export), ("queue", index), ("op", op.name())],
                        field(&q.ops[op as usize]),
                    );
                }
            }
        }
        let name = "vbd_vhost_request_duration_seconds";
        t.family(
            name,
            Kind::Histogram,
            "Time from a vhost-user-blk request leaving the avail ring to its used entry, by export, queue and op.",
        );
        for (export, index, q) in &queues {
            for op in VhostOp::ALL {
                latency_histogram(
                    t,
                    name,
                    &[("export", export), ("queue", index), ("op", op.name())],
                    &q.ops[op as usize],
                );
            }
        }
    }

    fn render_volumes(&self, t: &mut Text) {
        let volumes: Vec<_> = self
            .volumes()
            .into_iter()
            .filter_map(|(n, v)| v.counters().map(|c| (n, c)))
            .collect();
        type Field = fn(&crate::volume::object::ObjectCounters) -> u64;
        let families: [(&str, Kind, &str, Field); 24] = [
            (
                "vbd_cache_hits_total",
                Kind::Counter,
                "Block cache hits (4 KiB blocks).",
                |c| c.cache.hits,
            ),
            (
                "vbd_cache_misses_total",
                Kind::Counter,
                "Block cache misses (4 KiB blocks).",
                |c| c.cache.misses,
            ),
            (
                "vbd_cache_evictions_total",
                Kind::Counter,
                "Blocks evicted from the cache (4 KiB blocks).",
                |c| c.cache.evictions,
            ),
            (
                "vbd_cache_bytes",
                Kind::Gauge,
                "Bytes the block cache holds.",
                |c| c.cache.bytes,
            ),
            (
                "vbd_cache_budget_bytes",
                Kind::Gauge,
                "The block cache's budget.",
                |c| c.cache.budget,
            ),
            (
                "vbd_wal_backlog_bytes",
                Kind::Gauge,
                "Bytes in the local write-ahead log not yet uploaded.",
                |c| c.backlog_bytes,
            ),
            (
                "vbd_wal_backlog_records",
                Kind::Gauge,
                "Write-ahead log records not yet uploaded.",
                |c| c.backlog_records,
            ),
            (
                "vbd_wal_backlog_limit_bytes",
                Kind::Gauge,
                "Backlog at which writes wait for the uploader.",
                |c| c.backlog_limit,
            ),
            (
                "vbd_upload_queue_segments",
                Kind::Gauge,
                "Write-ahead log segments waiting to be uploaded (including the open one).",
                |c| c.backlog_segments,
            ),
            (
                "vbd_upload_chunks_total",
                Kind::Counter,
                "Chunks uploaded to the object store.",
                |c| c.chunks_uploaded,
            ),
            (
                "vbd_upload_bytes_total",
                Kind::Counter,
                "Data bytes uploaded in chunks.",
                |c| c.bytes_uploaded,
            ),
            (
                "vbd_upload_failures_total",
                Kind::Counter,
                "Failed chunk uploads; each is retried until it succeeds.",
                |c| c.upload_failures,
            ),
            (
                "vbd_store_fetches_total",
                Kind::Counter,
                "Ranged reads from the object store (cache misses).",
                |c| c.fetches,
            ),
            (
                "vbd_store_fetch_bytes_total",
                Kind::Counter,
                "Bytes of chunk data fetched from the object store (read-ahead included).",
                |c| c.fetch_bytes,
            ),
            (
                "vbd_store_fetch_failures_total",
                Kind::Counter,
                "Ranged reads from the object store that failed.",
                |c| c.fetch_failures,
            ),
            (
                "vbd_gc_runs_total",
                Kind::Counter,
                "Garbage-collection passes that found a chunk to rewrite or delete.",
                |c| c.gc_runs,
            ),
            (
                "vbd_gc_failures_total",
                Kind::Counter,
                "Garbage-collection passes that failed (retried later).",
                |c| c.gc_failures,
            ),
            (
                "vbd_gc_chunks_rewritten_total",
                Kind::Counter,
                "Sparse chunks rewritten by garbage collection.",
                |c| c.chunks_rewritten,
            ),
            (
                "vbd_gc_chunks_deleted_total",
                Kind::Counter,
                "Superseded chunks deleted from the store.",
                |c| c.chunks_deleted,
            ),
            (
                "vbd_checkpoints_total",
                Kind::Counter,
                "Extent-map checkpoints written.",
                |c| c.checkpoints,
            ),
            (
                "vbd_volume_snapshots",
                Kind::Gauge,
                "Snapshots of the volume.",
                |c| c.snapshots,
            ),
            (
                "vbd_volume_clone_layers",
                Kind::Gauge,
                "Parent snapshots a clone reads through (0: not a clone).",
                |c| c.layers,
            ),
            (
                "vbd_volume_shared_bytes",
                Kind::Gauge,
                "Bytes a clone reads from its parents' chunks, shared with them and their other clones.",
                |c| c.shared_bytes,
            ),
            (
                "vbd_volume_own_bytes",
                Kind::Gauge,
                "Bytes of data in the volume's own chunks that its map points at.",
                |c| c.own_bytes,
            ),
        ];
        t.single(
            "vbd_clones_open",
            Kind::Gauge,
            "Open object volumes that are clones (read through a parent snapshot).",
            volumes.iter().filter(|(_, c)| c.layers > 0).count(),
        );
        for (name, kind, help, field) in families {
            t.family(name, kind, help);
            for (v, c) in &volumes {
                t.sample(name, &[("volume", v)], field(c));
            }
        }
    }
}

/// One op's latency histogram in seconds, from the shared log2 buckets.
fn latency_histogram(t: &mut Text, name: &str, labels: &[(&str, &str)], o: &OpTotals) {
    t.histogram(
        name,
        labels,
        (0..BUCKETS - 1).map(|i| (seconds_from_us(bucket_bound_us(i)), o.buckets[i])),
        o.buckets[BUCKETS - 1],
        o.sum_ns as f64 / 1e9,
    );
}

fn render_vms(t: &mut Text, sup: &Supervisor) {
    let vms = sup.list();
    let mut by_state = [0u64; 4];
    for v in &vms {
        let i = match v.state {
            VmState::Running => 0,
            VmState::Stopping => 1,
            VmState::Stopped { .. } => 2,
            VmState::Crashed { .. } => 3,
        };
        by_state[i] += 1;
    }
    t.family(
        "vbd_vms",
        Kind::Gauge,
        "VMs the supervisor knows, by state (stopped and crashed ones until stopped to clear them).",
    );
    for (state, n) in ["running", "stopping", "stopped", "crashed"]
        .iter()
        .zip(by_state)
    {
        t.sample("vbd_vms", &[("state", state)], n);
    }
    let e = sup.events();
    t.single(
        "vbd_vm_starts_total",
        Kind::Counter,
        "VMs started (QEMU up and answering QMP).",
        e.starts,
    );
    t.single(
        "vbd_vm_start_failures_total",
        Kind::Counter,
        "VM start requests that failed.",
        e.start_failures,
    );
    t.family(
        "vbd_vm_stops_total",
        Kind::Counter,
        "VMs that stopped cleanly: on request (by the step that ended them) or by the guest shutting down.",
    );
    for (outcome, n) in [
        ("powerdown", e.powerdowns),
        ("sigterm", e.sigterms),
        ("sigkill", e.sigkills),
        ("guest_shutdown", e.guest_shutdowns),
    ] {
        t.sample("vbd_vm_stops_total", &[("outcome", outcome)], n);
    }
    t.single(
        "vbd_vm_crashes_total",
        Kind::Counter,
        "QEMUs that exited abnormally without being asked to.",
        e.crashes,
    );
    t.family(
        "vbd_vm_hotplug_total",
        Kind::Counter,
        "Hot attach and detach requests, by result.",
    );
    for (op, result, n) in [
        ("attach", "ok", e.attaches),
        ("attach", "error", e.attach_failures),
        ("detach", "ok", e.detaches),
        ("detach", "error", e.detach_failures),
    ] {
        t.sample("vbd_vm_hotplug_total", &[("op", op), ("result", result)], n);
    }
    t.single(
        "vbd_vms_adopted",
        Kind::Gauge,
        "Running VMs this vbd adopted from an earlier vbd process.",
        vms.iter()
            .filter(|v| v.adopted_at_ms.is_some() && v.state == VmState::Running)
            .count(),
    );
    t.family(
        "vbd_vm_adoptions_total",
        Kind::Counter,
        "VMs found in the run directory at start, by what became of them: adopted; exited while vbd was away or pid_reused (both listed as crashed); failed (left running, unsupervised, run files kept).",
    );
    for (result, n) in [
        ("adopted", e.adoptions),
        ("exited", e.adoptions_exited),
        ("pid_reused", e.adoptions_pid_reused),
        ("failed", e.adoption_failures),
    ] {
        t.sample("vbd_vm_adoptions_total", &[("result", result)], n);
    }
    t.single(
        "vbd_vm_disk_reconnects_total",
        Kind::Counter,
        "Disks of adopted VMs whose QEMU attached to their export again after the restart.",
        e.disk_reconnects,
    );
    t.single(
        "vbd_vm_disk_reconnect_seconds_total",
        Kind::Counter,
        "Seconds those disks took to reconnect, summed, from the old vbd letting go (or, after a kill, this vbd's start).",
        e.disk_reconnect_ms as f64 / 1000.0,
    );
}

/// The `/metrics` response.
pub fn response(sources: &Sources) -> Response {
    Response {
        status: 200,
        content_type: CONTENT_TYPE,
        body: sources.render().into_bytes(),
    }
}

/// A running `--metrics` listener.
pub struct MetricsServer {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    task: StoppableTask,
}

impl MetricsServer {
    /// Stops listening.
    pub fn shutdown(self) {
        self.task.stop();
    }
}

/// Serves `GET /metrics` over plain HTTP on `addr`, on the control runtime.
pub fn serve_tcp(addr: SocketAddr, sources: Arc<Sources>) -> std::io::Result<MetricsServer> {
    serve_listener(std::net::TcpListener::bind(addr)?, sources)
}

/// Serves `GET /metrics` on a listening socket opened elsewhere (bound by
/// [`serve_tcp`], or passed in by a service manager).
pub fn serve_listener(
    listener: std::net::TcpListener,
    sources: Arc<Sources>,
) -> std::io::Result<MetricsServer> {
    listener.set_nonblocking(true)?;
    let listener = {
        let _rt = runtime().enter();
        TcpListener::from_std(listener)?
    };
    let addr = listener.local_addr()?;
    info!(%addr, "metrics listening (GET /metrics)");
    let permits = Arc::new(Semaphore::new(MAX_SCRAPES));
    let task = StoppableTask::spawn(|mut stop| async move {
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            debug!(%peer, "too many scrapes at once; closing");
                            continue;
                        };
                        let sources = sources.clone();
                        tokio::spawn(async move {
                            scrape(stream, &sources).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        warn!("metrics accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    Ok(MetricsServer { addr, task })
}

async fn scrape(mut stream: tokio::net::TcpStream, sources: &Sources) {
    let req = match tokio::time::timeout(READ_TIMEOUT, http::read_request(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!("bad metrics request: {}", Chain(&e));
            return;
        }
        Err(_) => return,
    };
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let resp = match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["metrics"]) => response(sources),
        (_, ["metrics"]) => plain(405, "only GET is allowed on /metrics\n"),
        _ => plain(404, "metrics are at /metrics\n"),
    };
    if let Err(e) = http::write_response(&mut stream, &resp).await {
        debug!("metrics reply not sent: {e}");
    }
}

fn plain(status: u16, text: &str) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: text.as_bytes().to_vec(),
    }
}
