//! vbd started the ways a service manager and libnbd start servers: with
//! listening sockets passed in (systemd's LISTEN_FDS protocol, through
//! systemd-socket-activate, libnbd's socket activation, and a small
//! manager of our own that keeps the sockets across a restart), and with
//! one client on standard input and output. Each test moves data through
//! the server and checks it; the restart test checks that a client that
//! connects while vbd is down is served once it is back, and that vbd
//! reports READY=1 and STOPPING=1 on NOTIFY_SOCKET.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use vbd::nbd::wire::*;

const VBD: &str = env!("CARGO_BIN_EXE_vbd");

/// A file export `disk` of `size` in `dir`, as `--export` takes it.
fn file_export(dir: &TempDir, size: &str) -> String {
    format!(
        "name=disk,backend=file,path={},size={size}",
        dir.join("disk.img").display()
    )
}

/// Runs a python3-libnbd script with `args`; returns its stdout.
fn python(script: &str, args: &[&str]) -> Output {
    require_python_nbd();
    run(Command::new(SYSTEM_PYTHON).args(["-c", script]).args(args))
}

/// libnbd starts `vbd serve ARGS...` itself, in one of its two ways (given
/// as the method name), writes 1 MiB at an unaligned offset, reads it back,
/// and saves what it wrote in argv[1].
const LIBNBD_STARTS_VBD: &str = r#"
import os, sys, nbd
saved, how, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
h = nbd.NBD()
getattr(h, how)(argv)
data = os.urandom(1 << 20)
h.pwrite(data, (5 << 20) + 512)
print("size", h.get_size())
print("equal", h.pread(1 << 20, (5 << 20) + 512) == data)
open(saved, "wb").write(data)
h.shutdown()
"#;

/// Has libnbd start vbd with `how` and checks the data reached the file.
fn libnbd_starts_vbd(tag: &str, how: &str, serve: &[&str]) {
    let dir = TempDir::new(tag);
    let export = file_export(&dir, "16M");
    let saved = dir.join("written");
    let mut args = vec![saved.to_str().unwrap(), how, VBD, "serve"];
    args.extend_from_slice(serve);
    args.extend(["--export", &export]);
    let out = python(LIBNBD_STARTS_VBD, &args);
    assert!(out.stdout.contains("size 16777216\n"), "{}", out.stdout);
    assert!(out.stdout.contains("equal True\n"), "{}", out.stdout);
    let written = std::fs::read(&saved).unwrap();
    assert_bytes_eq(
        &read_at(&dir.join("disk.img"), (5 << 20) + 512, 1 << 20),
        &written,
        "disk.img after the libnbd write",
    );
    assert!(!out.stderr.contains("ERROR"), "{}", out.stderr);
}

#[test]
fn libnbd_socket_activation_serves_data() {
    libnbd_starts_vbd("act-libnbd", "connect_systemd_socket_activation", &[]);
}

#[test]
fn libnbd_connect_command_serves_data_on_stdin() {
    libnbd_starts_vbd("act-command", "connect_command", &["--stdin"]);
}

