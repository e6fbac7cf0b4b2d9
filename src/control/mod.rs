//! The control plane: a small tokio runtime beside the reactors for the
//! slow, asynchronous work (QMP, object-store traffic, the control API).
//! The data path never blocks on it; results come back to the reactors
//! through [`crate::volume::Completer`].

pub mod api;
pub mod client;
pub mod http;
pub mod metrics;
pub mod prometheus;
pub mod service;
pub mod status;
pub mod vm_volumes;
pub mod volumes;
