//! Object bodies for the embedded endpoint's GETs, read in one go.
//!
//! s3s-fs streams a body through a 4 KiB `ReaderStream` over a tokio file,
//! so every 4 KiB of a GET is one trip to the blocking pool: a ranged GET
//! of a 1 MiB piece of a chunk took a quarter of a second on a busy
//! machine, and cold reads of an object volume crawled at under 100 MiB/s.
//! The endpoint's backend (`fs_backend`) lets s3s-fs answer every GET as
//! before (key checks, conditions, ranges, ETag, metadata), then swaps the
//! body for the same bytes read with one `pread` on the blocking pool, with
//! the helpers here.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Result};

/// Bodies up to this size are read whole; a larger one (which no object
/// volume asks for: chunks are ~4 MiB) keeps s3s-fs's stream.
const MAX_WHOLE: u64 = 16 << 20;

/// The file behind `bucket`/`key` under `root`, for keys made only of
/// plain path components (anything else keeps s3s-fs's own handling).
pub(super) fn object_path(root: &Path, bucket: &str, key: &str) -> Option<PathBuf> {
    let plain = |s: &str| {
        !s.is_empty()
            && Path::new(s)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
    };
    (plain(bucket) && plain(key)).then(|| root.join(bucket).join(key))
}

/// Where the body starts: the first byte of `Content-Range`
/// (`bytes FIRST-LAST/LEN`), or 0 for a whole object.
fn body_start(content_range: Option<&str>) -> Option<u64> {
    match content_range {
        None => Some(0),
        Some(r) => r.strip_prefix("bytes ")?.split('-').next()?.parse().ok(),
    }
}

/// Reads `len` bytes at `start` of `path`, off the async threads (into
/// uninitialised capacity: zeroing it first cost a tenth of the endpoint's
/// CPU).
async fn read_range(path: PathBuf, start: u64, len: usize) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity(len);
        f.take(len as u64).read_to_end(&mut buf)?;
        if buf.len() != len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Replaces the body of `out`, s3s-fs's answer to a GET of the file at
/// `path`, with the same bytes read in one go; leaves it be when the key
/// was not a plain one (no `path`) or the body is over [`MAX_WHOLE`].
pub(super) async fn read_body_whole(
    path: Option<PathBuf>,
    out: &mut GetObjectOutput,
) -> S3Result<()> {
    let len = out.content_length.and_then(|l| u64::try_from(l).ok());
    let start = body_start(out.content_range.as_deref());
    if let (Some(path), Some(len), Some(start)) = (path, len, start)
        && len <= MAX_WHOLE
    {
        // The object changed or vanished between s3s-fs's open and ours:
        // an error, as a torn stream would have been.
        let bytes = read_range(path, start, len as usize)
            .await
            .map_err(|e| S3Error::with_source(S3ErrorCode::InternalError, Box::new(e)))?;
        out.body = Some(StreamingBlob::from(s3s::Body::from(bytes)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::server::TestEndpoint;
    use crate::runtime::runtime;

    /// Whole objects and ranges of them, through the endpoint and a real S3
    /// client, come back exactly as they were put.
    #[test]
    fn gets_return_the_bytes_asked_for() {
        let endpoint = TestEndpoint::start("ranged-reads");
        let store = endpoint.client(false);
        let rt = runtime();
        let body: Vec<u8> = (0..(5u32 << 20) + 123).map(|i| (i % 251) as u8).collect();
        rt.block_on(async {
            store
                .put("volumes/v/chunks/1", Bytes::from(body.clone()))
                .await
                .expect("put");
            let whole = store.get("volumes/v/chunks/1").await.expect("get");
            assert!(whole == body, "the whole object");
            let len = body.len() as u64;
            for r in [0..1, 4096..8192, 1..(1 << 20) + 7, len - 10..len, 0..len] {
                let got = store
                    .get_range("volumes/v/chunks/1", r.clone())
                    .await
                    .expect("ranged get");
                assert!(
                    got[..] == body[r.start as usize..r.end as usize],
                    "range {r:?}"
                );
            }
            let missing = store.get_range("volumes/v/chunks/2", 0..10).await;
            assert!(
                matches!(missing, Err(crate::objstore::StoreError::NotFound(_))),
                "{missing:?}"
            );
        });
    }

    #[test]
    fn body_start_follows_content_range() {
        assert_eq!(body_start(None), Some(0));
        assert_eq!(body_start(Some("bytes 4096-8191/4194304")), Some(4096));
        assert_eq!(body_start(Some("bytes 0-0/1")), Some(0));
        assert_eq!(body_start(Some("items 1-2/3")), None);
        assert_eq!(body_start(Some("bytes x-2/3")), None);
    }

    #[test]
    fn only_plain_keys_get_a_path() {
        let root = Path::new("/srv/s3");
        let r = |bucket, key| object_path(root, bucket, key);
        assert_eq!(
            r("vbd", "volumes/a/chunks/0001"),
            Some(PathBuf::from("/srv/s3/vbd/volumes/a/chunks/0001"))
        );
        assert_eq!(r("vbd", "volumes/../../etc/passwd"), None);
        assert_eq!(r("vbd", "/etc/passwd"), None);
        assert_eq!(r("vbd", "./a"), None);
        assert_eq!(r("..", "a"), None);
        assert_eq!(r("vbd", ""), None);
    }
}
