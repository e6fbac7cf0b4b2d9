//! The control plane, the library's top layer: the control API on a Unix
//! socket (`api` routes, `error` refusals, `model` the JSON both ends share,
//! `http` the small HTTP/1.1 both ends speak, `client` the blocking client
//! the CLI uses), the volumes it manages (`volumes`, opened through
//! `factory` like `vbd serve --export`'s), the supervisor's view of them
//! (`vm_volumes`), their snapshots, clones and resizes (`lifecycle`),
//! `release` (an object volume drained and handed to another host), what
//! `/metrics` (`metrics`, `prometheus`) and `/v1/status` (`status`) report,
//! `vhost_exports` (exports served over vhost-user too, their queues on the
//! server's cores), and `service`, which starts it all beside the NBD
//! server. It runs on [`crate::runtime`], beside the reactors, never
//! on them.

pub mod api;
pub mod client;
pub mod error;
pub mod factory;
pub mod http;
mod lifecycle;
pub mod metrics;
pub mod model;
pub mod prometheus;
pub mod release;
pub mod service;
pub mod status;
pub mod vhost_exports;
pub mod vm_volumes;
pub mod volumes;
