//! vbd: a block server for virtual machines. See DESIGN.md for the layers:
//! `server` (io_uring reactors) → `nbd` (sans-IO protocol) → `volume`
//! (block stores).

pub mod cli;
pub mod control;
pub mod lock;
pub mod nbd;
pub mod objstore;
pub mod runtime;
pub mod server;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod vm;
pub mod volume;
