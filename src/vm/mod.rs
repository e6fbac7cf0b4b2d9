//! The supervisor: QEMU virtual machines whose disks are vbd volumes.
//! `config` turns a VM description into argv, `qmp` talks to a running
//! QEMU, `supervisor` runs VMs and hot-attaches volumes.

pub mod cli;
pub mod config;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod hotplug;
pub mod qmp;
pub mod supervisor;
