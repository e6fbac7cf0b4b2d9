//! The operator's view against the real binary: traffic from qemu-io and
//! libnbd moves the Prometheus counters by exactly what was sent (scraped
//! over `--metrics` TCP and over the control socket), histograms stay
//! consistent, refusals and handshake failures are counted, `vbd status`
//! lists exports and a live connection, JSON logs carry the connection's
//! fields, and a real QEMU's life shows in the VM metrics.

use crate::common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{
    MIB, SYSTEM_PYTHON, Vbd, free_port, qemu_io, require, require_python_nbd, run, vbd_cmd,
};

/// One scrape: samples in the order written, and by `name{labels}`.
pub(crate) struct Scrape {
    content_type: String,
    samples: Vec<(String, f64)>,
    by_key: HashMap<String, f64>,
    text: String,
}

impl Scrape {
    fn parse(raw: &[u8]) -> Scrape {
        let raw = String::from_utf8(raw.to_vec()).expect("metrics are UTF-8");
        let (head, text) = raw.split_once("\r\n\r\n").expect("HTTP head");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Type: "))
            .unwrap_or_default()
            .to_owned();
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line.rsplit_once(' ').expect("sample line");
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            samples.push((key.to_owned(), v));
        }
        let by_key = samples.iter().cloned().collect();
        Scrape {
            content_type,
            samples,
            by_key,
            text: text.to_owned(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> f64 {
        *self
            .by_key
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{}", self.text))
    }

    fn op(&self, family: &str, export: &str, op: &str) -> f64 {
        self.get(&format!("{family}{{export=\"{export}\",op=\"{op}\"}}"))
    }

    /// Every histogram series is cumulative, ends in +Inf equal to
    /// `_count`, and `_count` equals the request counter.
    fn check_histograms(&self, export: &str) {
        let name = "vbd_nbd_request_duration_seconds";
        for op in [
            "read",
            "write",
            "flush",
            "trim",
            "write_zeroes",
            "block_status",
            "cache",
            "other",
        ] {
            let prefix = format!("{name}_bucket{{export=\"{export}\",op=\"{op}\",le=\"");
            let buckets: Vec<(f64, f64)> = self
                .samples
                .iter()
                .filter_map(|(k, v)| {
                    let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("numeric le")
                    };
                    Some((le, *v))
                })
                .collect();
            assert_eq!(buckets.len(), 27, "{op}: 26 bounds and +Inf");
            for w in buckets.windows(2) {
                assert!(w[0].0 < w[1].0, "{op}: bounds increase: {w:?}");
                assert!(w[0].1 <= w[1].1, "{op}: cumulative counts: {w:?}");
            }
            let count = self.op(&format!("{name}_count"), export, op);
            assert_eq!(
                buckets[26],
                (f64::INFINITY, count),
                "{op}: +Inf is the count"
            );
            assert_eq!(
                count,
                self.op("vbd_nbd_requests_total", export, op),
                "{op}: _count equals requests"
            );
            let sum = self.op(&format!("{name}_sum"), export, op);
            assert_eq!(count > 0.0, sum > 0.0, "{op}: sum {sum} for count {count}");
        }
    }
}

fn get_raw(stream: &mut (impl Read + Write), target: &str) -> Vec<u8> {
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: vbd\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).unwrap();
    out
}

/// Scrapes over `--metrics`, waiting for the listener: vbd opens it after
/// the NBD sockets, which is all `Vbd::start` waits for.
fn scrape_tcp(addr: &str) -> Scrape {
    let start = Instant::now();
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > Duration::from_secs(30) => panic!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    Scrape::parse(&get_raw(&mut s, "/metrics"))
}

/// The control socket, once it answers (vbd opens it after the NBD sockets).
fn control(vbd: &Vbd) -> PathBuf {
    let path = vbd.path("control.sock");
    wait_until("the control socket", Duration::from_secs(30), || {
        UnixStream::connect(&path).is_ok()
    });
    path
}

pub(crate) fn scrape_unix(vbd: &Vbd) -> Scrape {
    let mut s = UnixStream::connect(control(vbd)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    Scrape::parse(&get_raw(&mut s, "/metrics"))
}

pub(crate) fn status_json(vbd: &Vbd) -> Value {
    let c = control(vbd);
    let out = vbd_cmd(&["status", "--json", "--control", c.to_str().unwrap()], &[]);
    assert!(out.status.success(), "vbd status --json: {}", out.stderr);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("vbd status --json printed bad JSON ({e}):\n{}", out.stdout))
}

