//! The supervisor: QEMU virtual machines whose disks are vbd volumes.
//! `config` turns a VM description into argv, `qmp` talks to a running
//! QEMU, `hotplug` plugs disks in and out over QMP, `supervisor` runs VMs.
//! The supervisor reaches volumes only through [`VolumeHost`], which the
//! layer above implements, so nothing here imports upward.

pub mod config;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod hotplug;
pub mod qmp;
pub mod supervisor;
#[cfg(test)]
pub(crate) mod testing;
pub mod volume_host;

pub use volume_host::{ExportError, Restart, VhostServed, VolumeHost};
