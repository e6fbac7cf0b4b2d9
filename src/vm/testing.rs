//! Test doubles for the VM layer, in one place: a stand-in QEMU whose
//! process is a shell script and whose QMP monitor is served from the test
//! process. The monitor keeps QEMU's books of iothreads, block nodes and
//! devices and refuses what QEMU 7.2 would refuse, in its words, so hotplug
//! and supervisor logic run against the same rules as in production,
//! without booting anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::lock::MutexExt;

/// How long anything in a test may take to happen.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// A directory of its own for one test, removed when the test passes and
/// kept (and named on stderr) when it fails.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(tag: &str) -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vbd-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Polls `cond` until it holds; panics naming `what` after [`PATIENCE`].
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes `code` as the stand-in QEMU's exit status, atomically, so the
/// script never reads half a file.
fn write_exit(dir: &Path, code: i32) {
    let tmp = dir.join("exit.tmp");
    std::fs::write(&tmp, format!("{code}\n")).expect("write exit code");
    std::fs::rename(&tmp, dir.join("exit")).expect("publish exit code");
}

/// The fake monitor's books and what the test scripts it to do.
#[derive(Default)]
pub(crate) struct Monitor {
    /// Every command received, in order, as `name` or `name target`.
    pub(crate) log: Vec<String>,
    /// Commands refused outright, by name.
    pub(crate) refuse: BTreeSet<&'static str>,
    /// Whether the guest honours `device_del` (so `DEVICE_DELETED` comes).
    pub(crate) guest_unplugs: bool,
    /// Whether the guest powers off on `system_powerdown`.
    pub(crate) guest_powers_off: bool,
    pub(crate) iothreads: BTreeSet<String>,
    pub(crate) nodes: BTreeSet<String>,
    /// Socket chardevs (vhost-user disks' connections) by id → socket path.
    pub(crate) chardevs: BTreeMap<String, String>,
    /// Device id → the node (virtio-blk) or chardev (vhost-user-blk) it drives.
    pub(crate) devices: BTreeMap<String, String>,
    /// Device id → its `num-queues`, as asked for.
    pub(crate) queues: BTreeMap<String, u64>,
    /// Devices asked to unplug that the guest has not released.
    unplugging: BTreeSet<String>,
    /// The stand-in QEMU's directory, where a power-off writes exit 0.
    qemu_dir: Option<PathBuf>,
}

