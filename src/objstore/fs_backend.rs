//! What the embedded endpoint serves: s3s-fs over a directory, with
//! create-if-absent made atomic (`atomic_create`) and GET bodies read in
//! one go (`ranged_reads`). Every other operation s3s-fs implements goes
//! straight through.

use std::path::PathBuf;

use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result};

use super::atomic_create::{create_only, with_body_read};
use super::ranged_reads::{object_path, read_body_whole};

/// s3s-fs with atomic creates and whole-body GETs.
pub(super) struct FsBackend {
    inner: s3s_fs::FileSystem,
    /// The directory whose subdirectories are the buckets.
    root: PathBuf,
    /// Held across a conditional create's check and write.
    creates: tokio::sync::Mutex<()>,
}

impl FsBackend {
    /// Serves `inner`, which serves the directory `root`.
    pub(super) fn new(inner: s3s_fs::FileSystem, root: PathBuf) -> Self {
        FsBackend {
            inner,
            root,
            creates: tokio::sync::Mutex::new(()),
        }
    }
}

/// The S3 impl: GET, PUT and CompleteMultipartUpload as described above,
/// the operations listed passed through.
macro_rules! s3_impl {
    ($($op:ident($input:ty) -> $output:ty;)*) => {
        #[async_trait::async_trait]
        impl S3 for FsBackend {
            async fn get_object(
                &self,
                req: S3Request<GetObjectInput>,
            ) -> S3Result<S3Response<GetObjectOutput>> {
                let path = object_path(&self.root, &req.input.bucket, &req.input.key);
                let mut resp = self.inner.get_object(req).await?;
                read_body_whole(path, &mut resp.output).await?;
                Ok(resp)
            }

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
    head_bucket(HeadBucketInput) -> HeadBucketOutput;
    head_object(HeadObjectInput) -> HeadObjectOutput;
    list_buckets(ListBucketsInput) -> ListBucketsOutput;
    list_objects(ListObjectsInput) -> ListObjectsOutput;
    list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
    list_parts(ListPartsInput) -> ListPartsOutput;
    upload_part(UploadPartInput) -> UploadPartOutput;
    upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
}
