//! Hot attach and detach of vbd volumes to a running QEMU, as typed QMP
//! commands. Over NBD, attach is iothread → block node → device, undone in
//! reverse if any step fails; detach is the same three in reverse order.
//! Over vhost-user-blk, attach is socket chardev → device (the device gets
//! as many queues as the VM has vCPUs, up to what vbd's device offers),
//! detach is device → chardev.

use std::path::Path;
use std::time::Duration;

use qapi::qmp::{
    BlockdevCacheOptions, BlockdevOptions, BlockdevOptionsBase, BlockdevOptionsNbd, ChardevBackend,
    ChardevCommon, ChardevSocket, EventLoopBaseProperties, IothreadProperties, ObjectOptions,
    SocketAddress, SocketAddressLegacy, UnixSocketAddress, blockdev_add, blockdev_del, chardev_add,
    chardev_remove, device_add, device_del, object_add, object_del,
};
use serde_json::json;
use thiserror::Error;
use tracing::{debug, warn};

use super::config::{DiskTuning, VHOST_RECONNECT_SECS, VhostSocket, disk_ids, vhost_queues};
use super::qmp::{Qmp, QmpError};
use crate::error::Chain;

/// Why a hot attach or detach failed.
#[derive(Debug, Error)]
pub enum HotplugError {
    /// A step of the attach sequence failed; earlier steps were rolled back.
    #[error("hot attach of {volume:?} failed at {step}{}", rollback_note(.rollback))]
    Attach {
        /// The volume being attached.
        volume: String,
        /// The step that failed (`object-add iothread`, `blockdev-add nbd`,
        /// `device_add virtio-blk-pci`, `chardev-add`, `device_add
        /// vhost-user-blk-pci`).
        step: &'static str,
        /// Why it failed.
        #[source]
        source: QmpError,
        /// Rollback steps that failed too (the VM may hold leftovers).
        rollback: Vec<String>,
    },
    /// A step of the detach sequence failed.
    #[error("hot detach of {volume:?} failed at {step}")]
    Detach {
        /// The volume being detached.
        volume: String,
        /// The step that failed.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: QmpError,
    },
    /// No DEVICE_DELETED event came: the guest kept the device.
    #[error(
        "the guest did not release {device} within {after:?}; it may lack PCIe hot-plug support or be busy: retry the detach, or stop the VM"
    )]
    UnplugTimeout {
        /// The device's QEMU id.
        device: String,
        /// How long it waited.
        after: Duration,
    },
}

fn rollback_note(r: &[String]) -> String {
    if r.is_empty() {
        " (rolled back)".into()
    } else {
        format!(" (rollback also failed: {})", r.join("; "))
    }
}

/// What a hot-attached disk looks like.
#[derive(Clone, Debug)]
pub struct AttachSpec<'a> {
    /// Volume and export name.
    pub volume: &'a str,
    /// vbd's NBD socket.
    pub nbd_socket: &'a Path,
    /// The hot-plug port (`hpN`) to plug into.
    pub bus: &'a str,
    /// Queues: the VM's vCPU count.
    pub queues: u32,
    /// Whether the disk gets vbd's iothread/cache/queue settings or QEMU's defaults.
    pub tuning: DiskTuning,
    /// Attach the disk read-only (cloud-init seeds).
    pub read_only: bool,
    /// QEMU's `reconnect-delay`: seconds guest I/O waits for vbd to come
    /// back; 0 fails it at once.
    pub reconnect_delay_secs: u32,
    /// The disk's vhost-user-blk device: attach over vhost-user instead of
    /// NBD (`nbd_socket`, `tuning`, `read_only` and the delay then do not
    /// apply; the device itself is read-only or not).
    pub vhost: Option<&'a VhostSocket>,
}

/// `object-add` of an iothread with QEMU's default polling.
pub fn iothread_add(id: &str) -> object_add {
    object_add(ObjectOptions::iothread {
        id: id.to_owned(),
        iothread: IothreadProperties {
            base: EventLoopBaseProperties {
                aio_max_batch: None,
                thread_pool_max: None,
                thread_pool_min: None,
            },
            poll_grow: None,
            poll_max_ns: None,
            poll_shrink: None,
        },
    })
}