pub(crate) fn status_text(vbd: &Vbd) -> String {
    let c = control(vbd);
    let out = vbd_cmd(&["status", "--control", c.to_str().unwrap()], &[]);
    assert!(out.status.success(), "vbd status: {}", out.stderr);
    out.stdout
}

pub(crate) fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn qemu_io_traffic_moves_counters_exactly_and_histograms_stay_consistent() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let vbd = Vbd::start(
        "metrics-traffic",
        &[
            "--export",
            "name=m0,backend=memory,size=64M",
            "--export",
            "name=ro,backend=memory,size=1M,read-only",
            "--metrics",
            &addr,
        ],
    );
    wait_until(
        "the start-up probe to close",
        Duration::from_secs(10),
        || scrape_tcp(&addr).get("vbd_nbd_connections_open") == 0.0,
    );
    let before = scrape_tcp(&addr);
    assert!(
        before.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        before.content_type
    );
    assert_eq!(
        before.get("vbd_export_size_bytes{export=\"m0\",backend=\"memory\",read_only=\"false\"}"),
        (64 * MIB) as f64
    );
    assert_eq!(
        before.get("vbd_export_size_bytes{export=\"ro\",backend=\"memory\",read_only=\"true\"}"),
        MIB as f64
    );

    let writes = [(0, MIB), (MIB, 64 << 10), (2 * MIB, 4096)];
    let reads = [(0, 512 << 10), (2 * MIB, 4096)];
    let mut cmds: Vec<String> = writes
        .iter()
        .map(|(off, len)| format!("write -P 0x5a {off} {len}"))
        .collect();
    cmds.extend(
        reads
            .iter()
            .map(|(off, len)| format!("read -P 0x5a {off} {len}")),
    );
    qemu_io(&[], &cmds, &vbd.uri("m0"));

    let after = scrape_tcp(&addr);
    let delta = |family: &str, op: &str| after.op(family, "m0", op) - before.op(family, "m0", op);
    assert_eq!(delta("vbd_nbd_requests_total", "write"), 3.0);
    assert_eq!(
        delta("vbd_nbd_request_bytes_total", "write"),
        writes.iter().map(|w| w.1).sum::<u64>() as f64
    );
    assert_eq!(delta("vbd_nbd_requests_total", "read"), 2.0);
    assert_eq!(
        delta("vbd_nbd_request_bytes_total", "read"),
        reads.iter().map(|r| r.1).sum::<u64>() as f64
    );
    for op in ["read", "write", "flush"] {
        assert_eq!(delta("vbd_nbd_request_errors_total", op), 0.0, "{op}");
    }
    assert_eq!(delta("vbd_nbd_requests_total", "trim"), 0.0);
    assert_eq!(
        after.get("vbd_nbd_connections_accepted_total")
            - before.get("vbd_nbd_connections_accepted_total"),
        1.0
    );
    after.check_histograms("m0");

    // Refused writes count as errors, by op, on the read-only export.
    require_python_nbd();
    let script = r#"
