//! TLS (NBD STARTTLS) against real peers: a CA, server and client
//! certificates made with openssl at test time; libnbd (nbdinfo, nbdcopy)
//! and QEMU (qemu-io, qemu-img) as TLS clients; hand-written NBD for what
//! they never send. Every test checks data or the exact refusal, then that
//! the server is still up.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use vbd::nbd::client::{self, go_data};
use vbd::nbd::wire::*;

const SIZE: u64 = 64 * MIB;

/// A throwaway PKI: a CA, a server certificate for localhost and
/// 127.0.0.1, and client credential directories in the layout libnbd and
/// QEMU read (ca-cert.pem, client-cert.pem, client-key.pem).
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new(tag: &str) -> Self {
        require("openssl", "openssl");
        let pki = Pki {
            dir: TempDir::new(tag),
        };
        pki.ca("ca", "vbd test CA");
        pki.leaf("server", "localhost", "ca", "serverAuth", true);
        pki.leaf("client", "vbd-test-client", "ca", "clientAuth", false);
        pki.ca("other-ca", "another CA");
        pki.leaf("intruder", "intruder", "other-ca", "clientAuth", false);
        // Every client trusts the real CA to check the server.
        for (name, cert) in [
            ("with-cert", Some("client")),
            ("no-cert", None),
            ("other-cert", Some("intruder")),
        ] {
            let d = pki.path(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(pki.path("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
            if let Some(c) = cert {
                std::fs::copy(
                    pki.path(&format!("{c}-cert.pem")),
                    d.join("client-cert.pem"),
                )
                .unwrap();
                std::fs::copy(pki.path(&format!("{c}-key.pem")), d.join("client-key.pem")).unwrap();
            }
        }
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        run(Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path()));
    }

    /// `openssl req` making a new P-256 key `name-key.pem`, then `rest`.
    fn req(&self, name: &str, cn: &str, rest: &[&str]) {
        let key = format!("{name}-key.pem");
        let subj = format!("/CN={cn}");
        let mut args = vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            &subj,
        ];
        args.extend_from_slice(rest);
        self.openssl(&args);
    }

    fn ca(&self, name: &str, cn: &str) {
        self.req(
            name,
            cn,
            &[
                "-x509",
                "-out",
                &format!("{name}-cert.pem"),
                "-days",
                "2",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }

    fn leaf(&self, name: &str, cn: &str, ca: &str, usage: &str, san: bool) {
        self.req(name, cn, &["-new", "-out", &format!("{name}.csr")]);
        let mut ext = format!("basicConstraints=critical,CA:FALSE\nextendedKeyUsage={usage}\n");
        if san {
            ext.push_str("subjectAltName=DNS:localhost,IP:127.0.0.1\n");
        }
        std::fs::write(self.path(&format!("{name}.ext")), ext).unwrap();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}-cert.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

/// vbd serving a 64 MiB memory export `disk` on a Unix socket and on TCP
/// with `--tls=MODE`, checking client certificates when `client_ca`.
fn serve(tag: &str, pki: &Pki, mode: &str, client_ca: bool) -> (Vbd, u16) {
    serve_with(tag, pki, mode, client_ca, &[])
}

fn serve_with(tag: &str, pki: &Pki, mode: &str, client_ca: bool, extra: &[&str]) -> (Vbd, u16) {
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let (cert, key, ca) = (
        pki.s("server-cert.pem"),
        pki.s("server-key.pem"),
        pki.s("ca-cert.pem"),
    );
    let mut args = vec![
        "--tcp",
        &tcp,
        "--tls",
        mode,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--export",
        "name=disk,backend=memory,size=64M",
    ];
    if client_ca {
        args.extend(["--tls-ca", &ca]);
    }
    args.extend_from_slice(extra);
    (Vbd::start(tag, &args), port)
}

fn nbds(port: u16, certs: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
        certs.display()
    )
}

fn nbdinfo(uri: &str) -> Command {
    require("nbdinfo", "libnbd-bin");
    let mut c = Command::new("nbdinfo");
    c.arg(uri);
    c
}

/// qemu-io on `disk` over TCP with TLS credentials from `certs`.
fn qemu_io_tls(port: u16, certs: &Path, commands: &[String]) -> Output {
    require("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            certs.display()
        ))
        .arg("--image-opts");
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(format!(
        "driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0"
    ));
    run_qemu_io(&mut cmd)
}

/// The pattern writes the tests make, and `read -P` checks of every byte
/// they touch plus untouched zeroes around them.
fn pattern_writes() -> (Vec<String>, Vec<String>) {
    let writes = vec![
        "write -P 0xa5 0 1M".to_string(),
        "write -P 0x5a 1048593 300000".to_string(),
        "write -P 0x3c 60M 4M".to_string(),
    ];
    let reads = vec![
        "read -P 0xa5 0 1M".to_string(),
        "read -P 0 1M 17".to_string(),
        "read -P 0x5a 1048593 300000".to_string(),
        "read -P 0 1348593 1000".to_string(),
        "read -P 0x3c 60M 4M".to_string(),
    ];
    (writes, reads)
}

fn count(out: &Output, word: &str) -> usize {
    out.stdout.matches(word).count()
}

#[test]
fn require_serves_tls_clients_and_refuses_plaintext() {
    let pki = Pki::new("tls-require");
    let (mut vbd, port) = serve("tls-require", &pki, "require", false);
    let certs = pki.path("with-cert");

    let info = run(&mut nbdinfo(&nbds(port, &certs)));
    assert!(
        info.stdout.contains("newstyle-fixed with TLS"),
        "{}",
        info.stdout
    );
    assert!(
        info.stdout.contains(&format!("export-size: {SIZE}")),
        "{}",
        info.stdout
    );

    // Write over TLS, read back over TLS on a new connection, and over the
    // plaintext Unix socket: the data is in the export, not just echoed.
    let (writes, reads) = pattern_writes();
    let out = qemu_io_tls(port, &certs, &writes);
    assert_eq!(count(&out, "wrote "), writes.len(), "{}", out.stdout);
    let out = qemu_io_tls(port, &certs, &reads);
    assert_eq!(count(&out, "read "), reads.len(), "{}", out.stdout);
    let out = qemu_io(&["-r"], &reads, &vbd.uri("disk"));
    assert_eq!(count(&out, "read "), reads.len(), "{}", out.stdout);

    // Plaintext TCP clients are refused with the spec's TLS_REQD.
    let out =
        run_failing(nbdinfo(&format!("nbd://127.0.0.1:{port}/disk")).env("LIBNBD_DEBUG", "1"));
    assert!(
        out.stderr.contains("this server requires TLS"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("export-size"), "{}", out.stdout);
    require("qemu-img", "qemu-utils");
    let out = run_failing(
        Command::new("qemu-img").args(["info", &format!("nbd://127.0.0.1:{port}/disk")]),
    );
    assert!(
        out.stderr.contains("TLS negotiation required"),
        "{}",
        out.stderr
    );

    vbd.assert_running();
    let log = vbd.log();
    assert!(log.contains("TLS established"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn client_certificates_are_required_with_tls_ca() {
    let pki = Pki::new("tls-ca");
    let (mut vbd, port) = serve("tls-ca", &pki, "require", true);

    let out = run(nbdinfo(&nbds(port, &pki.path("with-cert"))).arg("--size"));
    assert_eq!(out.stdout.trim(), SIZE.to_string());
    let out = run(Command::new("qemu-img").args([
        "info",
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            pki.s("with-cert")
        ),
        "--image-opts",
        &format!("driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0"),
    ]));
    assert!(
        out.stdout.contains("virtual size: 64 MiB"),
        "{}",
        out.stdout
    );

    // No certificate, or one another CA signed: the TLS handshake fails.
    for dir in ["no-cert", "other-cert"] {
        let out = run_failing(nbdinfo(&nbds(port, &pki.path(dir))).arg("--size"));
        assert!(out.stdout.is_empty(), "{dir}: {}", out.stdout);
        assert!(out.stderr.contains("TLS"), "{dir}: {}", out.stderr);
    }
    let log = vbd.log();
    assert!(
        log.matches("TLS failed").count() >= 2,
        "each refusal is logged:\n{log}"
    );
    assert!(log.contains("client_certificate=true"), "{log}");

    // The refusals hurt no one: a good client still reads and writes.
    let out = qemu_io_tls(
        port,
        &pki.path("with-cert"),
        &[
            "write -P 0x77 8M 64k".to_string(),
            "read -P 0x77 8M 64k".to_string(),
        ],
    );
    assert_eq!(count(&out, "read "), 1, "{}", out.stdout);
    vbd.assert_running();
}

#[test]
fn optional_tls_serves_plaintext_and_tls_clients_the_same_data() {
    require("nbdcopy", "libnbd-bin");
    let pki = Pki::new("tls-on");
    let (mut vbd, port) = serve("tls-on", &pki, "on", false);
    let certs = pki.path("no-cert");
    let plain = format!("nbd://127.0.0.1:{port}/disk");

    let out = run(&mut nbdinfo(&plain));
    assert!(
        out.stdout.contains("newstyle-fixed without TLS"),
        "{}",
        out.stdout
    );
    let out = run(&mut nbdinfo(&nbds(port, &certs)));
    assert!(
        out.stdout.contains("newstyle-fixed with TLS"),
        "{}",
        out.stdout
    );
    // TLS on the Unix socket too (offered there, never required).
    let unix_tls = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        vbd.socket().display(),
        certs.display()
    );
    let out = run(nbdinfo(&unix_tls).arg("--size"));
    assert_eq!(out.stdout.trim(), SIZE.to_string());

    // Plaintext writes, TLS reads.
    let (writes, reads) = pattern_writes();
    qemu_io(&[], &writes, &vbd.uri("disk"));
    let out = qemu_io_tls(port, &certs, &reads);
    assert_eq!(count(&out, "read "), reads.len(), "{}", out.stdout);
    // nbdcopy keeps many requests in flight over several connections: in
    // over TLS, out over plaintext, and the other way round.
    let src = vbd.path("src.img");
    write_pattern_file(&src, 0x715, 24 * MIB as usize);
    run(Command::new("nbdcopy").arg(&src).arg(nbds(port, &certs)));
    let back = vbd.path("back.img");
    run(Command::new("nbdcopy").arg(&plain).arg(&back));
    assert_bytes_eq(
        &read_at(&back, 0, 24 * MIB as usize),
        &std::fs::read(&src).unwrap(),
        "written over TLS, read in plaintext",
    );
    assert_bytes_eq(
        &read_at(&back, 24 * MIB, 1 << 20),
        &vec![0; 1 << 20],
        "beyond the copy",
    );
    let tls_back = vbd.path("tls-back.img");
    run(Command::new("nbdcopy")
        .arg(nbds(port, &certs))
        .arg(&tls_back));
    assert_bytes_eq(
        &read_at(&tls_back, 60 * MIB, 4 << 20),
        &vec![0x3c; 4 << 20],
        "written in plaintext, read over TLS",
    );
    vbd.assert_running();
}

/// A hand-written client on the TCP listener.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(port: u16, flags: u32) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to vbd");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        r.send(&flags.to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("sending to vbd");
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        self.send(&client::option(opt, data));
    }

    /// One option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).expect("option reply data");
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        (opt, typ, data)
    }

    /// The server hangs up: whatever it sends (a TLS alert) ends in EOF.
    fn assert_closed(mut self, what: &str) {
        let mut sink = Vec::new();
        match self.s.read_to_end(&mut sink) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{what}: expected the server to close, got {e}"),
        }
        assert!(sink.len() < 64, "{what}: {} bytes before close", sink.len());
    }
}