/// `blockdev-add` of an NBD node on vbd's socket; tuned means `cache=none`,
/// and requests wait `reconnect_delay_secs` for vbd as on the command line.
pub fn nbd_blockdev_add(spec: &AttachSpec<'_>) -> blockdev_add {
    let cache = (spec.tuning == DiskTuning::Tuned).then_some(BlockdevCacheOptions {
        direct: Some(true),
        no_flush: Some(false),
    });
    blockdev_add(BlockdevOptions::nbd {
        base: BlockdevOptionsBase {
            auto_read_only: None,
            cache,
            detect_zeroes: None,
            discard: None,
            force_share: None,
            node_name: Some(disk_ids(spec.volume).node),
            read_only: spec.read_only.then_some(true),
        },
        nbd: BlockdevOptionsNbd {
            export: Some(spec.volume.to_owned()),
            open_timeout: None,
            reconnect_delay: (spec.reconnect_delay_secs > 0).then_some(spec.reconnect_delay_secs),
            tls_creds: None,
            tls_hostname: None,
            x_dirty_bitmap: None,
            server: SocketAddress::unix(UnixSocketAddress {
                abstract_: None,
                tight: None,
                path: spec.nbd_socket.to_string_lossy().into_owned(),
            }),
        },
    })
}

/// `device_add` of a virtio-blk-pci on the hot-plug port.
pub fn virtio_blk_add(spec: &AttachSpec<'_>) -> device_add {
    let ids = disk_ids(spec.volume);
    let mut props = vec![("drive".to_owned(), json!(ids.node))];
    match spec.tuning {
        DiskTuning::Tuned => {
            props.push(("iothread".to_owned(), json!(ids.iothread)));
            props.push(("num-queues".to_owned(), json!(spec.queues.max(1))));
        }
        DiskTuning::Untuned => props.push(("num-queues".to_owned(), json!(1))),
    }
    device_add::new(
        "virtio-blk-pci",
        Some(ids.device),
        Some(spec.bus.to_owned()),
        props,
    )
}

/// `chardev-add` of a client socket to a vhost-user device that
/// reconnects as the command line's does.
pub fn vhost_chardev_add(volume: &str, socket: &Path) -> chardev_add {
    chardev_add {
        id: disk_ids(volume).chardev,
        backend: ChardevBackend::socket(
            ChardevSocket {
                base: ChardevCommon::default(),
                nodelay: None,
                reconnect: Some(i64::from(VHOST_RECONNECT_SECS)),
                server: Some(false),
                telnet: None,
                tls_authz: None,
                tls_creds: None,
                tn3270: None,
                wait: None,
                websocket: None,
                addr: SocketAddressLegacy::unix(
                    UnixSocketAddress {
                        abstract_: None,
                        tight: None,
                        path: socket.to_string_lossy().into_owned(),
                    }
                    .into(),
                ),
            }
            .into(),
        ),
    }
}

/// `device_add` of a vhost-user-blk-pci on the hot-plug port, with one
/// queue per vCPU up to what the device offers.
pub fn vhost_user_blk_add(spec: &AttachSpec<'_>, vhost: &VhostSocket) -> device_add {
    let ids = disk_ids(spec.volume);
    device_add::new(
        "vhost-user-blk-pci",
        Some(ids.device),
        Some(spec.bus.to_owned()),
        vec![
            ("chardev".to_owned(), json!(ids.chardev)),
            (
                "num-queues".to_owned(),
                json!(vhost_queues(spec.queues, vhost.queues)),
            ),
        ],
    )
}

/// Plugs `spec.volume` into the VM; on failure removes whatever it added.
pub async fn attach(qmp: &Qmp, spec: &AttachSpec<'_>) -> Result<(), HotplugError> {
    if let Some(vhost) = spec.vhost {
        return attach_vhost(qmp, spec, vhost).await;
    }
    let ids = disk_ids(spec.volume);
    let tuned = spec.tuning == DiskTuning::Tuned;
    let fail = |step, source, rollback| HotplugError::Attach {
        volume: spec.volume.to_owned(),
        step,
        source,
        rollback,
    };
    if tuned && let Err(e) = qmp.execute(iothread_add(&ids.iothread)).await {
        return Err(fail("object-add iothread", e, Vec::new()));
    }
    if let Err(e) = qmp.execute(nbd_blockdev_add(spec)).await {
        let mut rb = Vec::new();
        if tuned {
            undo(qmp, object_del { id: ids.iothread }, &mut rb).await;
        }
        return Err(fail("blockdev-add nbd", e, rb));
    }
    if let Err(e) = qmp.execute(virtio_blk_add(spec)).await {
        let mut rb = Vec::new();
        undo(
            qmp,
            blockdev_del {
                node_name: ids.node,
            },
            &mut rb,
        )
        .await;
        if tuned {
            undo(qmp, object_del { id: ids.iothread }, &mut rb).await;
        }
        return Err(fail("device_add virtio-blk-pci", e, rb));
    }
    debug!(
        volume = spec.volume,
        bus = spec.bus,
        "QMP hot-attach steps done"
    );
    Ok(())
}

