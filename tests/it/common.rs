//! Shared harness for the integration tests: a private temp dir per test, the
//! real `vbd` binary started in it and stopped with SIGTERM (its exit status
//! checked), external tools run with a deadline, and byte-exact comparisons.
//!
//! Nothing here skips: a missing tool fails the test and names the Debian
//! package that provides it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long any one external command may run before the test gives up on it.
/// Only a guard against hangs; no test asserts on speed.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);

/// How long vbd may take to start accepting or to exit after SIGTERM.
const SERVER_DEADLINE: Duration = Duration::from_secs(60);

pub use vbd::test_support::TempDir;

/// Fails the test unless `tool` is on PATH, naming the Debian package.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required by this test but is not on PATH: install the Debian package {package} \
         (apt-get install {package})"
    );
}

/// The system Python with the libnbd bindings. PATH may lead to another
/// Python (pyenv) that cannot see Debian's modules, so this one is explicit.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Fails the test unless the system Python can `import nbd`.
pub fn require_python_nbd() {
    let ok = Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{SYSTEM_PYTHON} cannot import nbd: install the Debian package python3-libnbd \
         (apt-get install python3-libnbd)"
    );
}

/// What a finished command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    fn describe(&self, what: &str) -> String {
        format!(
            "{what}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            tail(&self.stdout, 8000),
            tail(&self.stderr, 8000)
        )
    }
}

fn tail(s: &str, max: usize) -> &str {
    let mut at = s.len().saturating_sub(max);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}

/// Runs `cmd` to completion (killing it after [`COMMAND_DEADLINE`]) and
/// returns what it printed, whatever its exit status.
pub fn output(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let status = wait_deadline(&mut child, COMMAND_DEADLINE)
        .unwrap_or_else(|| panic!("{what} did not finish within {COMMAND_DEADLINE:?}; killed"));
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Runs `cmd` and fails the test, showing its output, unless it exits 0.
pub fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{}",
        out.describe(&format!("command failed: {what}"))
    );
    out
}

/// Runs `cmd` and fails the test unless it exits non-zero.
pub fn run_failing(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = output(cmd);
    assert!(
        !out.status.success(),
        "{}",
        out.describe(&format!("command should have failed: {what}"))
    );
    out
}

/// Waits for `child`, killing it if it outlives `deadline`.
pub fn wait_deadline(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Sends `sig` to a process we started.
pub fn signal(child: &Child, sig: i32) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on the id of a child we own and have not yet reaped.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// A running `vbd serve`, listening on a Unix socket in its own temp dir.
pub struct Vbd {
    dir: TempDir,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Vbd {
    /// Starts `vbd serve --unix DIR/vbd.sock ARGS...` in a fresh temp dir.
    pub fn start(tag: &str, args: &[&str]) -> Self {
        Self::start_in(TempDir::new(tag), args)
    }

    /// Starts vbd in `dir`, which the caller may have filled with images
    /// first; returns once the server answers a connection with its greeting.
    pub fn start_in(dir: TempDir, args: &[&str]) -> Self {
        Self::start_with(dir, args, &[])
    }

    /// Like `start_in`, with extra environment variables (S3 settings).
    pub fn start_with(dir: TempDir, args: &[&str], env: &[(&str, &str)]) -> Self {
        let socket = dir.join("vbd.sock");
        let log = dir.join("vbd.log");
        let log_file =
            File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_vbd"))
            .arg("serve")
            .arg("--unix")
            .arg(&socket)
            .args(args)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("cannot start the vbd binary");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let lines = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut vbd = Vbd {
            dir,
            socket,
            log,
            child: Some(child),
            stdout,
        };
        vbd.wait_ready();
        vbd
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "vbd exited during start-up with {status}\n--- vbd log ---\n{}",
                    self.log()
                );
            }
            if let Ok(mut s) = UnixStream::connect(&self.socket) {
                // Accepting alone only proves the listener exists; the
                // greeting proves a reactor picked the connection up.
                s.set_read_timeout(Some(SERVER_DEADLINE)).unwrap();
                let mut greeting = [0u8; 18];
                if s.read_exact(&mut greeting).is_ok() {
                    assert_eq!(
                        &greeting[..8],
                        b"NBDMAGIC",
                        "vbd greeted with {greeting:02x?}"
                    );
                    return;
                }
            }
            assert!(
                start.elapsed() < SERVER_DEADLINE,
                "vbd did not accept on {} within {SERVER_DEADLINE:?}\n--- vbd log ---\n{}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the server's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The NBD URI of `export` (absolute socket path, as fio requires).
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// The first `count` lines vbd printed on stdout (its export URIs),
    /// waiting for them: vbd prints them after its reactors start, so they
    /// may come after the first connection is served.
    pub fn printed_uris(&self, count: usize) -> Vec<String> {
        let start = Instant::now();
        loop {
            let lines = self.stdout.lock().unwrap().clone();
            if lines.len() >= count || start.elapsed() > SERVER_DEADLINE {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and waits; fails the test unless vbd exits 0.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            signal(&child, libc::SIGTERM);
        }
        let status = wait_deadline(&mut child, SERVER_DEADLINE);
        match status {
            Some(s) if s.success() => {}
            Some(s) => panic!(
                "vbd exited with {s} after SIGTERM\n--- vbd log ---\n{}",
                self.log()
            ),
            None => panic!(
                "vbd did not exit within {SERVER_DEADLINE:?} of SIGTERM; killed\n--- vbd log ---\n{}",
                self.log()
            ),
        }
        assert!(
            !self.socket.exists(),
            "vbd left its socket {} behind",
            self.socket.display()
        );
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Kills the server with SIGKILL (a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails the test unless the server process is still alive.
    pub fn assert_running(&mut self) {
        assert!(
            self.is_running(),
            "vbd is no longer running\n--- vbd log ---\n{}",
            self.log()
        );
    }
}

impl Drop for Vbd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            eprintln!("--- vbd log ({}) ---\n{}", self.log.display(), self.log());
        } else {
            self.stop();
        }
    }
}

/// Deterministic pseudo-random bytes (splitmix64), so a failing test can be
/// replayed and different seeds never produce the same block.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `len` bytes of [`pattern`] to a new file at `path`.
pub fn write_pattern_file(path: &Path, seed: u64, len: usize) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    const CHUNK: usize = 4 << 20;
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        f.write_all(&pattern(seed ^ (done as u64), n)).unwrap();
        done += n;
    }
}

