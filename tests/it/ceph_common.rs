//! A single-node Ceph cluster with an S3 gateway (RGW) for the object-store
//! tests: `tools/ceph-rgw` brings it up on first use and every test in the
//! process shares it. The script's owner watcher stops it (and removes its
//! directory) once this process exits, however it exits.
//!
//! `VBD_CEPH_DIR=DIR` uses the cluster in DIR instead, starting it there if
//! needed, and leaves it running for the next test binary; whoever set it
//! runs `tools/ceph-rgw stop DIR`.
//!
//! Tests skip, saying why, when Ceph is not installed; under CI (`CI=true`,
//! where .ci/run installs it) a missing Ceph fails them instead.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The Debian packages the cluster comes from.
pub const PACKAGES: &str = "ceph-mon ceph-mgr ceph-osd radosgw ceph-common";

/// The programs `tools/ceph-rgw` runs.
const BINARIES: &[&str] = &[
    "ceph-mon",
    "ceph-mgr",
    "ceph-osd",
    "radosgw",
    "radosgw-admin",
    "ceph",
    "monmaptool",
];

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/ceph-rgw");

/// A running gateway: where it listens and the S3 user it made.
#[derive(Debug)]
pub struct Rgw {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    pub region: String,
    /// The cluster's directory; its daemons log to `log/` inside it.
    pub dir: PathBuf,
}

impl Rgw {
    /// The environment vbd reads its S3 settings from.
    pub fn s3_env(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", &self.access_key),
            ("AWS_SECRET_ACCESS_KEY", &self.secret_key),
            ("AWS_ENDPOINT_URL", &self.endpoint),
            ("AWS_REGION", &self.region),
        ]
    }

    /// A store URL for vbd under a fresh prefix in the cluster's bucket
    /// (named for `tag`, this process and a counter): a cluster shared
    /// through VBD_CEPH_DIR keeps what earlier runs stored.
    pub fn store(&self, tag: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!(
            "s3://{}/{tag}-{}-{n}-{nanos:x}",
            self.bucket,
            std::process::id()
        )
    }
}

/// The process's cluster, started on first use; `None` (after saying so
/// on stderr) when Ceph is not installed and this is not CI. Panics if the
/// cluster does not come up, with the script's output and where the logs are.
pub fn rgw() -> Option<&'static Rgw> {
    static CLUSTER: OnceLock<Result<Option<Rgw>, String>> = OnceLock::new();
    match CLUSTER.get_or_init(start) {
        Ok(Some(r)) => Some(r),
        Ok(None) => {
            eprintln!(
                "SKIPPED: Ceph is not installed (apt-get install {PACKAGES}, or run .ci/run)"
            );
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn missing_binaries() -> Vec<&'static str> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    BINARIES
        .iter()
        .copied()
        .filter(|b| !std::env::split_paths(&path).any(|d| d.join(b).is_file()))
        .collect()
}

fn start() -> Result<Option<Rgw>, String> {
    let missing = missing_binaries();
    if !missing.is_empty() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            return Err(format!(
                "CI must have Ceph, but these are missing: {}; .ci/run installs {PACKAGES}",
                missing.join(", ")
            ));
        }
        return Ok(None);
    }
    let (dir, owner) = match std::env::var_os("VBD_CEPH_DIR") {
        Some(d) => (PathBuf::from(d), None),
        None => (
            std::env::temp_dir().join(format!("vbd-ceph-{}", std::process::id())),
            Some(std::process::id().to_string()),
        ),
    };
    let mut cmd = Command::new(SCRIPT);
    cmd.arg("start").arg(&dir);
    if let Some(pid) = &owner {
        cmd.args(["--owner", pid]);
    }
    let t = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {SCRIPT}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "{SCRIPT} start {} failed ({}); logs in {}/log\n{stderr}",
            dir.display(),
            out.status,
            dir.display()
        ));
    }
    let kv: HashMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| {
        kv.get(k)
            .map(|v| v.to_string())
            .ok_or_else(|| format!("{SCRIPT} printed no {k}:\n{stdout}{stderr}"))
    };
    let rgw = Rgw {
        endpoint: get("CEPH_RGW_ENDPOINT")?,
        access_key: get("CEPH_RGW_ACCESS_KEY")?,
        secret_key: get("CEPH_RGW_SECRET_KEY")?,
        bucket: get("CEPH_RGW_BUCKET")?,
        region: get("CEPH_RGW_REGION")?,
        dir: PathBuf::from(get("CEPH_RGW_DIR")?),
    };
    eprintln!(
        "ceph: RGW at {} ready in {:.1}s (logs in {}/log)",
        rgw.endpoint,
        t.elapsed().as_secs_f64(),
        rgw.dir.display()
    );
    Ok(Some(rgw))
}
