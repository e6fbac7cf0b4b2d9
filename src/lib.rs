//! vbd: a block server for virtual machines, as a library; the `vbd`
//! binary (src/main.rs and src/cli/) is a thin front end over it.
//!
//! Each module is a layer, and imports point down only:
//!
//! ```text
//! control                        control API, volume catalog, metrics, status
//!   ├─► vm                       QEMU supervisor (reaches volumes via vm::VolumeHost)
//!   ├─► server                   NBD transport: reactors, connections, TLS
//!   │     └─► nbd                sans-IO NBD protocol
//!   └─► volume                   memory, file and object volumes
//!         └─► objstore           object stores: S3, a directory, an S3 endpoint
//! uring                          io_uring rings, tokens, wakers (server, volume)
//! runtime                        background tokio runtime (control, volume, vm)
//! error, lock, size, latency     plain helpers anyone may use
//! ```
//!
//! A lower layer that needs something from above defines a small trait
//! that the upper layer implements: [`vm::VolumeHost`] (control serves the
//! supervisor's disks), [`nbd::Exports`] (the server's registry answers the
//! handshake). `tools/check-layers` holds the exact table of who may import
//! whom, and CI fails when an import points up.

// Set here rather than in Cargo.toml's [lints]: see the note there.
#![warn(unreachable_pub)]

pub mod control;
pub mod error;
pub mod latency;
pub mod lock;
pub mod nbd;
pub mod objstore;
pub mod runtime;
pub mod server;
pub mod service;
pub mod size;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod uring;
pub mod vhost;
pub mod vm;
pub mod volume;