/// Attach over vhost-user: chardev, then device; a refused device takes
/// the chardev with it.
async fn attach_vhost(
    qmp: &Qmp,
    spec: &AttachSpec<'_>,
    vhost: &VhostSocket,
) -> Result<(), HotplugError> {
    let fail = |step, source, rollback| HotplugError::Attach {
        volume: spec.volume.to_owned(),
        step,
        source,
        rollback,
    };
    if let Err(e) = qmp
        .execute(vhost_chardev_add(spec.volume, &vhost.socket))
        .await
    {
        return Err(fail("chardev-add", e, Vec::new()));
    }
    if let Err(e) = qmp.execute(vhost_user_blk_add(spec, vhost)).await {
        let mut rb = Vec::new();
        let id = disk_ids(spec.volume).chardev;
        undo(qmp, chardev_remove { id }, &mut rb).await;
        return Err(fail("device_add vhost-user-blk-pci", e, rb));
    }
    debug!(
        volume = spec.volume,
        bus = spec.bus,
        "QMP vhost-user hot-attach steps done"
    );
    Ok(())
}

async fn undo<C: qapi::Command>(qmp: &Qmp, cmd: C, failures: &mut Vec<String>) {
    if let Err(e) = qmp.execute(cmd).await {
        let e = Chain(&e).to_string();
        warn!("rollback step failed: {e}");
        failures.push(e);
    }
}

/// Whether QEMU refused a `device_del` because an earlier one still waits
/// for the guest: QEMU 7.2 says "Device X is already in the process of
/// unplug" (checked on this host); "in progress" is kept for other wordings.
/// Not "guest is busy (power indicator blinking)": that can be the guest
/// still handling the plug, and no `DEVICE_DELETED` would follow.
fn unplug_under_way(desc: &str) -> bool {
    desc.contains("in the process of unplug") || desc.contains("in progress")
}

/// Unplugs `volume`: asks the guest to release the device, waits up to
/// `wait` for `DEVICE_DELETED`, then removes the block node and iothread,
/// or the vhost-user chardev when `vhost` (which closes the socket).
pub async fn detach(
    qmp: &Qmp,
    volume: &str,
    tuning: DiskTuning,
    vhost: bool,
    wait: Duration,
) -> Result<(), HotplugError> {
    let ids = disk_ids(volume);
    let fail = |step, source| HotplugError::Detach {
        volume: volume.to_owned(),
        step,
        source,
    };
    // Subscribe first: the event may arrive before device_del's reply.
    let mut events = qmp.subscribe();
    match qmp
        .execute(device_del {
            id: ids.device.clone(),
        })
        .await
    {
        Ok(_) => {}
        // A retry after a timed-out detach: the unplug is still under way.
        Err(QmpError::Qemu { desc, .. }) if unplug_under_way(&desc) => {}
        Err(e) => return Err(fail("device_del", e)),
    }
    let device = ids.device.clone();
    if events
        .wait_for(wait, |e| e.deleted_device().as_deref() == Some(&device))
        .await
        .is_none()
    {
        return Err(HotplugError::UnplugTimeout {
            device: ids.device,
            after: wait,
        });
    }
    if vhost {
        qmp.execute(chardev_remove { id: ids.chardev })
            .await
            .map_err(|e| fail("chardev-remove", e))?;
        debug!(volume, "QMP vhost-user hot-detach steps done");
        return Ok(());
    }
    qmp.execute(blockdev_del {
        node_name: ids.node,
    })
    .await
    .map_err(|e| fail("blockdev-del", e))?;
    if tuning == DiskTuning::Tuned {
        qmp.execute(object_del { id: ids.iothread })
            .await
            .map_err(|e| fail("object-del iothread", e))?;
    }
    debug!(volume, "QMP hot-detach steps done");
    Ok(())
}

#[cfg(test)]
mod tests;
