//! What `vbd serve` runs beside the NBD server: the volume catalog, the VM
//! supervisor and the control socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::api::{ControlApi, ControlServer, ControlSocket, serve};
use super::factory::VolumeFactory;
use super::metrics::Sources;
use super::vm_volumes::CatalogExports;
use super::volumes::VolumeCatalog;
use crate::runtime::runtime;
use crate::server::ServerHandle;
use crate::vm::supervisor::{Supervisor, SupervisorConfig};

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
    /// passed in) for the running NBD server `nbd`; VMs reach their disks
    /// through `nbd_socket` and keep their run files under `run_dir`;
    /// volumes created through the API open through `factory`, the same one
    /// `vbd serve --export` used.
    pub fn start(
        nbd: ServerHandle,
        nbd_socket: PathBuf,
        control: ControlSocket,
        run_dir: PathBuf,
        factory: VolumeFactory,
    ) -> std::io::Result<ControlPlane> {
        let catalog = Arc::new(VolumeCatalog::with_factory(factory));
        let registry = nbd.registry.clone();
        let supervisor = Supervisor::new(
            SupervisorConfig::new(nbd_socket, run_dir),
            Arc::new(CatalogExports::new(registry.clone(), catalog.clone())),
        );
        let sources = Arc::new(Sources {
            server: nbd,
            supervisor: Some(supervisor.clone()),
            catalog: Some(catalog.clone()),
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

    /// Closes the control socket, then stops every VM (each gets `grace`
    /// to power off) so their exports and sockets are cleaned up before
    /// the NBD server stops.
    pub fn stop(self, grace: Duration) {
        self.server.shutdown();
        let sup = self.supervisor.clone();
        runtime().block_on(async move { sup.stop_all(grace).await });
        self.catalog.shutdown_all();
    }
}
