//! TLS server keys of every kind OpenSSL makes load and serve: RSA of 2048,
//! 2432 (which the ring provider refused), 3072 and 4096 bits, in PKCS#8
//! and PKCS#1; ECDSA on P-256, P-384 and P-521; Ed25519. Each key signs a
//! server certificate made with openssl at test time; libnbd's nbdcopy
//! (GnuTLS) writes a pattern over TLS and reads it back over a new TLS
//! connection and over the plaintext Unix socket. A key too small to be
//! safe is refused with a message that names the sizes that work.

use std::process::Command;

use crate::common::*;

const SIZE: usize = 4 << 20;

/// A CA (P-256) in `dir`, made once per test.
fn make_ca(dir: &TempDir) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-subj",
            "/CN=vbd key test CA",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    // libnbd reads the CA from ca-cert.pem in the directory it is given.
    let certs = dir.join("client");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(dir.join("ca-cert.pem"), certs.join("ca-cert.pem")).unwrap();
}

fn openssl(dir: &TempDir, args: &[&str]) {
    run(Command::new("openssl").args(args).current_dir(dir.path()));
}

/// A server key `NAME-key.pem` made by `openssl genpkey ARGS` (converted to
/// PKCS#1 when `pkcs1`), and `NAME-cert.pem` for localhost signed by the CA.
fn make_server_key(dir: &TempDir, name: &str, genpkey: &[&str], pkcs1: bool) {
    let key = format!("{name}-key.pem");
    let mut args = vec!["genpkey", "-out", &key];
    args.extend_from_slice(genpkey);
    openssl(dir, &args);
    if pkcs1 {
        openssl(dir, &["rsa", "-in", &key, "-out", &key, "-traditional"]);
        let pem = std::fs::read_to_string(dir.join(&key)).unwrap();
        assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{pem}");
    }
    let csr = format!("{name}.csr");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}-cert.pem"),
            "-extfile",
            "server.ext",
        ],
    );
}

/// Serves a memory export with key `name` (TLS required on TCP), then
/// copies a pattern in over TLS and back out over TLS and over the Unix
/// socket, checking every byte.
fn round_trip(dir: &TempDir, name: &str, seed: u64) {
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let cert = dir.join(&format!("{name}-cert.pem")).display().to_string();
    let key = dir.join(&format!("{name}-key.pem")).display().to_string();
    let vbd = Vbd::start(
        &format!("key-{name}"),
        &[
            "--tcp",
            &tcp,
            "--tls",
            "require",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--export",
            "name=disk,backend=memory,size=4M",
        ],
    );
    let uri = format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
        dir.join("client").display()
    );
    let input = dir.join(&format!("{name}.in"));
    let output = dir.join(&format!("{name}.out"));
    write_pattern_file(&input, seed, SIZE);
    run(Command::new("nbdcopy").arg(&input).arg(&uri));
    run(Command::new("nbdcopy").arg(&uri).arg(&output));
    assert_files_eq(&output, &input);
    let plain = dir.join(&format!("{name}.unix"));
    run(Command::new("nbdcopy").arg(vbd.uri("disk")).arg(&plain));
    assert_files_eq(&plain, &input);
    let log = vbd.log();
    assert!(log.contains("TLS established"), "{name}: {log}");
}

#[test]
fn rsa_keys_of_every_common_size_serve_tls() {
    require("openssl", "openssl");
    require("nbdcopy", "libnbd-bin");
    let dir = TempDir::new("tls-keys-rsa");
    make_ca(&dir);
    for (i, bits) in [2048, 2432, 3072, 4096].into_iter().enumerate() {
        let name = format!("rsa{bits}");
        let bits_opt = format!("rsa_keygen_bits:{bits}");
        make_server_key(
            &dir,
            &name,
            &["-algorithm", "RSA", "-pkeyopt", &bits_opt],
            false,
        );
        round_trip(&dir, &name, 0x2000 + i as u64);
    }
    // The same odd size in the older PKCS#1 encoding.
    make_server_key(
        &dir,
        "rsa2432-pkcs1",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2432"],
        true,
    );
    round_trip(&dir, "rsa2432-pkcs1", 0x2432);
}

#[test]
fn ec_and_ed25519_keys_serve_tls() {
    require("openssl", "openssl");
    require("nbdcopy", "libnbd-bin");
    let dir = TempDir::new("tls-keys-ec");
    make_ca(&dir);
    for (i, curve) in ["P-256", "P-384", "P-521"].into_iter().enumerate() {
        let name = format!("ec-{curve}");
        let curve_opt = format!("ec_paramgen_curve:{curve}");
        make_server_key(
            &dir,
            &name,
            &["-algorithm", "EC", "-pkeyopt", &curve_opt],
            false,
        );
        round_trip(&dir, &name, 0xec00 + i as u64);
    }
    make_server_key(&dir, "ed25519", &["-algorithm", "ED25519"], false);
    round_trip(&dir, "ed25519", 0xed25519);
}

#[test]
fn a_key_too_small_to_sign_is_refused_with_the_sizes_that_work() {
    require("openssl", "openssl");
    let dir = TempDir::new("tls-keys-small");
    make_ca(&dir);
    make_server_key(
        &dir,
        "rsa1024",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
        false,
    );
    let cert = dir.join("rsa1024-cert.pem").display().to_string();
    let key = dir.join("rsa1024-key.pem").display().to_string();
    let sock = dir.join("vbd.sock").display().to_string();
    let err = vbd_fails(&[
        "serve",
        "--unix",
        &sock,
        "--tls",
        "on",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--export",
        "name=disk,backend=memory,size=1M",
    ]);
    assert!(
        err.contains(&format!("private key {key} cannot sign TLS handshakes"))
            && err.contains("RSA of 2048 to 8192 bits"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line, each cause once: {err}");
}