/// Asserts two byte strings are equal, reporting the first difference
/// instead of dumping megabytes.
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let at = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    let show = |b: &[u8]| b[at.min(b.len())..(at + 16).min(b.len())].to_vec();
    panic!(
        "{what}: differs at byte {at} (lengths {} and {}): got {:02x?}, expected {:02x?}",
        actual.len(),
        expected.len(),
        show(actual),
        show(expected)
    );
}

/// Asserts two files hold the same bytes.
pub fn assert_files_eq(actual: &Path, expected: &Path) {
    let read =
        |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    assert_bytes_eq(
        &read(actual),
        &read(expected),
        &format!("{} vs {}", actual.display(), expected.display()),
    );
}

/// Reads `len` bytes at `offset` of a file.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("reading {len} bytes at {offset} of {}: {e}", path.display()));
    buf
}

pub const MIB: u64 = 1 << 20;

/// Runs qemu-io on `uri` with `-c` commands; fails on any reported failure.
pub fn qemu_io(args: &[&str], commands: &[String], uri: &str) -> Output {
    require("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.args(args).args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    run_qemu_io(cmd.arg(uri))
}

/// Runs a prepared qemu-io command; fails on any reported failure.
pub fn run_qemu_io(cmd: &mut Command) -> Output {
    let out = run(cmd);
    // qemu-io exits non-zero on a failed pattern check, but say why if not.
    assert!(
        !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "qemu-io reported a failure:\n{}{}",
        out.stdout,
        out.stderr
    );
    out
}

/// Writes patterns at scattered offsets (unaligned, page-crossing,
/// overlapping, at the very end) with one qemu-io connection, then checks
/// every byte of the export with `read -P` from another; returns the model of
/// the export's contents.
pub fn qemu_io_scattered(vbd: &Vbd, export: &str, size: u64) -> Vec<u8> {
    let writes: &[(u64, u64, u8)] = &[
        (0, 512, 0x11),
        (4097, 3000, 0x22),
        (5097, 10, 0x88), // inside the previous write
        (65535, 131_075, 0x33),
        (MIB - 1, 2, 0x44),
        (2 * MIB, 4 * MIB, 0x5a),
        (3 * MIB + 17, 1, 0xa5),
        (7 * MIB + 333, 65_536 * 3 + 1, 0x66),
        (size - 7, 7, 0x77),
    ];
    let mut model = vec![0u8; size as usize];
    let mut cmds = Vec::new();
    for &(off, len, byte) in writes {
        model[off as usize..(off + len) as usize].fill(byte);
        cmds.push(format!("write -P {byte:#x} {off} {len}"));
    }
    let uri = vbd.uri(export);
    let out = qemu_io(&[], &cmds, &uri);
    assert_eq!(
        out.stdout.matches("wrote ").count(),
        writes.len(),
        "{}",
        out.stdout
    );

    // Every run of equal bytes, holes included, is read back and checked.
    let mut reads = Vec::new();
    let mut start = 0;
    while start < model.len() {
        let byte = model[start];
        let end = model[start..]
            .iter()
            .position(|&b| b != byte)
            .map_or(model.len(), |n| start + n);
        reads.push(format!("read -P {byte:#x} {start} {}", end - start));
        start = end;
    }
    let out = qemu_io(&["-r"], &reads, &uri);
    assert_eq!(
        out.stdout.matches("read ").count(),
        reads.len(),
        "{}",
        out.stdout
    );
    model
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
    l.local_addr().expect("addr").port()
}

/// Runs the `vbd` binary (not serving) with extra environment variables.
pub fn vbd_cmd(args: &[&str], env: &[(&str, &str)]) -> Output {
    output(
        Command::new(env!("CARGO_BIN_EXE_vbd"))
            .args(args)
            .envs(env.iter().copied()),
    )
}

/// Runs the vbd binary, which must fail, and returns what it said on stderr.
pub fn vbd_fails(args: &[&str]) -> String {
    run_failing(Command::new(env!("CARGO_BIN_EXE_vbd")).args(args)).stderr
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}
