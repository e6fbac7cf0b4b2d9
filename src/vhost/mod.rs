//! vhost-user-blk (design note to come).

pub mod chain;
pub mod config;
pub mod device;
pub mod fuzz;
pub mod handler;
pub mod inflight;
pub mod memory;
pub mod request;
pub mod runner;
pub mod worker;
