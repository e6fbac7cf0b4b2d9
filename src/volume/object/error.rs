//! Why an object volume could not be created, opened or changed.

use thiserror::Error;

use crate::objstore::StoreError;

/// Why an object volume could not be created, opened or changed.
#[derive(Debug, Error)]
pub enum ObjectError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("volume {0:?} does not exist in this store; create it with `vbd volume create`")]
    NoSuchVolume(String),
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("volume name {0:?} is invalid: use 1-256 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("volume size {0} is invalid: it must be a positive multiple of 4096 bytes")]
    BadSize(u64),
    #[error("volume {name:?} is open for writing by {owner}; stop that server first")]
    Locked { name: String, owner: String },
    #[error("corrupt volume data: {0}")]
    Corrupt(String),
    #[error("local WAL: {0}")]
    Local(String),
}
