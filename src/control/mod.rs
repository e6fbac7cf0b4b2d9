//! The control plane's server side: the control API on a Unix socket
//! (`api` routes, `error` refusals, `model` the JSON both ends share,
//! `client` the blocking client the CLI uses), the volumes it manages
//! (`volumes`, opened through `factory` like `vbd serve --export`'s), and
//! what `/metrics` and `/v1/status` report. It runs on
//! [`crate::runtime`], beside the reactors, never on them.

pub mod api;
pub mod client;
pub mod error;
pub mod factory;
pub mod http;
pub mod metrics;
pub mod model;
pub mod prometheus;
pub mod service;
pub mod status;
pub mod vm_volumes;
pub mod volumes;
