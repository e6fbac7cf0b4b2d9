//! vhost-user-blk (design note to come).

pub mod chain;
pub mod config;
pub mod inflight;
pub mod request;
