//! `POST /v1/volumes/release`: an object volume this server serves is
//! taken out of service (its export or catalog entry removed, so no new
//! client reaches it), its WAL drained to the store and its generation
//! released, so that another host opens it with nothing to recover.
//! Clients still connected get ESHUTDOWN for writes from then on.

use std::sync::Arc;

use super::api::ControlApi;
use super::error::ApiError;
use super::factory::off_runtime;
use super::model::{ReleaseReply, ReleaseRequest};
use crate::volume::Volume;
use crate::volume::object::CloseOutcome;

/// Whether two store URLs name the same store (a trailing `/` aside).
fn same_store(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Drains and releases the object volume `req` names.
pub fn release(api: &ControlApi, req: &ReleaseRequest) -> Result<ReleaseReply, ApiError> {
    let is_it = |v: &Arc<dyn Volume>| {
        v.as_object().is_some_and(|o| {
            let (store, name) = o.identity();
            same_store(store, &req.store) && name == req.volume
        })
    };
    let exported = api
        .registry
        .all()
        .into_iter()
        .find(|e| is_it(&e.volume))
        .map(|e| e.name.clone());
    let catalogued = || {
        api.catalog
            .list()
            .into_iter()
            .find(|i| api.catalog.get(&i.name).is_some_and(|(v, _)| is_it(&v)))
            .map(|i| i.name)
    };
    let (name, volume) = match exported {
        Some(name) => {
            refuse_if_in_use(api, &name)?;
            let e = api
                .registry
                .remove(&name)
                .map_err(|_| ApiError::NoVolume(name.clone()))?;
            (name, e.volume.clone())
        }
        None => {
            let name = catalogued().ok_or_else(|| ApiError::NotServed {
                store: req.store.clone(),
                volume: req.volume.clone(),
            })?;
            refuse_if_in_use(api, &name)?;
            (name.clone(), api.catalog.remove(&name)?)
        }
    };
    let outcome = off_runtime(move || volume.as_object().map(|o| o.release()));
    let (generation, outcome) = match outcome {
        Some(CloseOutcome::Released { generation }) => (generation, "released"),
        Some(CloseOutcome::Held { generation, .. }) => (generation, "held"),
        Some(CloseOutcome::Fenced { generation, .. }) => (generation, "fenced"),
        _ => (0, "closed"),
    };
    Ok(ReleaseReply {
        export: name,
        generation,
        outcome: outcome.to_owned(),
    })
}

fn refuse_if_in_use(api: &ControlApi, name: &str) -> Result<(), ApiError> {
    match api.supervisor.user_of(name) {
        Some(vm) => Err(ApiError::VolumeInUse {
            volume: name.to_owned(),
            vm,
        }),
        None => Ok(()),
    }
}
