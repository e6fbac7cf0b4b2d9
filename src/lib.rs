//! vbd: a block server for virtual machines. See DESIGN.md for the layers:
//! `server` (io_uring reactors) → `nbd` (sans-IO protocol) → `volume`
//! (block stores).

pub mod control;
pub mod error;
pub mod lock;
pub mod nbd;
pub mod objstore;
pub mod runtime;
pub mod server;
pub mod service;
pub mod size;
pub mod uring;
pub mod vm;
pub mod volume;
