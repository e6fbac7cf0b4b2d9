//! Test harness: starts the real `vbd` binary in a private directory and
//! drives it with real NBD clients.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A private scratch directory, removed on drop unless the test failed.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vbd-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Scratch { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            eprintln!("test files kept in {}", self.path.display());
        }
    }
}

/// Fails with the package to install when a peer tool is missing.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: apt-get install -y {package} (or run .ci/run)"
    );
}

/// A running `vbd serve`.
pub struct Vbd {
    child: Option<Child>,
    pub dir: Scratch,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Vbd {
    /// Starts `vbd serve --unix <dir>/vbd.sock` with `args` and waits until
    /// the socket accepts connections.
    pub fn start(tag: &str, args: &[&str]) -> Vbd {
        let dir = Scratch::new(tag);
        let socket = dir.join("vbd.sock");
        Self::start_in(dir, socket, args)
    }

    /// Like `start`, in a given directory with a given socket path.
    pub fn start_in(dir: Scratch, socket: PathBuf, args: &[&str]) -> Vbd {
        let log = dir.join("vbd.log");
        let logf = std::fs::File::create(&log).expect("create log");
        let child = Command::new(env!("CARGO_BIN_EXE_vbd"))
            .arg("--log")
            .arg("debug")
            .arg("serve")
            .arg("--unix")
            .arg(&socket)
            .args(args)
            .current_dir(&dir.path)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn vbd");
        let mut v = Vbd {
            child: Some(child),
            dir,
            socket,
            log,
        };
        v.wait_ready();
        v
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("vbd exited early with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "vbd did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nbd+unix:///NAME?socket=PATH` for an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("vbd already stopped");
        // SAFETY: signals a child we spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait vbd") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "vbd did not exit within 30 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops with SIGTERM and asserts a clean exit and no panic in the log.
    pub fn stop(mut self) {
        let status = self.terminate();
        let log = self.log_text();
        assert!(status.success(), "vbd exited with {status}:\n{log}");
        assert!(!log.contains("panicked"), "vbd panicked:\n{log}");
    }

    /// Kills without ceremony (crash tests).
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- vbd log ---\n{}", self.log_text());
            }
        }
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command and returns its stdout as text.
pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// Runs `qemu-io` against a URI with the given `-c` commands.
pub fn qemu_io(uri: &str, cmds: &[String]) -> Output {
    qemu_io_with(&[], uri, cmds)
}

/// `qemu_io` with extra options (e.g. `-r` for read-only).
pub fn qemu_io_with(opts: &[&str], uri: &str, cmds: &[String]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).args(opts);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    c.output().expect("run qemu-io")
}

/// Asserts that qemu-io ran every command without a reported failure.
pub fn qemu_io_ok(uri: &str, cmds: &[String]) -> String {
    qemu_io_ok_with(&[], uri, cmds)
}

/// `qemu_io_ok` with extra options.
pub fn qemu_io_ok_with(opts: &[&str], uri: &str, cmds: &[String]) -> String {
    let out = qemu_io_with(opts, uri, cmds);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {cmds:?} on {uri}:\n{text}"
    );
    text
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `len` pseudo-random bytes to a file.
pub fn random_file(path: &Path, seed: u64, len: usize) {
    let chunk = 1 << 20;
    let mut data = Vec::with_capacity(len);
    let mut s = seed;
    while data.len() < len {
        data.extend_from_slice(&pattern(s, chunk.min(len - data.len())));
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    std::fs::write(path, data).expect("write random file");
}

/// Reads a whole file.
pub fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}