import errno, nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
for op in (lambda: h.pwrite(b"x" * 4096, 0), lambda: h.trim(4096, 0)):
    try:
        op()
        raise SystemExit("a change to a read-only export succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
h.pread(8192, 0)
h.shutdown()
"#;
    run(Command::new(SYSTEM_PYTHON)
        .arg("-c")
        .arg(script)
        .arg(vbd.uri("ro")));
    let ro = scrape_tcp(&addr);
    assert_eq!(ro.op("vbd_nbd_request_errors_total", "ro", "write"), 1.0);
    assert_eq!(ro.op("vbd_nbd_request_errors_total", "ro", "trim"), 1.0);
    assert_eq!(ro.op("vbd_nbd_requests_total", "ro", "write"), 1.0);
    assert_eq!(ro.op("vbd_nbd_request_bytes_total", "ro", "write"), 0.0);
    assert_eq!(ro.op("vbd_nbd_request_bytes_total", "ro", "read"), 8192.0);
    ro.check_histograms("ro");

    // A client that sends unknown handshake flags is a handshake failure.
    let mut raw = UnixStream::connect(vbd.socket()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    raw.write_all(&(1u32 | 1 << 31).to_be_bytes()).unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    wait_until("handshake failure counted", Duration::from_secs(10), || {
        scrape_tcp(&addr).get("vbd_nbd_handshake_failures_total") == 1.0
    });

    // The control socket serves the same counters.
    let unix = scrape_unix(&vbd);
    assert!(unix.content_type.starts_with("text/plain; version=0.0.4"));
    for family in ["vbd_nbd_requests_total", "vbd_nbd_request_bytes_total"] {
        for op in ["read", "write"] {
            assert_eq!(unix.op(family, "m0", op), after.op(family, "m0", op));
        }
    }
    unix.check_histograms("m0");

    // Anything but GET /metrics is refused on the TCP listener.
    let mut s = TcpStream::connect(&addr).unwrap();
    let reply = String::from_utf8(get_raw(&mut s, "/v1/status")).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
}

#[test]
fn connection_limit_refusals_are_counted() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let vbd = Vbd::start(
        "metrics-limit",
        &[
            "--export",
            "name=m0,backend=memory,size=1M",
            "--max-connections",
            "1",
            "--metrics",
            &addr,
        ],
    );
    // Start-up's readiness probe has closed, but wait until it is uncounted.
    wait_until("no connection open", Duration::from_secs(10), || {
        scrape_tcp(&addr).get("vbd_nbd_connections_open") == 0.0
    });
    let mut held = UnixStream::connect(vbd.socket()).unwrap();
    let mut greeting = [0u8; 18];
    held.read_exact(&mut greeting).unwrap();
    let mut second = UnixStream::connect(vbd.socket()).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = second.read_to_end(&mut buf);
    assert!(buf.is_empty(), "the refused client got {buf:02x?}");
    let m = scrape_tcp(&addr);
    assert_eq!(m.get("vbd_nbd_connections_refused_total"), 1.0);
    assert_eq!(m.get("vbd_nbd_connections_open"), 1.0);
    assert_eq!(m.get("vbd_nbd_connections_limit"), 1.0);
    drop(held);
}

/// A libnbd client that attaches, reads 8 KiB, says so, and stays
/// connected until its stdin closes.
const HOLDER: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(8192, 0)
print("attached", flush=True)
sys.stdin.read()
h.shutdown()
"#;

fn hold_connection(uri: &str) -> (Child, ChildStdin) {
    require_python_nbd();
    let mut child = Command::new(SYSTEM_PYTHON)
        .arg("-c")
        .arg(HOLDER)
        .arg(uri)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "attached");
    (child, stdin)
}

