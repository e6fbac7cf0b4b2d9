//! s3s-fs checks whether an object exists and only then writes it, so two
//! create-if-absent PUTs (`If-None-Match: *`) racing for one key can both
//! succeed (docs/object-stores.md measured up to 4 of 8). vbd's writer
//! generations rest on exactly one of them winning, so the embedded
//! endpoint serves s3s-fs through this wrapper, which lets one conditional
//! create at a time run; every other request goes straight through. (One
//! endpoint process per directory: two processes serving the same
//! directory would not see each other's creates.)

use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result};

/// s3s-fs with create-if-absent made atomic.
pub(super) struct AtomicCreate {
    inner: s3s_fs::FileSystem,
    /// Held across a conditional create's check and write.
    creates: tokio::sync::Mutex<()>,
}

impl AtomicCreate {
    pub(super) fn new(inner: s3s_fs::FileSystem) -> Self {
        AtomicCreate {
            inner,
            creates: tokio::sync::Mutex::new(()),
        }
    }
}

fn create_only(c: Option<&IfNoneMatch>) -> bool {
    c.is_some_and(ETagCondition::is_any)
}

/// Largest create-if-absent PUT body the endpoint buffers (vbd's chunk
/// objects are far smaller).
const MAX_CREATE_BODY: usize = 1 << 30;

/// Reads a PUT's whole body before the create is tried. s3s-fs answers a
/// losing create (412) without reading the body, and hyper then closes the
/// connection under a client still sending it, which sees "error sending
/// request" instead of the 412 (one in a few hundred racing creates here).
async fn with_body_read(mut req: S3Request<PutObjectInput>) -> S3Result<S3Request<PutObjectInput>> {
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

/// The S3 impl: the two calls that can carry `If-None-Match: *` are
/// serialised when they do; the rest are the operations s3s-fs implements,
/// passed through.
macro_rules! s3_impl {
    ($($op:ident($input:ty) -> $output:ty;)*) => {
        #[async_trait::async_trait]
        impl S3 for AtomicCreate {
            async fn put_object(
                &self,
                req: S3Request<PutObjectInput>,
            ) -> S3Result<S3Response<PutObjectOutput>> {
                if create_only(req.input.if_none_match.as_ref()) {
                    let req = with_body_read(req).await?;
                    let _one = self.creates.lock().await;
                    return self.inner.put_object(req).await;
                }
                self.inner.put_object(req).await
            }

            async fn complete_multipart_upload(
                &self,
                req: S3Request<CompleteMultipartUploadInput>,
            ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
                if create_only(req.input.if_none_match.as_ref()) {
                    let _one = self.creates.lock().await;
                    return self.inner.complete_multipart_upload(req).await;
                }
                self.inner.complete_multipart_upload(req).await
            }

            $(
                async fn $op(&self, req: S3Request<$input>) -> S3Result<S3Response<$output>> {
                    self.inner.$op(req).await
                }
            )*
        }
    };
}

s3_impl! {
    abort_multipart_upload(AbortMultipartUploadInput) -> AbortMultipartUploadOutput;
    copy_object(CopyObjectInput) -> CopyObjectOutput;
    create_bucket(CreateBucketInput) -> CreateBucketOutput;
    create_multipart_upload(CreateMultipartUploadInput) -> CreateMultipartUploadOutput;
    delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
    delete_object(DeleteObjectInput) -> DeleteObjectOutput;
    delete_objects(DeleteObjectsInput) -> DeleteObjectsOutput;
    get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
    get_object(GetObjectInput) -> GetObjectOutput;
    head_bucket(HeadBucketInput) -> HeadBucketOutput;
    head_object(HeadObjectInput) -> HeadObjectOutput;
    list_buckets(ListBucketsInput) -> ListBucketsOutput;
    list_objects(ListObjectsInput) -> ListObjectsOutput;
    list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
    list_parts(ListPartsInput) -> ListPartsOutput;
    upload_part(UploadPartInput) -> UploadPartOutput;
    upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
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
