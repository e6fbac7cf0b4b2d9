//! Helpers shared by the VM integration tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use vbd::lock::MutexExt;
use vbd::server::{Registry, Server, ServerConfig};
use vbd::vm::config::{RunPaths, VmConfig, argv};
use vbd::vm::qmp::Qmp;
use vbd::volume::memory::MemoryVolume;

pub use vbd::test_support::TempDir;

/// TCG guests are CPU-heavy: the tests that boot one hold this guard, so
/// only one guest runs at a time across the whole test binary.
pub fn one_guest() -> MutexGuard<'static, ()> {
    static ONE_GUEST: Mutex<()> = Mutex::new(());
    ONE_GUEST.locked()
}

/// An in-process vbd NBD server with memory exports.
pub struct VbdServer {
    /// Holds the socket; removed with the server (kept if a test fails).
    _dir: TempDir,
    pub socket: PathBuf,
    pub registry: Arc<Registry>,
    server: Option<Server>,
}

impl VbdServer {
    pub fn start(exports: &[(&str, u64)]) -> VbdServer {
        let dir = TempDir::new("srv");
        let socket = dir.join("nbd.sock");
        let registry = Arc::new(Registry::new());
        for (name, size) in exports {
            registry
                .add(name, Arc::new(MemoryVolume::new(*size, false)), false)
                .unwrap();
        }
        let cfg = ServerConfig {
            unix: vec![socket.clone()],
            threads: 1,
            ..ServerConfig::default()
        };
        let server = Server::start(cfg, registry.clone()).unwrap();
        VbdServer {
            _dir: dir,
            socket,
            registry,
            server: Some(server),
        }
    }
}

impl VbdServer {
    /// The running server's handle (its registry and cores).
    pub fn handle(&self) -> vbd::server::ServerHandle {
        self.server.as_ref().expect("the server runs").handle()
    }
}

impl Drop for VbdServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
    }
}

/// A QEMU started from a config's argv, killed when dropped.
pub struct Qemu {
    pub child: Child,
    pub paths: RunPaths,
    /// Holds QMP socket, pidfile and serial log (kept if a test fails).
    _dir: TempDir,
}

impl Qemu {
    pub fn launch(cfg: &VmConfig, srv: &VbdServer, extra: &[&str]) -> Qemu {
        let dir = TempDir::new("qemu");
        let paths = RunPaths {
            nbd_socket: srv.socket.clone(),
            qmp_socket: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            serial_log: dir.join("serial.log"),
            vhost: Default::default(),
        };
        let args = argv(cfg, &paths).unwrap();
        let child = Command::new(&args[0])
            .args(&args[1..])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 must be installed");
        let q = Qemu {
            child,
            paths,
            _dir: dir,
        };
        wait_for_path(&q.paths.qmp_socket, Duration::from_secs(20));
        q
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test guest that `tools/build-guest.sh OPTIONS` builds, made once and
/// cached under target/test-guest (remade when the script changes): the
/// kernel and the initrd named `initrd` (initrd.img without options).
pub fn test_guest(options: &[&str], initrd: &str) -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tools/build-guest.sh");
    let out = root.join("target/test-guest");
    let image = out.join(initrd);
    let fresh = |p: &Path| {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(p), m(&script)), (Some(a), Some(b)) if a >= b)
    };
    if !fresh(&image) {
        let st = Command::new("bash")
            .arg(&script)
            .args(options)
            .arg(&out)
            .status()
            .expect("run tools/build-guest.sh");
        assert!(st.success(), "tools/build-guest.sh {options:?} failed");
    }
    (out.join("vmlinuz"), image)
}

/// What the guest's `fill` and `blk` write: `line\n` repeated and cut at
/// 4 KiB, that block repeated, cut to `len`.
pub fn guest_pattern(line: &str, len: usize) -> Vec<u8> {
    let block: Vec<u8> = format!("{line}\n").bytes().cycle().take(4096).collect();
    block.iter().copied().cycle().take(len).collect()
}

/// A string unique to this test run, for the patterns a guest writes.
pub fn tag(what: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!("{what}{}x{t}", std::process::id())
}

/// Waits for `marker` on a guest's serial console log; fails at once if
/// the guest reports `VBD-ERROR`. Returns the whole console text.
pub fn wait_serial(log: &Path, marker: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) {
            return text;
        }
        assert!(
            !text.contains("VBD-ERROR"),
            "guest reported an error:\n{text}"
        );
        assert!(
            start.elapsed() < limit,
            "guest did not print {marker} within {limit:?}; serial log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn wait_for_path(p: &Path, limit: Duration) {
    let start = Instant::now();
    while !p.exists() {
        assert!(start.elapsed() < limit, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An untyped QMP query: its reply stays JSON so the test reads exactly
/// what QEMU 7.2 says, independent of the 9.1 schema's structs.
macro_rules! raw_cmd {
    ($ty:ident, $name:literal) => {
        #[derive(Serialize)]
        #[serde(transparent)]
        pub struct $ty(pub serde_json::Map<String, Value>);
        impl qapi::Command for $ty {
            type Ok = Value;
            const NAME: &'static str = $name;
            const ALLOW_OOB: bool = false;
        }
    };
}
raw_cmd!(QueryIothreads, "query-iothreads");
raw_cmd!(QueryNodes, "query-named-block-nodes");
raw_cmd!(QomList, "qom-list");
raw_cmd!(QueryChardev, "query-chardev");

/// What the VM holds right now, by QEMU id.
#[derive(Debug)]
pub struct Names {
    pub iothreads: Vec<String>,
    pub nodes: Vec<String>,
    pub devices: Vec<String>,
    pub node_info: Vec<Value>,
    /// Character devices by label (vhost-user disks' sockets among them).
    pub chardevs: Vec<String>,
}

fn field(v: &Value, k: &str) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x[k].as_str().map(String::from))
        .collect()
}

pub async fn names(qmp: &Qmp) -> Names {
    let empty = serde_json::Map::new();
    let ioth = qmp.execute(QueryIothreads(empty.clone())).await.unwrap();
    let chardevs = qmp.execute(QueryChardev(empty)).await.unwrap();
    let mut args = serde_json::Map::new();
    args.insert("flat".into(), Value::Bool(true));
    let nodes = qmp.execute(QueryNodes(args)).await.unwrap();
    let mut args = serde_json::Map::new();
    args.insert("path".into(), Value::from("/machine/peripheral"));
    let devs = qmp.execute(QomList(args)).await.unwrap();
    let devices = devs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"].as_str().unwrap_or("").starts_with("child<"))
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    Names {
        iothreads: field(&ioth, "id"),
        nodes: field(&nodes, "node-name"),
        devices,
        node_info: nodes.as_array().unwrap().clone(),
        chardevs: field(&chardevs, "label"),
    }
}