#[test]
fn nbdinfo_and_nbdcopy_start_vbd_and_read_clean_output() {
    require("nbdinfo", "libnbd-bin");
    require("nbdcopy", "libnbd-bin");
    let dir = TempDir::new("act-nbdcopy");
    // nbdinfo's JSON on stdout stays parseable: vbd prints no URLs there
    // when its sockets are passed in, since stdout is nbdinfo's.
    let out = run(Command::new("nbdinfo").args([
        "--json",
        "--",
        "[",
        VBD,
        "serve",
        "--export",
        "name=disk,backend=memory,size=8M",
        "]",
    ]));
    let info: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json output is not JSON ({e}):\n{}", out.stdout));
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 8 << 20, "{info:#}");
    assert_eq!(e["block_size_maximum"], 64 << 20, "{info:#}");

    // nbdcopy in and out of vbd started by nbdcopy, with and without --stdin
    // (inside `[ ]` libnbd passes a listening socket either way).
    let input = dir.join("input.img");
    write_pattern_file(&input, 0xac71, 6 << 20);
    let export = file_export(&dir, "6M");
    for (i, serve) in [&["serve"][..], &["serve", "--stdin"]]
        .into_iter()
        .enumerate()
    {
        let subprocess = |cmd: &mut Command| {
            cmd.arg("[")
                .arg(VBD)
                .args(serve)
                .args(["--export", &export])
                .arg("]");
        };
        std::fs::remove_file(dir.join("disk.img")).ok();
        let mut copy_in = Command::new("nbdcopy");
        copy_in.arg(&input).arg("--");
        subprocess(&mut copy_in);
        run(&mut copy_in);
        assert_files_eq(&dir.join("disk.img"), &input);
        let output = dir.join(&format!("output{i}.img"));
        let mut copy_out = Command::new("nbdcopy");
        copy_out.arg("--");
        subprocess(&mut copy_out);
        run(copy_out.arg(&output));
        assert_files_eq(&output, &input);
    }
}

// ---- one client on standard input and output, spoken by hand ----

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Old-style attach (NBD_OPT_EXPORT_NAME), one write, one read of it, and
/// a clean disconnect, over `input`/`output`; returns the export size.
fn nbd_round_trip(output: &mut impl Write, input: &mut impl Read, data: &[u8]) -> u64 {
    let mut recv = |n: usize| {
        let mut b = vec![0u8; n];
        input.read_exact(&mut b).expect("reading from vbd");
        b
    };
    let greeting = recv(18);
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let mut out = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    out.extend(vbd::nbd::client::option(OPT_EXPORT_NAME, b"disk"));
    output.write_all(&out).unwrap();
    let export = recv(10);
    let size = be64(&export);
    let request = |cmd: u16, cookie: u64, len: usize| {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&4096u64.to_be_bytes());
        r.extend_from_slice(&(len as u32).to_be_bytes());
        r
    };
    let mut reply_ok = |cookie: u64| {
        let reply = recv(16);
        assert_eq!(
            &reply[..4],
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "{reply:02x?}"
        );
        assert_eq!(&reply[4..8], &[0; 4], "error in reply {reply:02x?}");
        assert_eq!(be64(&reply[8..]), cookie, "{reply:02x?}");
    };
    // One at a time: replies may come in any order.
    let mut write = request(CMD_WRITE, 1, data.len());
    write.extend_from_slice(data);
    output.write_all(&write).unwrap();
    output.flush().unwrap();
    reply_ok(1);
    output.write_all(&request(CMD_READ, 2, data.len())).unwrap();
    output.flush().unwrap();
    reply_ok(2);
    assert_bytes_eq(&recv(data.len()), data, "read after write over stdio");
    output.write_all(&request(CMD_DISC, 3, 0)).unwrap();
    size
}

/// `vbd serve --stdin` with `stdin` and `stdout`, logging to `log`.
fn serve_stdin(dir: &TempDir, stdin: Stdio, stdout: Stdio) -> (Child, PathBuf) {
    let log = dir.join("vbd.log");
    let child = Command::new(VBD)
        .args(["serve", "--stdin", "--export", &file_export(dir, "4M")])
        .env("RUST_LOG", "info")
        .stdin(stdin)
        .stdout(stdout)
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("starting vbd");
    (child, log)
}

/// vbd exits 0 by itself once its one client is gone, having said how the
/// client was connected.
fn assert_exits_after_client(mut child: Child, log: &Path, connected_by: &str) {
    let status = wait_deadline(&mut child, Duration::from_secs(60));
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "vbd --stdin did not exit 0 after its client left ({status:?})\n{log}"
    );
    assert!(log.contains("the client disconnected"), "{log}");
    assert!(
        log.contains(&format!("connected_by=\"{connected_by}\"")),
        "{log}"
    );
}