/// A reply: success, or QEMU's error class and description.
type Reply = Result<(), (&'static str, String)>;

/// One answer of the fake monitor: events to send first, then the reply.
struct Answer {
    events: Vec<Value>,
    reply: Reply,
}

fn refused(desc: String) -> Reply {
    Err(("GenericError", desc))
}

fn check(ok: bool, desc: impl FnOnce() -> String) -> Reply {
    if ok { Ok(()) } else { refused(desc()) }
}

impl Monitor {
    /// A monitor whose guest cooperates: it lets go of unplugged devices
    /// and powers off when asked.
    pub(crate) fn cooperative() -> Monitor {
        Monitor {
            guest_unplugs: true,
            guest_powers_off: true,
            ..Monitor::default()
        }
    }

    /// Commands received since the last call, as `name target`; the
    /// capabilities handshake is left out.
    pub(crate) fn take_log(&mut self) -> Vec<String> {
        let log = std::mem::take(&mut self.log);
        log.into_iter()
            .filter(|c| c != "qmp_capabilities")
            .collect()
    }

    /// Whether QEMU holds no hot-plugged iothread, node, chardev or device.
    pub(crate) fn is_bare(&self) -> bool {
        self.iothreads.is_empty()
            && self.nodes.is_empty()
            && self.chardevs.is_empty()
            && self.devices.is_empty()
    }

    fn answer(&mut self, name: &str, args: &Value) -> Answer {
        let arg = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let target = Some(arg("id"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| arg("node-name"));
        self.log.push(if target.is_empty() {
            name.to_owned()
        } else {
            format!("{name} {target}")
        });
        let mut events = Vec::new();
        let reply = if self.refuse.contains(name) {
            refused(format!("{name} refused by the test"))
        } else {
            match name {
                "qmp_capabilities" => Ok(()),
                "object-add" => check(self.iothreads.insert(target.clone()), || {
                    format!(
                        "attempt to add duplicate property '{target}' to object (type 'container')"
                    )
                }),
                "object-del" => check(self.iothreads.remove(&target), || {
                    format!("object '{target}' not found")
                }),
                "blockdev-add" => check(self.nodes.insert(target.clone()), || {
                    format!("Duplicate nodes with node-name='{target}'")
                }),
                "blockdev-del" => self.blockdev_del(&target),
                "chardev-add" => self.chardev_add(&target, args),
                "chardev-remove" => self.chardev_remove(&target),
                "device_add" => self.device_add(&target, args),
                "device_del" => self.device_del(&target, &mut events),
                "system_powerdown" => {
                    if let (true, Some(dir)) = (self.guest_powers_off, &self.qemu_dir) {
                        // As QEMU does when the guest powers off.
                        events.push(json!({"event": "SHUTDOWN",
                            "timestamp": {"seconds": 1, "microseconds": 0},
                            "data": {"guest": true, "reason": "guest-shutdown"}}));
                        write_exit(dir, 0);
                    }
                    Ok(())
                }
                other => Err((
                    "CommandNotFound",
                    format!("The command {other} has not been found"),
                )),
            }
        };
        Answer { events, reply }
    }

    fn blockdev_del(&mut self, node: &str) -> Reply {
        if self.devices.values().any(|n| n == node) {
            return refused(format!("Node {node} is in use"));
        }
        check(self.nodes.remove(node), || {
            format!("Failed to find node with node-name='{node}'")
        })
    }

    /// A vhost-user client socket: QEMU 7.2 wants a unix address and
    /// takes `reconnect` in seconds.
    fn chardev_add(&mut self, id: &str, args: &Value) -> Reply {
        let data = &args["backend"]["data"];
        if args["backend"]["type"] != "socket" || data["addr"]["type"] != "unix" {
            return refused(format!("chardev {id}: not a unix socket: {args}"));
        }
        if self.chardevs.contains_key(id) {
            return refused(format!("attempt to add duplicate chardev '{id}'"));
        }
        let path = data["addr"]["data"]["path"].as_str().unwrap_or("");
        self.chardevs.insert(id.to_owned(), path.to_owned());
        Ok(())
    }

    fn chardev_remove(&mut self, id: &str) -> Reply {
        if self.devices.values().any(|c| c == id) {
            return refused(format!("Chardev '{id}' is busy"));
        }
        check(self.chardevs.remove(id).is_some(), || {
            format!("Chardev '{id}' not found")
        })
    }

    fn device_add(&mut self, id: &str, args: &Value) -> Reply {
        let arg = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or("");
        let (driver, bus) = (arg("driver"), arg("bus"));
        if self.devices.contains_key(id) {
            return refused(format!("Duplicate device ID '{id}'"));
        }
        if !bus.starts_with("hp") {
            return refused(format!("Bus '{bus}' not found"));
        }
        let backend = match driver {
            "vhost-user-blk-pci" => {
                let chardev = arg("chardev");
                if !self.chardevs.contains_key(chardev) {
                    return refused(format!(
                        "Property 'vhost-user-blk-pci.chardev' can't find value '{chardev}'"
                    ));
                }
                chardev
            }
            _ => {
                let drive = arg("drive");
                if !self.nodes.contains(drive) {
                    return refused(format!(
                        "Property 'virtio-blk-pci.drive' can't find value '{drive}'"
                    ));
                }
                drive
            }
        };
        if let Some(n) = args.get("num-queues").and_then(Value::as_u64) {
            self.queues.insert(id.to_owned(), n);
        }
        self.devices.insert(id.to_owned(), backend.to_owned());
        Ok(())
    }

    /// As QEMU: the first request presses the slot's button; a repeat
    /// while the guest has not let go is refused; when the guest lets go,
    /// the virtio backend and then the device report `DEVICE_DELETED`.
    fn device_del(&mut self, id: &str, events: &mut Vec<Value>) -> Reply {
        if !self.devices.contains_key(id) {
            return Err(("DeviceNotFound", format!("Device '{id}' not found")));
        }
        let repeat = !self.unplugging.insert(id.to_owned());
        if self.guest_unplugs {
            self.devices.remove(id);
            self.unplugging.remove(id);
            let path = format!("/machine/peripheral/{id}");
            let stamp = json!({"seconds": 1, "microseconds": 0});
            events.push(json!({"event": "DEVICE_DELETED", "timestamp": stamp,
                "data": {"path": format!("{path}/virtio-backend")}}));
            events.push(json!({"event": "DEVICE_DELETED", "timestamp": stamp,
                "data": {"device": id, "path": path}}));
        }
        if repeat {
            return refused(format!("Device {id} is already in the process of unplug"));
        }
        Ok(())
    }
}

/// A monitor shared between the test and the task serving it.
pub(crate) type SharedMonitor = Arc<Mutex<Monitor>>;

/// Serves QMP on `path`, bound once `ready` exists (at once when `None`),
/// the way QEMU opens its socket only after it started; one client at a
/// time, as QEMU 7.2 does, the next once the last has gone (a vbd that
/// adopts a VM after a restart). Events an answer causes go out before its
/// reply, the order that tests a client's subscription hardest.
pub(crate) fn serve_monitor(path: PathBuf, ready: Option<PathBuf>, monitor: SharedMonitor) {
    let listener = ready.is_none().then(|| bind(&path));
    tokio::spawn(async move {
        let listener = match listener {
            Some(l) => l,
            None => {
                let ready = ready.expect("either bound or waiting");
                let deadline = Instant::now() + PATIENCE;
                while !ready.exists() {
                    if Instant::now() > deadline {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                bind(&path)
            }
        };
        let exit_file = monitor.locked().qemu_dir.as_ref().map(|d| d.join("exit"));
        while let Ok((stream, _)) = listener.accept().await {
            // The session ends as the stand-in QEMU exits, as QEMU's does.
            tokio::select! {
                biased;
                _ = serve_client(stream, &monitor) => {}
                _ = exited(exit_file.clone()) => {}
            }
        }
    });
}

/// Returns once `exit_file` exists (never without one).
async fn exited(exit_file: Option<PathBuf>) {
    let Some(f) = exit_file else {
        return std::future::pending().await;
    };
    while !f.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One QMP session, until the client leaves.
async fn serve_client(stream: tokio::net::UnixStream, monitor: &SharedMonitor) {
    let (read, mut write) = stream.into_split();
    let greeting = json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
            "package": "fake"}, "capabilities": ["oob"]}});
    let mut out = vec![greeting];
    let mut lines = BufReader::new(read).lines();
    loop {
        for msg in out.drain(..) {
            let line = format!("{msg}\r\n");
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
        let Ok(Some(line)) = lines.next_line().await else {
            return;
        };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let Some(name) = msg.get("execute").and_then(Value::as_str) else {
            continue;
        };
        let args = msg.get("arguments").cloned().unwrap_or(Value::Null);
        let answer = monitor.locked().answer(name, &args);
        out.extend(answer.events);
        let id = msg.get("id").cloned().unwrap_or(Value::Null);
        out.push(match answer.reply {
            Ok(()) => json!({"return": {}, "id": id}),
            Err((class, desc)) => json!({"error": {"class": class, "desc": desc}, "id": id}),
        });
    }
}

fn bind(path: &Path) -> UnixListener {
    UnixListener::bind(path).expect("bind the fake QMP socket")
}

/// Runs a freshly written script once. A thread that forked while the
/// script was open for writing holds it open until that child execs, and
/// exec of a file open for writing fails with ETXTBSY: once one exec
/// succeeds no such holder is left, since the file is closed.
fn probe(binary: &Path) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match std::process::Command::new(binary).arg("--probe").status() {
            Ok(s) if s.success() => return,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => panic!("the fake QEMU does not run: {other:?}"),
        }
    }
}

