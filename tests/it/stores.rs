//! The object stores tests run against (handoff, lifecycle, object), each
//! started for the test that asks and stopped when it is dropped: a local
//! directory, vbd's embedded S3 endpoint (`vbd objstore serve`), moto, and
//! Ceph RGW (from `ceph_common`, shared by the test process).

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ceph_common;
use crate::common::{TempDir, free_port, run};

/// The key pair the embedded endpoint and moto are started with.
pub const KEY: &str = "vbdtestkey";
/// Its secret.
pub const SECRET: &str = "vbdtestsecret";

/// A child process killed on drop.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running store: its URL for vbd, the environment vbd needs for it, and
/// what keeps it running.
pub struct TestStore {
    /// Which kind, for messages.
    pub kind: &'static str,
    pub url: String,
    env: Vec<(&'static str, String)>,
    _server: Option<Reaper>,
}

impl TestStore {
    /// The environment (S3 settings) every vbd command needs for this store.
    pub fn env(&self) -> Vec<(&'static str, &str)> {
        self.env.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    /// The S3 endpoint, for a store served over S3.
    pub fn endpoint(&self) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| *k == "AWS_ENDPOINT_URL")
            .map(|(_, v)| v.as_str())
    }
}

fn s3_env(endpoint: &str, key: &str, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", key.into()),
        ("AWS_SECRET_ACCESS_KEY", secret.into()),
        ("AWS_ENDPOINT_URL", endpoint.into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory store inside `dir`.
pub fn local_dir(dir: &TempDir) -> TestStore {
    TestStore {
        kind: "local directory",
        url: format!("file://{}", dir.join("store").display()),
        env: Vec::new(),
        _server: None,
    }
}

/// vbd's embedded S3 endpoint serving a directory inside `dir`.
pub fn embedded(dir: &TempDir) -> TestStore {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vbd"))
        .args([
            "objstore",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--bucket",
            "vbd",
            "--dir",
        ])
        .arg(dir.join("s3"))
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vbd objstore serve");
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("endpoint address");
    }
    let server = Reaper(child);
    let endpoint = line.trim().to_owned();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    TestStore {
        kind: "embedded S3 endpoint",
        url: "s3://vbd/pool".into(),
        env: s3_env(&endpoint, KEY, SECRET),
        _server: Some(server),
    }
}

/// moto's S3 server with a bucket `vbd`.
pub fn moto() -> TestStore {
    let have = Command::new("python3")
        .args(["-c", "import moto.server, boto3"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        have,
        "moto is not installed: python3 -m pip install 'moto[server]' (or run .ci/run)"
    );
    let port = free_port();
    let child = Command::new("python3")
        .args(["-m", "moto.server", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto");
    let server = Reaper(child);
    wait_port(port);
    let endpoint = format!("http://127.0.0.1:{port}");
    run(Command::new("python3").args([
        "-c",
        &format!(
            "import boto3; boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='{KEY}', \
             aws_secret_access_key='{SECRET}', region_name='us-east-1').create_bucket(Bucket='vbd')"
        ),
    ]));
    TestStore {
        kind: "moto",
        url: "s3://vbd".into(),
        env: s3_env(&endpoint, KEY, SECRET),
        _server: Some(server),
    }
}

/// A fresh prefix in the process's Ceph cluster (`None`, after saying so,
/// when Ceph is not installed outside CI).
pub fn ceph(tag: &str) -> Option<TestStore> {
    let rgw = ceph_common::rgw()?;
    let mut env = s3_env(&rgw.endpoint, &rgw.access_key, &rgw.secret_key);
    env.retain(|(k, _)| *k != "AWS_REGION");
    env.push(("AWS_REGION", rgw.region.clone()));
    Some(TestStore {
        kind: "Ceph RGW",
        url: rgw.store(tag),
        env,
        _server: None,
    })
}
