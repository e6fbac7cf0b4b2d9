//! s3s-fs checks whether an object exists and only then writes it, so two
//! create-if-absent PUTs (`If-None-Match: *`) racing for one key can both
//! succeed (docs/object-stores.md measured up to 4 of 8). vbd's writer
//! generations rest on exactly one of them winning, so the embedded
//! endpoint's backend (`fs_backend`) lets one conditional create at a time
//! run, with the helpers here; every other request goes straight through. (One
//! endpoint process per directory: two processes serving the same
//! directory would not see each other's creates.)

use s3s::dto::*;
use s3s::{S3Request, S3Result};

/// Whether a request is a create-if-absent one (`If-None-Match: *`), which
/// [`super::fs_backend::FsBackend`] lets run one at a time.
pub(super) fn create_only(c: Option<&IfNoneMatch>) -> bool {
    c.is_some_and(ETagCondition::is_any)
}

/// Largest create-if-absent PUT body the endpoint buffers (vbd's chunk
/// objects are far smaller).
const MAX_CREATE_BODY: usize = 1 << 30;

/// Reads a PUT's whole body before the create is tried. s3s-fs answers a
/// losing create (412) without reading the body, and hyper then closes the
/// connection under a client still sending it, which sees "error sending
/// request" instead of the 412 (one in a few hundred racing creates here).
pub(super) async fn with_body_read(
    mut req: S3Request<PutObjectInput>,
) -> S3Result<S3Request<PutObjectInput>> {
    if let Some(blob) = req.input.body.take() {
        let mut body = s3s::Body::from(blob);
        let bytes = body.store_all_limited(MAX_CREATE_BODY).await.map_err(|e| {
            s3s::s3_error!(
                InvalidRequest,
                "cannot read the body of a create-if-absent PUT (at most 1 GiB): {e}"
            )
        })?;
        req.input.body = Some(StreamingBlob::from(s3s::Body::from(bytes)));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::objstore::server::TestEndpoint;
    use crate::objstore::{Store, StoreError};
    use crate::runtime::runtime;

    /// Eight clients race to create each key: exactly one may win.
    #[test]
    fn racing_creates_have_one_winner() {
        let endpoint = TestEndpoint::start("atomic-create");
        let clients: Vec<Store> = (0..8).map(|_| endpoint.client(true)).collect();
        let rt = runtime();
        for round in 0..20 {
            let key = format!("race/{round}");
            let wins = rt.block_on(async {
                let puts = clients.iter().enumerate().map(|(i, c)| {
                    let key = key.clone();
                    async move { c.put_new(&key, Bytes::from(vec![i as u8; 64 << 10])).await }
                });
                let results = futures_util::future::join_all(puts).await;
                let mut wins = 0;
                for r in results {
                    match r {
                        Ok(()) => wins += 1,
                        Err(StoreError::AlreadyExists(_)) => {}
                        Err(e) => panic!("round {round}: {}", crate::error::Chain(&e)),
                    }
                }
                wins
            });
            assert_eq!(
                wins, 1,
                "round {round}: {wins} creates of one key succeeded"
            );
        }
    }
}
