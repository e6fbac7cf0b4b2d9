//! Helpers shared by the unit tests, the integration tests, the benches and
//! the fuzz seed writer; built only for tests (feature `test-support`). The
//! client-side NBD encoders are in `nbd::client`, next to the decoders they
//! mirror.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory that lives as long as the test: removed when the test
/// passes, kept and named on stderr when it panics, so its files (images,
/// logs, sockets' neighbours) can be examined.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A fresh, empty directory whose name includes `tag`, the process id,
    /// a counter and the clock, so parallel tests and test binaries, and
    /// a directory kept by an earlier run, never collide.
    ///
    /// # Panics
    /// If the directory cannot be created.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Kept short: Unix socket paths are limited to 107 bytes.
        let short: String = tag.chars().take(24).collect();
        let path =
            std::env::temp_dir().join(format!("vbd-{short}-{}-{n}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_after_success_kept_after_a_panic() {
        let passed = TempDir::new("ok");
        let path = passed.join("f");
        std::fs::write(&path, b"x").unwrap();
        drop(passed);
        assert!(!path.exists(), "{} left behind", path.display());

        let kept = std::thread::spawn(|| {
            let failed = TempDir::new("failed");
            let path = failed.path().to_path_buf();
            std::panic::panic_any(path);
        })
        .join()
        .expect_err("the thread panics");
        let kept = kept
            .downcast::<PathBuf>()
            .expect("the panic carries the path");
        assert!(kept.is_dir(), "{} removed after a panic", kept.display());
        std::fs::remove_dir_all(&*kept).unwrap();
    }
}
