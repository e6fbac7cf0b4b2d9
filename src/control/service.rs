//! What `vbd serve` runs beside the NBD server: the volume catalog, the VM
//! supervisor and the control socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::api::{ControlApi, ControlServer, ControlSocket, serve};
use super::factory::VolumeFactory;
use super::metrics::Sources;
use super::vhost_exports::VhostExports;
use super::vm_volumes::CatalogExports;
use super::volumes::VolumeCatalog;
use crate::runtime::runtime;
use crate::server::{Server, ServerError, ServerHandle};
use crate::vm::supervisor::{Supervisor, SupervisorConfig, VmsOnExit};

/// The running control plane.
pub struct ControlPlane {
    /// Runs the VMs.
    pub supervisor: Arc<Supervisor>,
    /// Volumes created through the API.
    pub catalog: Arc<VolumeCatalog>,
    /// What metrics and status read, for other listeners to share.
    pub sources: Arc<Sources>,
    server: ControlServer,
}

/// The control socket's default path: beside the NBD socket.
pub fn default_control_socket(nbd_socket: &Path) -> PathBuf {
    nbd_socket.with_file_name("control.sock")
}

impl ControlPlane {
    /// Starts the control API on `control` (a path to bind, or a socket
    /// passed in) for the running NBD server `nbd`; VMs run as `vms` says
    /// (their disks on its NBD socket, their run files under its run
    /// directory); volumes created through the API open through `factory`,
    /// the same one `vbd serve --export` used; `vhost` holds the exports'
    /// vhost-user devices. VMs an earlier vbd left running are adopted
    /// before the API answers.
    pub fn start(
        nbd: ServerHandle,
        control: ControlSocket,
        vms: SupervisorConfig,
        factory: VolumeFactory,
        vhost: Arc<VhostExports>,
    ) -> std::io::Result<ControlPlane> {
        let catalog = Arc::new(VolumeCatalog::with_factory(factory));
        let registry = nbd.registry.clone();
        let supervisor = Supervisor::new(
            vms,
            Arc::new(CatalogExports::new(
                nbd.clone(),
                catalog.clone(),
                vhost.clone(),
            )),
        );
        let sup = supervisor.clone();
        let adopted = runtime().block_on(async move { sup.adopt_all().await });
        if adopted > 0 {
            info!(vms = adopted, "adopted VMs an earlier vbd left running");
        }
        let sources = Arc::new(Sources {
            server: nbd,
            supervisor: Some(supervisor.clone()),
            catalog: Some(catalog.clone()),
            vhost,
        });
        let api = Arc::new(ControlApi {
            supervisor: supervisor.clone(),
            catalog: catalog.clone(),
            registry,
            sources: sources.clone(),
        });
        let server = serve(control, api)?;
        Ok(ControlPlane {
            supervisor,
            catalog,
            sources,
            server,
        })
    }

    /// Stops vbd in order: closes the control socket; stops every VM
    /// (each gets `grace` to power off), or with [`VmsOnExit::Keep`]
    /// leaves them running for the next vbd; stops the vhost-user devices
    /// (their queues finish what is in flight on the cores, so before the
    /// cores stop); stops the NBD server, which finishes and flushes
    /// in-flight requests and shuts its volumes down;
    /// then shuts the catalog's other volumes down (an object volume
    /// drains its WAL to the store and releases its lock).
    pub fn shutdown(
        self,
        server: Server,
        on_exit: VmsOnExit,
        grace: Duration,
    ) -> Result<(), ServerError> {
        self.server.shutdown();
        let sup = self.supervisor.clone();
        runtime().block_on(async move {
            match on_exit {
                VmsOnExit::Stop => sup.stop_all(grace).await,
                VmsOnExit::Keep => sup.release_all(grace).await,
            }
        });
        self.sources.vhost.stop_all();
        let stopped = server.stop();
        self.catalog.shutdown_all();
        stopped
    }
}