#[test]
fn stdin_mode_serves_one_client_over_two_pipes() {
    let dir = TempDir::new("act-pipes");
    let (mut child, log) = serve_stdin(&dir, Stdio::piped(), Stdio::piped());
    let mut to_vbd = child.stdin.take().unwrap();
    let mut from_vbd = child.stdout.take().unwrap();
    let data = pattern(0x91, 200_000);
    assert_eq!(nbd_round_trip(&mut to_vbd, &mut from_vbd, &data), 4 << 20);
    drop(to_vbd);
    // Nothing but replies came on stdout: the stream ends right after them.
    let mut rest = Vec::new();
    from_vbd.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "stray bytes on stdout: {rest:02x?}");
    assert_exits_after_client(child, &log, "pipes");
    assert_bytes_eq(
        &read_at(&dir.join("disk.img"), 4096, data.len()),
        &data,
        "disk.img",
    );
}

#[test]
fn stdin_mode_serves_one_client_on_a_socket() {
    let dir = TempDir::new("act-stdin-sock");
    let (mut client, server) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let server = OwnedFd::from(server);
    let (child, log) = serve_stdin(
        &dir,
        Stdio::from(server.try_clone().unwrap()),
        Stdio::from(server),
    );
    let data = pattern(0x92, 65_536);
    let mut reader = client.try_clone().unwrap();
    assert_eq!(nbd_round_trip(&mut client, &mut reader, &data), 4 << 20);
    // The socket closes when vbd's connection does (vbd holds no other copy).
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes after DISC: {rest:02x?}");
    assert_exits_after_client(child, &log, "socket");
}

// ---- sockets passed in by a service manager ----

#[test]
fn systemd_socket_activate_passes_nbd_and_control_sockets() {
    require("systemd-socket-activate", "systemd");
    let dir = TempDir::new("act-ssa");
    let nbd = dir.join("nbd.sock");
    let control = dir.join("control.sock");
    let log = dir.join("vbd.log");
    let log_file = File::create(&log).unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&nbd)
        .arg("-l")
        .arg(&control)
        .args(["--fdname=nbd:control", "-E", "RUST_LOG=info", VBD, "serve"])
        .args(["--export", &file_export(&dir, "8M")])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("starting systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(nbd.exists() && control.exists()) {
        assert!(Instant::now() < deadline, "no sockets: {}", read(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection makes systemd-socket-activate exec vbd, which
    // finds the client waiting in the backlog.
    let uri = format!("nbd+unix:///disk?socket={}", nbd.display());
    let out = qemu_io(
        &[],
        &[
            "write -P 0x6b 1M 512k".into(),
            "read -P 0x6b 1M 512k".into(),
        ],
        &uri,
    );
    assert!(out.stdout.contains("read 524288/524288"), "{}", out.stdout);
    let status = vbd_cmd(
        &["status", "--json", "--control", control.to_str().unwrap()],
        &[],
    );
    assert!(status.status.success(), "{}", status.stderr);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["exports"][0]["name"], "disk", "{status:#}");
    assert_eq!(
        status["listeners"],
        serde_json::json!([nbd.display().to_string()]),
        "{status:#}"
    );
    // vbd (systemd-socket-activate exec'd it: same pid) stops cleanly and
    // leaves the sockets, which are not its own, in place.
    signal(&child, libc::SIGTERM);
    let exit = wait_deadline(&mut child, Duration::from_secs(60));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        read(&log)
    );
    assert!(nbd.exists() && control.exists(), "{}", read(&log));
    let log = read(&log);
    assert!(log.contains("role=\"control\""), "{log}");
    assert_eq!(
        read_at(&dir.join("disk.img"), 1 << 20, 512 << 10),
        vec![0x6b; 512 << 10]
    );
}