#[test]
fn status_lists_exports_and_a_live_connection_and_json_logs_carry_fields() {
    let vbd = Vbd::start(
        "metrics-status",
        &[
            "--export",
            "name=disk0,backend=memory,size=16M",
            "--log-format",
            "json",
        ],
    );
    let (mut client, stdin) = hold_connection(&vbd.uri("disk0"));

    let s = status_json(&vbd);
    let exports = s["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 1, "{s}");
    let e = &exports[0];
    assert_eq!(e["name"], "disk0");
    assert_eq!(e["backend"], "memory");
    assert_eq!(e["size"], 16 * MIB);
    assert_eq!(e["read_only"], false);
    assert_eq!(e["connections"], 1, "{s}");
    assert_eq!(s["connections_open"], 1, "{s}");
    let conns = s["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{s}");
    let c = &conns[0];
    assert_eq!(c["export"], "disk0");
    assert_eq!(c["bytes_read"], 8192, "{s}");
    assert!(c["requests"].as_u64().unwrap() >= 1, "{s}");
    let peer = c["peer"].as_str().unwrap().to_owned();
    assert!(s["vms"].as_array().unwrap().is_empty());

    let text = status_text(&vbd);
    assert!(text.contains("1 connection open"), "{text}");
    assert!(
        text.contains("disk0") && text.contains("16.0 MiB"),
        "{text}"
    );
    assert!(text.contains(&peer), "{text}");
    assert!(text.contains("8.0 KiB"), "{text}");

    drop(stdin);
    assert!(client.wait().unwrap().success());
    wait_until("the connection to go", Duration::from_secs(10), || {
        status_json(&vbd)["connections"]
            .as_array()
            .is_some_and(|c| c.is_empty())
    });
    assert_eq!(status_json(&vbd)["exports"][0]["connections"], 0);

    // Every log line is a JSON object; attach and close carry their fields.
    wait_until("the close to be logged", Duration::from_secs(10), || {
        vbd.log().contains("connection closed")
    });
    let lines: Vec<Value> = vbd
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}")))
        .collect();
    let find = |msg: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == msg && l["fields"]["export"] == "disk0")
            .unwrap_or_else(|| panic!("no {msg:?} line for disk0 in:\n{}", vbd.log()))
    };
    assert_eq!(find("client attached")["fields"]["peer"], peer.as_str());
    let closed = &find("connection closed")["fields"];
    assert_eq!(closed["peer"], peer.as_str());
    assert_eq!(closed["bytes_read"], 8192);
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn vm_cmd(control: &Path, args: &[&str]) -> common::Output {
    let mut all = vec!["vm"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--control", control.to_str().unwrap()]);
    vbd_cmd(&all, &[])
}

fn vm_ok(control: &Path, args: &[&str]) -> String {
    let out = vm_cmd(control, args);
    assert!(out.status.success(), "vbd vm {args:?}: {}", out.stderr);
    out.stdout
}

/// QEMU without a guest (it sits in the firmware): enough for starts,
/// hot-plug, SIGTERM stops and crashes.
#[test]
fn qemu_lifecycle_shows_in_vm_metrics_and_status() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let vbd = Vbd::start(
        "metrics-vm",
        &["--export", "name=m0,backend=memory,size=1M"],
    );
    let c = control(&vbd);
    for v in ["va", "vb", "vc"] {
        vm_ok(&c, &["volume", "create", v, "--size", "16M"]);
    }
    let vm = |name: &str, volume: &str| {
        vec![
            "run".to_owned(),
            name.to_owned(),
            "--volume".into(),
            volume.into(),
            "--accel".into(),
            "tcg".into(),
            "--vcpus".into(),
            "1".into(),
            "--memory".into(),
            "64M".into(),
            "--hotplug-ports".into(),
            "1".into(),
        ]
    };

    let bad = vm_cmd(&c, &args(&vm("bad", "nope")));
    assert!(!bad.status.success(), "a VM on a missing volume started");
    // "one" is on NBD, so its connection shows; "two" below on
    // vhost-user, the default, so its device's frontend does.
    let mut one = vm("one", "va");
    one.extend(["--disk-transport".into(), "nbd".into()]);
    vm_ok(&c, &args(&one));
    vm_ok(&c, &["attach", "one", "vb"]);
    let full = vm_cmd(&c, &["attach", "one", "vc"]);
    assert!(!full.status.success(), "a second hot-plug on one port");
    let cold = vm_cmd(&c, &["detach", "one", "va"]);
    assert!(!cold.status.success(), "detached a disk attached at launch");

    let m = scrape_unix(&vbd);
    assert_eq!(m.get("vbd_vm_starts_total"), 1.0);
    assert_eq!(m.get("vbd_vm_start_failures_total"), 1.0);
    assert_eq!(m.get("vbd_vms{state=\"running\"}"), 1.0);
    assert_eq!(
        m.get("vbd_vm_hotplug_total{op=\"attach\",result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        m.get("vbd_vm_hotplug_total{op=\"attach\",result=\"error\"}"),
        1.0
    );
    assert_eq!(
        m.get("vbd_vm_hotplug_total{op=\"detach\",result=\"error\"}"),
        1.0
    );
    // QEMU's own NBD connections show per export.
    assert!(m.get("vbd_export_connections{export=\"va\"}") >= 1.0);
    let s = status_json(&vbd);
    let vms = s["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{s}");
    assert_eq!(vms[0]["name"], "one");
    assert_eq!(vms[0]["state"], "running");
    let pid = vms[0]["pid"].as_u64().unwrap();
    assert!(
        s["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["export"] == "va"),
        "{s}"
    );
    let text = status_text(&vbd);
    let line = text
        .lines()
        .find(|l| l.starts_with("one "))
        .unwrap_or_else(|| panic!("no VM line in:\n{text}"));
    assert!(
        line.contains("running") && line.contains(&pid.to_string()),
        "{line}"
    );
    assert!(line.contains("va:boot") && line.contains("vb@"), "{line}");

    // No guest answers the power button: SIGTERM ends it.
    let out = vm_ok(&c, &["stop", "one", "--grace", "0.3"]);
    assert!(out.contains("sigterm"), "{out}");
    let m = scrape_unix(&vbd);
    assert_eq!(m.get("vbd_vm_stops_total{outcome=\"sigterm\"}"), 1.0);
    assert_eq!(m.get("vbd_vms{state=\"running\"}"), 0.0);

    // A QEMU killed behind vbd's back is a crash.
    vm_ok(&c, &args(&vm("two", "va")));
    wait_until("QEMU on va's device", Duration::from_secs(20), || {
        scrape_unix(&vbd).get("vbd_vhost_frontend_attached{export=\"va\"}") == 1.0
    });
    let pid = status_json(&vbd)["vms"][0]["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the QEMU this test started through vbd.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_until("the crash to be counted", Duration::from_secs(20), || {
        scrape_unix(&vbd).get("vbd_vm_crashes_total") == 1.0
    });
    let m = scrape_unix(&vbd);
    assert_eq!(m.get("vbd_vms{state=\"crashed\"}"), 1.0);
    assert_eq!(m.get("vbd_vm_starts_total"), 2.0);
    // The crash cleaned up the device vbd started for the VM.
    assert!(!m.text.contains("export=\"va\""), "{}", m.text);
    vm_ok(&c, &["stop", "two"]);
    assert_eq!(scrape_unix(&vbd).get("vbd_vms{state=\"crashed\"}"), 0.0);
}

#[test]
fn object_volume_reports_wal_backlog_uploads_and_cache_hits() {
    let dir = common::TempDir::new("metrics-obj");
    let store = format!("file://{}", dir.join("store").display());
    let wal = dir.join("wal").display().to_string();
    let spec = format!("name=o0,backend=object,store={store},volume=o0,size=64M");
    let vbd = Vbd::start("metrics-obj-srv", &["--wal-dir", &wal, "--export", &spec]);
    let key = |family: &str| format!("{family}{{volume=\"o0\"}}");
    let m = scrape_unix(&vbd);
    assert_eq!(m.get(&key("vbd_upload_chunks_total")), 0.0);
    assert_eq!(m.get(&key("vbd_cache_budget_bytes")), (128 * MIB) as f64);

    qemu_io(&[], &[format!("write -P 0x3c 0 {MIB}")], &vbd.uri("o0"));
    // The idle segment is sealed and uploaded within seconds; until then
    // its bytes and its record are the backlog.
    let uploaded = Instant::now();
    loop {
        let m = scrape_unix(&vbd);
        let backlog = m.get(&key("vbd_wal_backlog_bytes"));
        let records = m.get(&key("vbd_wal_backlog_records"));
        if m.get(&key("vbd_upload_chunks_total")) >= 1.0 && backlog == 0.0 {
            assert_eq!(records, 0.0);
            assert_eq!(m.get(&key("vbd_upload_queue_segments")), 0.0);
            assert_eq!(m.get(&key("vbd_upload_bytes_total")), MIB as f64);
            assert_eq!(m.get(&key("vbd_upload_failures_total")), 0.0);
            break;
        }
        assert!(backlog > MIB as f64 || backlog == 0.0, "backlog {backlog}");
        assert!(records <= 1.0, "one write is one record: {records}");
        assert!(
            uploaded.elapsed() < Duration::from_secs(60),
            "not uploaded in a minute:\n{}",
            m.text
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Uploaded blocks go into the cache, so reading them back hits for
    // every 4 KiB block and fetches nothing.
    let before = scrape_unix(&vbd);
    qemu_io(&["-r"], &[format!("read -P 0x3c 0 {MIB}")], &vbd.uri("o0"));
    let after = scrape_unix(&vbd);
    let delta = |f: &str| after.get(&key(f)) - before.get(&key(f));
    assert_eq!(delta("vbd_cache_hits_total"), (MIB / 4096) as f64);
    assert_eq!(delta("vbd_cache_misses_total"), 0.0);
    assert_eq!(delta("vbd_store_fetches_total"), 0.0);
    assert_eq!(
        after.op("vbd_nbd_request_bytes_total", "o0", "read"),
        MIB as f64
    );
    let s = status_json(&vbd);
    assert_eq!(s["exports"][0]["backend"], "object");
}