#[test]
fn hostile_clients_get_refusals_or_a_clean_disconnect() {
    let pki = Pki::new("tls-hostile");
    let (mut vbd, port) = serve_with(
        "tls-hostile",
        &pki,
        "require",
        false,
        &["--handshake-timeout", "2"],
    );
    let fixed = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let go = go_data("disk", &[]);

    // Before TLS every option but STARTTLS and ABORT is TLS_REQD...
    let mut c = Raw::connect(port, fixed);
    for (opt, data) in [
        (OPT_LIST, &[][..]),
        (OPT_INFO, &go[..]),
        (OPT_GO, &go[..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (0x4242, &b"unknown"[..]),
    ] {
        c.option(opt, data);
        let (o, typ, msg) = c.reply();
        assert_eq!((o, typ), (opt, REP_ERR_TLS_REQD), "option {opt}");
        assert!(String::from_utf8_lossy(&msg).contains("requires TLS"));
    }
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    c.assert_closed("after ABORT");

    // ...and EXPORT_NAME, which cannot carry an error, ends the session,
    // as does a client that cannot do TLS at all (no fixed newstyle).
    let mut c = Raw::connect(port, fixed);
    c.option(OPT_EXPORT_NAME, b"disk");
    c.assert_closed("EXPORT_NAME before STARTTLS");
    Raw::connect(port, 0).assert_closed("no fixed newstyle");

    // STARTTLS with data is invalid; then STARTTLS, and bytes that are not TLS.
    let mut c = Raw::connect(port, fixed);
    c.option(OPT_STARTTLS, b"x");
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply(), (OPT_STARTTLS, REP_ACK, vec![]));
    c.send(b"GET / HTTP/1.0\r\n\r\n not a ClientHello at all");
    c.assert_closed("garbage after STARTTLS");

    // Garbage sent along with STARTTLS, before its ACK could be read.
    let mut c = Raw::connect(port, fixed);
    let mut m = client::option(OPT_STARTTLS, &[]);
    m.extend_from_slice(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4]);
    c.send(&m);
    assert_eq!(c.reply(), (OPT_STARTTLS, REP_ACK, vec![]));
    c.assert_closed("pipelined garbage");

    // STARTTLS, then the client just leaves.
    let mut c = Raw::connect(port, fixed);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    drop(c);

    // STARTTLS, then silence: the handshake timeout covers TLS too.
    let mut c = Raw::connect(port, fixed);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    c.assert_closed("silent after STARTTLS");

    // Still serving, and each failure was logged as a disconnect.
    let out = run(nbdinfo(&nbds(port, &pki.path("with-cert"))).arg("--size"));
    assert_eq!(out.stdout.trim(), SIZE.to_string());
    vbd.assert_running();
    let log = vbd.log();
    assert!(log.matches("TLS failed").count() >= 2, "{log}");
    assert!(log.contains("before NBD_OPT_STARTTLS"), "{log}");
    assert!(log.contains("NBD_FLAG_C_FIXED_NEWSTYLE"), "{log}");
    assert!(log.contains("handshake not finished in time"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn stopping_with_tls_clients_attached_is_clean() {
    require_python_nbd();
    let pki = Pki::new("tls-stop");
    let (mut vbd, port) = serve("tls-stop", &pki, "require", true);
    // A libnbd client attached over TLS that writes, then idles.
    let script = r#"
import nbd, sys, time
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[2])
h.connect_uri(sys.argv[1])
h.pwrite(b"\x42" * 65536, 0)
h.flush()
print("attached", flush=True)
sys.stdin.read()
# vbd has stopped by now: the next request must fail, not hang.
try:
    h.pread(512, 0)
    print("still served", flush=True)
except nbd.Error as e:
    print("closed", flush=True)
"#;
    let uri = format!("nbds://127.0.0.1:{port}/disk");
    let mut child = Command::new(SYSTEM_PYTHON)
        .args(["-c", script, &uri, &pki.s("with-cert")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting python3");
    let stdin = child.stdin.take().expect("stdin");
    let mut said = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut said, &mut line).expect("reading the client's output");
    assert_eq!(line.trim(), "attached");
    let out = qemu_io(
        &["-r"],
        &["read -P 0x42 0 64k".to_string()],
        &vbd.uri("disk"),
    );
    assert!(out.stdout.contains("read 65536/65536"), "{}", out.stdout);
    // SIGTERM with the client still attached: vbd closes TLS and exits 0,
    // and the client sees its connection end.
    vbd.stop();
    drop(stdin);
    let mut rest = String::new();
    let reader = std::thread::spawn(move || {
        let _ = said.read_to_string(&mut rest);
        rest
    });
    let status = wait_deadline(&mut child, Duration::from_secs(30));
    let rest = reader.join().expect("reader thread");
    assert!(status.is_some(), "the TLS client hung after vbd stopped");
    assert_eq!(rest.trim(), "closed", "the client after vbd stopped");
}

#[test]
fn bad_tls_settings_are_explained() {
    let pki = Pki::new("tls-config");
    let sock = pki.s("vbd.sock");
    let fails = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--unix",
            &sock,
            "--export",
            "name=m,backend=memory,size=1M",
        ];
        args.extend_from_slice(extra);
        vbd_fails(&args)
    };
    let (cert, key, ca) = (
        pki.s("server-cert.pem"),
        pki.s("server-key.pem"),
        pki.s("ca-cert.pem"),
    );
    let e = fails(&["--tls", "require"]);
    assert!(e.contains("--tls-cert FILE and --tls-key FILE"), "{e}");
    let e = fails(&["--tls-cert", &cert, "--tls-key", &key]);
    assert!(e.contains("only with --tls=on or --tls=require"), "{e}");
    let missing = pki.s("missing.pem");
    let e = fails(&["--tls", "on", "--tls-cert", &missing, "--tls-key", &key]);
    assert!(
        e.contains(&format!("cannot read certificate {missing}")),
        "{e}"
    );
    let client_key = pki.s("client-key.pem");
    let e = fails(&["--tls", "on", "--tls-cert", &cert, "--tls-key", &client_key]);
    assert!(e.contains("does not belong to the certificate"), "{e}");
    assert!(e.contains(&client_key) && e.contains(&cert), "{e}");
    let e = fails(&["--tls", "on", "--tls-cert", &key, "--tls-key", &key]);
    assert!(e.contains("no CERTIFICATE block"), "{e}");
    let e = fails(&["--tls", "on", "--tls-cert", &cert, "--tls-key", &ca]);
    assert!(e.contains("no PRIVATE KEY block"), "{e}");
    let e = fails(&[
        "--tls",
        "on",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &key,
    ]);
    assert!(e.contains("CA file") && e.contains("no CERTIFICATE"), "{e}");
    assert!(!Path::new(&sock).exists(), "no socket is left behind");
}