#[test]
fn systemd_socket_activate_accept_hands_each_connection_to_a_vbd_stdin() {
    require("systemd-socket-activate", "systemd");
    // Accept=yes: the connection as descriptor 3 (LISTEN_FDS), or with
    // --inetd as standard input and output.
    for (i, (inetd, how)) in [
        (false, "client connection passed by the service manager"),
        (true, "connected_by=\"socket\""),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = TempDir::new(&format!("act-accept{i}"));
        let sock = dir.join("nbd.sock");
        let log = dir.join("vbd.log");
        let log_file = File::create(&log).unwrap();
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.arg("-a").arg("-l").arg(&sock);
        if inetd {
            cmd.arg("--inetd");
        }
        let mut manager = cmd
            .args(["-E", "RUST_LOG=info", VBD, "serve", "--stdin"])
            .args(["--export", &file_export(&dir, "4M")])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("starting systemd-socket-activate");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "no socket: {}", read(&log));
            std::thread::sleep(Duration::from_millis(20));
        }
        let uri = format!("nbd+unix:///disk?socket={}", sock.display());
        let out = qemu_io(
            &[],
            &[
                "write -P 0x3e 64k 64k".into(),
                "read -P 0x3e 64k 64k".into(),
            ],
            &uri,
        );
        assert!(out.stdout.contains("read 65536/65536"), "{}", out.stdout);
        // That vbd exits by itself once its client is gone.
        while !read(&log).contains("the client disconnected") {
            assert!(Instant::now() < deadline, "vbd stayed: {}", read(&log));
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(&manager, libc::SIGTERM);
        wait_deadline(&mut manager, Duration::from_secs(30));
        let log = read(&log);
        assert!(log.contains(how), "{log}");
        assert_eq!(
            read_at(&dir.join("disk.img"), 64 << 10, 64 << 10),
            vec![0x3e; 64 << 10],
            "{log}"
        );
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A service manager in miniature: it holds the listening sockets and the
/// notification socket, and starts vbd with the sockets passed as systemd
/// passes them, as often as a test likes.
struct Manager {
    dir: TempDir,
    nbd: UnixListener,
    control: UnixListener,
    notify: UnixDatagram,
    /// `NOTIFY_SOCKET` for vbd.
    notify_addr: String,
    runs: usize,
}

impl Manager {
    /// Sockets in `dir`; notifications on an abstract socket when
    /// `abstract_notify`, else on a path.
    fn new(tag: &str, abstract_notify: bool) -> Self {
        let dir = TempDir::new(tag);
        let nbd = UnixListener::bind(dir.join("nbd.sock")).unwrap();
        let control = UnixListener::bind(dir.join("control.sock")).unwrap();
        let (notify, notify_addr) = if abstract_notify {
            let name = format!("vbd-test-notify-{}-{tag}", std::process::id());
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
        } else {
            let path = dir.join("notify.sock");
            (
                UnixDatagram::bind(&path).unwrap(),
                path.display().to_string(),
            )
        };
        notify
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Manager {
            dir,
            nbd,
            control,
            notify,
            notify_addr,
            runs: 0,
        }
    }

    fn uri(&self) -> String {
        format!(
            "nbd+unix:///disk?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    /// Starts vbd with the two sockets as descriptors 3 and 4, named `nbd`
    /// and `control`, and LISTEN_PID set to vbd's pid (by a shell that
    /// execs it, keeping its pid).
    fn start(&mut self) -> Child {
        self.runs += 1;
        let log = File::create(self.dir.join(&format!("vbd{}.log", self.runs))).unwrap();
        let fds: [RawFd; 2] = [self.nbd.as_raw_fd(), self.control.as_raw_fd()];
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", VBD, "serve"])
            .args(["--export", &file_export(&self.dir, "8M")])
            .env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "nbd:control")
            .env("NOTIFY_SOCKET", &self.notify_addr)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: the closure runs between fork and exec and calls only
        // fcntl, dup2 and close, which are async-signal-safe; it allocates
        // nothing (the array is copied in).
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way first, so placing one cannot clobber the other.
                let mut high = [0; 2];
                for (h, &fd) in high.iter_mut().zip(&fds) {
                    *h = libc::fcntl(fd, libc::F_DUPFD, 100);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &h) in high.iter().enumerate() {
                    // dup2's copy is not close-on-exec: it survives exec.
                    if libc::dup2(h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(h);
                }
                Ok(())
            })
        };
        cmd.spawn().expect("starting vbd")
    }

    /// The next notification vbd sent.
    fn notification(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification from vbd: {e}\n{}", self.logs()));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Waits for READY=1.
    fn wait_ready(&self) {
        let msg = self.notification();
        assert!(msg.starts_with("READY=1\n"), "{msg}");
        assert!(msg.contains("STATUS=serving 1 export(s) on "), "{msg}");
    }

    /// SIGTERM; checks STOPPING=1 and a clean exit.
    fn stop(&self, mut vbd: Child) {
        signal(&vbd, libc::SIGTERM);
        let msg = self.notification();
        assert!(msg.starts_with("STOPPING=1\n"), "{msg}");
        let exit = wait_deadline(&mut vbd, Duration::from_secs(60));
        assert!(
            exit.is_some_and(|s| s.success()),
            "{exit:?}\n{}",
            self.logs()
        );
    }

    fn logs(&self) -> String {
        (1..=self.runs)
            .map(|i| read(&self.dir.join(&format!("vbd{i}.log"))))
            .collect::<Vec<_>>()
            .join("\n--- next run ---\n")
    }
}

/// Reads 1 MiB at 2 MiB and says whether it is all 0x5c.
const READ_CHECK: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("served", h.pread(1 << 20, 2 << 20) == b"\x5c" * (1 << 20))
h.shutdown()
"#;

#[test]
fn a_client_connecting_during_a_restart_is_served_when_vbd_is_back() {
    let mut m = Manager::new("act-restart", false);
    let first = m.start();
    m.wait_ready();
    // READY=1 means serving: a client gets through at once.
    qemu_io(&[], &["write -P 0x5c 2M 1M".into()], &m.uri());
    let status = vbd_cmd(
        &[
            "status",
            "--control",
            m.dir.join("control.sock").to_str().unwrap(),
        ],
        &[],
    );
    assert!(status.stdout.contains("disk"), "{}", status.stdout);
    m.stop(first);
    assert!(
        m.dir.join("nbd.sock").exists() && m.dir.join("control.sock").exists(),
        "vbd removed sockets that are not its own"
    );

    // vbd is down; a client connects (into the backlog the manager holds)
    // and waits for the greeting.
    require_python_nbd();
    let mut client = Command::new(SYSTEM_PYTHON)
        .args(["-c", READ_CHECK, &m.uri()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        client.try_wait().unwrap().is_none(),
        "the client gave up while vbd was down"
    );
    let second = m.start();
    m.wait_ready();
    let exit = wait_deadline(&mut client, Duration::from_secs(60));
    let mut out = String::new();
    client
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        exit.is_some_and(|s| s.success()) && out.contains("served True"),
        "{exit:?} {out} {err}\n{}",
        m.logs()
    );
    m.stop(second);
    let logs = m.logs();
    assert_eq!(
        logs.matches("NBD listener passed by the service manager")
            .count(),
        2,
        "{logs}"
    );
    assert!(!logs.contains("WARN"), "{logs}");
}

#[test]
fn readiness_goes_to_an_abstract_notify_socket() {
    let mut m = Manager::new("act-abstract", true);
    let vbd = m.start();
    m.wait_ready();
    let out = qemu_io(
        &[],
        &["write -P 0x21 0 64k".into(), "read -P 0x21 0 64k".into()],
        &m.uri(),
    );
    assert!(out.stdout.contains("read 65536/65536"), "{}", out.stdout);
    m.stop(vbd);
}
