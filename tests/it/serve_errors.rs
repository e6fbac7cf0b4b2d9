//! `vbd serve` on a listener it cannot open fails with a message that names
//! the address and prints the cause once (it used to print the OS error
//! twice: once in the error's own message, once as its source).

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `vbd serve` with `listen` and one memory export; it must fail
/// within a few seconds. Returns what it printed on stderr.
fn serve_fails(listen: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vbd"))
        .arg("serve")
        .args(listen)
        .args(["--export", "name=mem,backend=memory,size=1M"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vbd");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for vbd") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vbd serve {listen:?} kept running instead of failing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(
        !status.success(),
        "vbd serve {listen:?} succeeded: {stderr}"
    );
    stderr
}

#[test]
fn tcp_address_in_use_names_the_address_and_the_cause_once() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("local address").to_string();
    let stderr = serve_fails(&["--tcp", &addr]);
    let cause = std::io::Error::from_raw_os_error(libc::EADDRINUSE).to_string();
    assert_eq!(stderr.matches(&cause).count(), 1, "{stderr}");
    assert_eq!(stderr.matches("(os error").count(), 1, "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains(&cause))
        .expect("the line with the cause");
    assert!(
        line.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    drop(taken);
}

#[test]
fn unix_path_that_cannot_exist_names_the_path_and_the_cause_once() {
    let dir = std::env::temp_dir().join(format!("vbd-serve-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // A socket "inside" a regular file: its directory cannot be created.
    let file = dir.join("plain-file");
    std::fs::write(&file, b"not a directory").expect("write file");
    let sock = file.join("vbd.sock");
    let sock = sock.to_str().expect("UTF-8 path");
    let stderr = serve_fails(&["--unix", sock]);
    assert_eq!(stderr.matches("(os error").count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {sock}: ")),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}
