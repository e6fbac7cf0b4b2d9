//! vhost-user-blk (design note to come).

pub mod config;
pub mod request;