/// What the stand-in QEMU does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Behaviour {
    /// Runs until told to exit; SIGTERM ends it.
    Runs,
    /// Runs until told to exit and ignores SIGTERM.
    IgnoresSigterm,
    /// Complains on stderr and exits 1, as QEMU does on a bad argument.
    FailsAtOnce,
    /// Runs but never opens its QMP socket.
    NoMonitor,
}

/// A stand-in QEMU: `binary` goes where `qemu-system-x86_64` would.
pub(crate) struct FakeQemu {
    dir: Scratch,
    pub(crate) binary: PathBuf,
    pub(crate) monitor: SharedMonitor,
    behaviour: Behaviour,
}

/// What [`Behaviour::FailsAtOnce`] prints, as QEMU would.
pub(crate) const BAD_DEVICE: &str =
    "qemu-system-x86_64: -device no-such-model: 'no-such-model' is not a valid device model name";

impl FakeQemu {
    pub(crate) fn new(behaviour: Behaviour) -> FakeQemu {
        let dir = Scratch::new("fake-qemu");
        let d = dir.0.display();
        let body = match behaviour {
            Behaviour::FailsAtOnce => format!("echo \"{BAD_DEVICE}\" >&2\nexit 1\n"),
            Behaviour::IgnoresSigterm => "trap '' TERM\n".to_owned(),
            Behaviour::Runs | Behaviour::NoMonitor => String::new(),
        };
        let script = format!(
            "#!/bin/sh\n# Stands in for QEMU: ignores its arguments, runs until told to exit\n\
             # (or until its directory or its parent is gone: a test never leaves it behind).\n\
             [ \"$1\" = --probe ] && exit 0\n\
             {body}echo $$ > '{d}/started'\n\
             while [ ! -e '{d}/exit' ]; do [ -d '{d}' ] && kill -0 $PPID 2>/dev/null || exit 0; sleep 0.02; done\n\
             read code < '{d}/exit'\nexit \"$code\"\n"
        );
        let binary = dir.0.join("qemu");
        std::fs::write(&binary, script).expect("write the fake QEMU");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))
            .expect("make the fake QEMU executable");
        probe(&binary);
        let monitor = Monitor {
            qemu_dir: Some(dir.0.clone()),
            ..Monitor::cooperative()
        };
        FakeQemu {
            dir,
            binary,
            monitor: Arc::new(Mutex::new(monitor)),
            behaviour,
        }
    }

    /// Opens the monitor on `qmp_socket` once the process has started
    /// (unless this QEMU never does).
    pub(crate) fn serve(&self, qmp_socket: PathBuf) {
        if matches!(self.behaviour, Behaviour::Runs | Behaviour::IgnoresSigterm) {
            serve_monitor(
                qmp_socket,
                Some(self.started_marker()),
                self.monitor.clone(),
            );
        }
    }

    /// The guest shuts down (0) or QEMU dies with `code`.
    pub(crate) fn exit(&self, code: i32) {
        write_exit(&self.dir.0, code);
    }

    /// Whether the process ever ran.
    pub(crate) fn started(&self) -> bool {
        self.started_marker().exists()
    }

    /// Its process id, once it has started.
    pub(crate) fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.started_marker()).ok()?;
        text.trim().parse().ok()
    }

    fn started_marker(&self) -> PathBuf {
        self.dir.0.join("started")
    }
}
