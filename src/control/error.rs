//! Why a control request failed: one typed error per refusal, each with the
//! HTTP status it answers with. The body's text is the whole cause chain,
//! each cause once (see [`crate::error::Chain`]).

use std::error::Error;

use thiserror::Error;

use super::http::{HttpError, Response};
use super::model::{ErrorBody, MAX_READ};
use super::volumes::VolumeStoreError;
use crate::error::Chain;
use crate::vm::supervisor::SupervisorError;
use crate::volume::object::ObjectError;

/// A failed control request.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The request could not be read as HTTP.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The body is not the JSON this endpoint takes.
    #[error("bad JSON body")]
    BadBody(#[source] serde_json::Error),
    /// A query parameter that must be seconds (0 to a day) is not.
    #[error("{key}={value:?} must be seconds, e.g. {key}=30")]
    BadSeconds {
        /// The parameter's name.
        key: &'static str,
        /// Its value as sent.
        value: String,
    },
    /// A query parameter that must be a byte count is missing or not a number; holds its name.
    #[error("{0}= must be a number of bytes")]
    BadNumber(&'static str),
    /// A volume read asked for more than `MAX_READ` bytes; holds the length asked for.
    #[error("length {0} is larger than {MAX_READ}; read in pieces")]
    ReadTooLong(u64),
    /// A volume read reaches past the volume's end.
    #[error("range {offset}+{length} is outside the volume ({size} bytes)")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        length: u64,
        /// The volume's size in bytes.
        size: u64,
    },
    /// No export or catalogued volume of this server is that object volume.
    #[error("this vbd does not serve volume {volume:?} of store {store}")]
    NotServed {
        /// The store URL asked for.
        store: String,
        /// The volume's name in the store.
        volume: String,
    },
    /// Neither the catalog nor the server's exports has this name.
    #[error("no volume or export named {0:?}")]
    NoVolume(String),
    /// A volume create named an export `vbd serve` already has.
    #[error("an export named {0:?} already exists; pick another name")]
    ExportExists(String),
    /// A volume delete named a volume a VM still has as a disk.
    #[error("volume {volume:?} is in use by VM {vm:?}; detach it or stop the VM first")]
    VolumeInUse {
        /// The volume asked for.
        volume: String,
        /// The VM using it.
        vm: String,
    },
    /// The path exists but not for this method; holds the method.
    #[error("{0} is not allowed on this path")]
    MethodNotAllowed(String),
    /// No route matches the path; holds the path without its leading `/`.
    #[error("no such endpoint: /{0}")]
    NoEndpoint(String),
    /// A volume read failed in the volume or its driver.
    #[error("read failed")]
    Read(#[source] Box<dyn Error + Send + Sync>),
    /// A reply could not be serialised.
    #[error("cannot encode reply")]
    Encode(#[source] serde_json::Error),
    /// The volume catalog refused or failed.
    #[error(transparent)]
    Volume(#[from] VolumeStoreError),
    /// The VM supervisor refused or failed.
    #[error(transparent)]
    Vm(#[from] SupervisorError),
    /// A lifecycle operation named a volume that is not an object volume.
    #[error("volume {0:?} is not an object volume; snapshots, clones and resize need one")]
    NotObject(String),
    /// A VM snapshot named no VM this server runs.
    #[error("no VM named {0:?}")]
    NoVm(String),
    /// A blocking lifecycle task panicked or was cancelled.
    #[error("the operation's task failed")]
    Task(#[source] Box<dyn Error + Send + Sync>),
    /// An object volume's snapshot, clone, resize, flatten or collection failed.
    #[error(transparent)]
    Object(#[from] ObjectError),
}

impl ApiError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        use SupervisorError as S;
        use VolumeStoreError as V;
        match self {
            ApiError::Http(HttpError::BodyTooLarge(_) | HttpError::HeadTooLarge) => 413,
            ApiError::Http(HttpError::Chunked) => 411,
            ApiError::Http(_)
            | ApiError::BadBody(_)
            | ApiError::BadSeconds { .. }
            | ApiError::BadNumber(_)
            | ApiError::ReadTooLong(_)
            | ApiError::OutOfRange { .. } => 400,
            ApiError::NoVolume(_)
            | ApiError::NoEndpoint(_)
            | ApiError::NoVm(_)
            | ApiError::NotServed { .. } => 404,
            ApiError::NotObject(_) => 400,
            ApiError::Task(_) => 500,
            ApiError::Object(e) => object_status(e),
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::ExportExists(_) | ApiError::VolumeInUse { .. } => 409,
            ApiError::Read(_) | ApiError::Encode(_) => 500,
            ApiError::Volume(e) => match e {
                V::Missing(_) => 404,
                V::Exists(_) => 409,
                V::Open { .. } => 500,
                V::BadName(_) | V::UnknownBackend(_) | V::Invalid { .. } | V::BadCache { .. } => {
                    400
                }
            },
            ApiError::Vm(e) => match e {
                S::NoVm(_) | S::NoVolume(_) | S::NotAttached { .. } => 404,
                S::Exists(_)
                | S::VolumeInUse { .. }
                | S::NotRunning(_)
                | S::NoFreePort { .. }
                | S::ColdAttached { .. }
                | S::Export(_) => 409,
                S::Config(_) | S::BadVolumeName(_) => 400,
                _ => 500,
            },
        }
    }

    /// The reply: the status and `{"error": "..."}` with every cause.
    pub fn response(&self) -> Response {
        let body = ErrorBody {
            error: Chain(self).to_string(),
        };
        Response {
            status: self.status(),
            content_type: "application/json",
            // A struct of one string always encodes.
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }
}

/// The status an object volume's refusal answers with.
fn object_status(e: &ObjectError) -> u16 {
    use ObjectError as O;
    match e {
        O::NoSuchVolume(_) | O::NoSuchSnapshot { .. } => 404,
        O::Exists(_)
        | O::SnapshotExists { .. }
        | O::HasDependents { .. }
        | O::Locked { .. }
        | O::Fenced { .. }
        | O::TakingOver { .. } => 409,
        O::BadName(_)
        | O::BadSnapshotName(_)
        | O::BadSize(_)
        | O::Shrink { .. }
        | O::ReadOnly(_)
        | O::TooDeep(_) => 400,
        _ => 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::factory::OpenError;

    #[test]
    fn statuses_and_bodies() {
        let e = ApiError::from(VolumeStoreError::Missing("a".into()));
        assert_eq!(e.status(), 404);
        let r = ApiError::BadBody(serde_json::from_str::<u8>("x").unwrap_err()).response();
        assert_eq!(r.status, 400);
        let body: ErrorBody = serde_json::from_slice(&r.body).unwrap();
        assert!(
            body.error.starts_with("bad JSON body: expected value"),
            "{}",
            body.error
        );
        assert_eq!(ApiError::from(HttpError::Chunked).status(), 411);
        assert_eq!(ApiError::MethodNotAllowed("PUT".into()).status(), 405);
    }

    #[test]
    fn bodies_name_each_cause_once() {
        let e = ApiError::from(VolumeStoreError::Open {
            backend: "object",
            name: "v".into(),
            source: Box::new(OpenError::NoStore),
        });
        assert_eq!(e.status(), 500);
        let body: ErrorBody = serde_json::from_slice(&e.response().body).unwrap();
        assert_eq!(
            body.error,
            "object volume \"v\" cannot be opened: \
             an object volume needs store=URL: this server has no default store"
        );
    }
}
