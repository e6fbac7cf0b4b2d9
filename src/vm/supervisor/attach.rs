//! Hot attach and detach on a running VM: the supervisor's bookkeeping
//! (one VM per volume, a free hot-plug port, the export and, over
//! vhost-user, the device started for the disk) around the QMP steps of
//! [`crate::vm::hotplug`]. A failed attach removes the export and device
//! it started; a failed detach keeps the disk listed.

use std::time::Duration;

use tracing::{info, warn};

use super::Supervisor;
use super::events::Events;
use super::handle::HotDisk;
use super::types::{DiskInfo, SupervisorError};
use crate::error::Chain;
use crate::lock::MutexExt;
use crate::vm::config::{DiskTransport, Role, hotplug_port, valid_qemu_name};
use crate::vm::hotplug::{self, AttachSpec};

impl Supervisor {
    /// Hot-attaches `volume` to a running VM on a free hot-plug port.
    pub async fn attach(
        &self,
        vm_name: &str,
        volume: &str,
        read_only: bool,
    ) -> Result<DiskInfo, SupervisorError> {
        let r = self.attach_volume(vm_name, volume, read_only).await;
        Events::count(&r, &self.events.attaches, &self.events.attach_failures);
        match &r {
            Ok(d) => info!(
                vm = vm_name,
                volume,
                port = d.port.as_deref().unwrap_or("-"),
                read_only,
                "volume hot-attached"
            ),
            Err(e) => warn!(vm = vm_name, volume, "hot attach failed: {}", Chain(e)),
        }
        r
    }

    async fn attach_volume(
        &self,
        vm_name: &str,
        volume: &str,
        read_only: bool,
    ) -> Result<DiskInfo, SupervisorError> {
        if !valid_qemu_name(volume) {
            return Err(SupervisorError::BadVolumeName(volume.to_owned()));
        }
        let _g = self.volumes.lock().await;
        let vm = self.running(vm_name)?;
        let _op = vm.op.lock().await;
        if let Some(user) = self.user_of(volume) {
            return Err(SupervisorError::VolumeInUse {
                volume: volume.to_owned(),
                vm: user,
            });
        }
        let port = {
            let hot = vm.hot.locked();
            (0..vm.config.hotplug_ports)
                .map(hotplug_port)
                .find(|p| !hot.values().any(|h| &h.port == p))
        }
        .ok_or_else(|| SupervisorError::NoFreePort {
            vm: vm_name.to_owned(),
            ports: vm.config.hotplug_ports,
        })?;
        let owned_export = self.ensure_export(volume, read_only)?;
        let vhost = if vm.config.transport() == DiskTransport::VhostUser {
            match self.ensure_vhost(vm_name, volume) {
                Ok(v) => v,
                Err(e) => {
                    self.release_disk(volume, owned_export, false);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let owned_vhost = vhost.as_ref().is_some_and(|v| v.started);
        let spec = AttachSpec {
            volume,
            nbd_socket: &self.cfg.nbd_socket,
            bus: &port,
            queues: vm.config.vcpus,
            tuning: vm.config.tuning,
            read_only,
            reconnect_delay_secs: vm.config.reconnect_delay_secs(),
            vhost: vhost.as_ref().map(|v| &v.socket),
        };
        let attached = match vm.qmp() {
            Ok(qmp) => hotplug::attach(qmp, &spec).await.map_err(Into::into),
            Err(e) => Err(e),
        };
        if let Err(e) = attached {
            self.release_disk(volume, owned_export, owned_vhost);
            return Err(e);
        }
        vm.hot.locked().insert(
            volume.to_owned(),
            HotDisk {
                port: port.clone(),
                owned_export,
                read_only,
                vhost: vhost.map(|v| v.socket),
                owned_vhost,
            },
        );
        self.save(&vm, None);
        Ok(DiskInfo {
            volume: volume.to_owned(),
            role: Role::Data,
            port: Some(port),
            reconnect: None,
        })
    }

    /// Hot-detaches `volume`, waiting up to `wait` for the guest to let go.
    pub async fn detach(
        &self,
        vm_name: &str,
        volume: &str,
        wait: Duration,
    ) -> Result<(), SupervisorError> {
        let r = self.detach_volume(vm_name, volume, wait).await;
        Events::count(&r, &self.events.detaches, &self.events.detach_failures);
        match &r {
            Ok(()) => info!(vm = vm_name, volume, "volume hot-detached"),
            Err(e) => warn!(vm = vm_name, volume, "hot detach failed: {}", Chain(e)),
        }
        r
    }

    async fn detach_volume(
        &self,
        vm_name: &str,
        volume: &str,
        wait: Duration,
    ) -> Result<(), SupervisorError> {
        let vm = self.running(vm_name)?;
        let _op = vm.op.lock().await;
        let hot = vm
            .hot
            .locked()
            .get(volume)
            .map(|h| (h.owned_export, h.vhost.is_some(), h.owned_vhost));
        let Some((owned_export, vhost, owned_vhost)) = hot else {
            let cold = vm.config.disks.iter().any(|d| d.name == volume);
            return Err(if cold {
                SupervisorError::ColdAttached {
                    vm: vm_name.to_owned(),
                    volume: volume.to_owned(),
                }
            } else {
                SupervisorError::NotAttached {
                    vm: vm_name.to_owned(),
                    volume: volume.to_owned(),
                }
            });
        };
        hotplug::detach(vm.qmp()?, volume, vm.config.tuning, vhost, wait).await?;
        vm.hot.locked().remove(volume);
        vm.reconnects.locked().remove(volume);
        self.save(&vm, None);
        self.release_disk(volume, owned_export, owned_vhost);
        Ok(())
    }
}
