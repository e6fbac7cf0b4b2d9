//! The Linux kernel's NBD client against the real `vbd` binary: a TCG guest
//! (tools/build-guest.sh --nbd-client) reaches vbd's TCP listener over
//! QEMU's user network, attaches an export with the real `nbd-client` and
//! `nbd.ko`, writes patterns with `dd` (O_DIRECT, and through the page
//! cache with fsync, which on a device with a write-back cache makes the
//! kernel send FLUSH), discards a MiB (TRIM), reads everything back,
//! reconnects and reads it again. The host then reads the whole export over
//! NBD, and the backing file, byte for byte. This client is an
//! implementation of its own: nbd-client negotiates in user space and hands
//! the socket to nbd.ko over netlink, and the kernel speaks the
//! transmission phase with simple replies only.
//!
//! A second case attaches a read-only export: reads return the host's
//! data, writes fail in the guest, and the file is unchanged.

use crate::common;
use crate::vm_common;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{MIB, TempDir, Vbd, assert_bytes_eq, free_port, pattern, require, run, wait_deadline};
use vm_common::{guest_pattern, tag, test_guest};

/// How long the guest may take from boot to VBD-NBD-DONE; it needs about
/// half a minute on an idle 2-core machine under TCG. Only a hang guard.
const GUEST_DEADLINE: Duration = Duration::from_secs(240);

/// The size of the read-write export (the guest is told it and checks it).
const DISK_SIZE: u64 = 64 * MIB;

/// The regions the guest writes (its `nbd_regions`), and the MiB it then
/// discards (`nbd_discard_at`, `nbd_discard_len`).
fn regions(size: u64) -> [(u64, usize); 5] {
    [
        (0, 4096),
        (MIB + 512, 4096),
        (8 * MIB, MIB as usize),
        (16 * MIB, 2 * MIB as usize),
        (size - 4096, 4096),
    ]
}
const DISCARD: (u64, usize) = (16 * MIB + 512 * 1024, MIB as usize);

/// A QEMU running the guest, killed when dropped.
struct Guest {
    child: Child,
    serial: PathBuf,
    dir: TempDir,
}

impl Guest {
    /// Boots the nbd-client guest with `vbd.mode=nbd-client` and `args`
    /// on its command line, reaching the host's 127.0.0.1:`port` as
    /// 10.0.2.2:`port`. The guest configures only 10.0.2.15/24 and no
    /// default route, so it can reach nothing but QEMU's virtual network.
    fn boot(port: u16, args: &str) -> Guest {
        require("qemu-system-x86_64", "qemu-system-x86");
        let (kernel, initrd) = test_guest(&["--nbd-client"], "initrd-nbd.img");
        let dir = TempDir::new("knbd-qemu");
        let serial = dir.join("serial.log");
        let append = format!(
            "console=ttyS0 quiet panic=-1 vbd.mode=nbd-client vbd.nbd_host=10.0.2.2 \
             vbd.nbd_port={port} {args}"
        );
        let child = Command::new("qemu-system-x86_64")
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args([
                "-machine",
                "q35",
                "-accel",
                "tcg,thread=multi",
                "-cpu",
                "max",
            ])
            .args(["-smp", "2", "-m", "256M", "-no-reboot"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-netdev", "user,id=n0"])
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).unwrap())
            .spawn()
            .expect("start qemu-system-x86_64");
        Guest { child, serial, dir }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits for VBD-NBD-DONE, then for the guest to power off; returns the
    /// serial log. Fails on any VBD-ERROR, on QEMU exiting early, or after
    /// [`GUEST_DEADLINE`].
    fn finish(&mut self, vbd: &Vbd) -> String {
        let start = Instant::now();
        loop {
            let text = self.serial();
            assert!(
                !text.contains("VBD-ERROR"),
                "the guest reported an error:\n{text}\n--- vbd log ---\n{}",
                vbd.log()
            );
            if text.contains("VBD-NBD-DONE") {
                break;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "QEMU exited ({st}) before the guest finished; serial log:\n{text}\n\
                     --- QEMU's stderr ---\n{}\n--- vbd log ---\n{}",
                    std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default(),
                    vbd.log()
                );
            }
            assert!(
                start.elapsed() < GUEST_DEADLINE,
                "the guest did not finish within {GUEST_DEADLINE:?}; serial log:\n{text}\n--- vbd log ---\n{}",
                vbd.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let st = self.wait_exit(Duration::from_secs(60));
        let text = self.serial();
        assert!(st.success(), "QEMU exited with {st}:\n{text}");
        eprintln!(
            "guest finished in {:?}; serial log:\n{text}",
            start.elapsed()
        );
        text
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        wait_deadline(&mut self.child, limit).unwrap_or_else(|| {
            panic!(
                "the guest did not power off within {limit:?}:\n{}",
                self.serial()
            )
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=` among a line's words, without quotes.
fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .map(|v| v.trim_matches('"'))
}

/// The value of `key=` on the serial line that starts with `marker`.
fn field<'a>(serial: &'a str, marker: &str, key: &str) -> &'a str {
    let line = serial
        .lines()
        .find(|l| l.starts_with(marker))
        .unwrap_or_else(|| panic!("no {marker} line in:\n{serial}"));
    value(line, key).unwrap_or_else(|| panic!("no {key}= on {line:?}"))
}

/// One client of an export, as vbd logged it: the reply mode it attached
/// with and the counters it logged when the connection closed.
struct Client {
    peer: String,
    mode: String,
    closed: Option<String>,
}

impl Client {
    fn count(&self, key: &str) -> u64 {
        let line = self
            .closed
            .as_deref()
            .unwrap_or_else(|| panic!("{} never closed", self.peer));
        value(line, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= on {line:?}"))
    }
}

/// The clients of `export`, in the order they attached.
fn clients(log: &str, export: &str) -> Vec<Client> {
    let mut out: Vec<Client> = Vec::new();
    for line in log.lines() {
        let peer = value(line, "peer").unwrap_or_default();
        if line.contains("client attached") && value(line, "export") == Some(export) {
            out.push(Client {
                peer: peer.to_owned(),
                mode: value(line, "mode").unwrap_or_default().to_owned(),
                closed: None,
            });
        } else if line.contains("connection closed")
            && let Some(c) = out.iter_mut().find(|c| c.peer == peer)
        {
            c.closed = Some(line.to_owned());
        }
    }
    out
}

/// A vbd serving `export` on 127.0.0.1:`port` (and its Unix socket), with
/// debug logging so that the client's NBD_CMD_DISC shows.
fn serve(dir: TempDir, port: u16, export: &str) -> Vbd {
    let tcp = format!("127.0.0.1:{port}");
    Vbd::start_with(
        dir,
        &["--tcp", &tcp, "--export", export],
        &[("RUST_LOG", "debug")],
    )
}

/// vbd's log has no warning or error, nor a refused or failed request.
fn assert_clean_log(log: &str) {
    for bad in [" WARN ", " ERROR ", "request refused", "request failed"] {
        assert!(!log.contains(bad), "vbd logged {bad:?}:\n{log}");
    }
}

#[test]
fn kernel_client_writes_discards_and_reads_back_through_vbd() {
    let _one = vm_common::one_guest();
    require("qemu-img", "qemu-utils");
    let dir = TempDir::new("knbd-rw");
    // A disk full of the host's bytes, so that what the guest did not touch
    // (the sectors around its unaligned write included) can be checked too.
    let mut model = pattern(0x6b6e_6264, DISK_SIZE as usize);
    std::fs::write(dir.join("disk.img"), &model).unwrap();
    let port = free_port();
    let mut vbd = serve(dir, port, "name=disk,backend=file,path=disk.img");

    let t = tag("KNBD");
    let mut guest = Guest::boot(
        port,
        &format!("vbd.nbd_export=disk vbd.nbd_size={DISK_SIZE} vbd.pattern={t}"),
    );
    let serial = guest.finish(&vbd);
    for m in [
        "VBD-NBD-NET 10.0.2.15/24",
        "VBD-NBD-WROTE",
        "VBD-NBD-DISCARDED",
        "VBD-NBD-READBACK",
        "VBD-NBD-DISCONNECTED",
        "VBD-NBD-RECONNECT-READBACK",
        "VBD-NBD-OK",
    ] {
        assert!(serial.contains(m), "no {m} in the serial log:\n{serial}");
    }
    // What the kernel made of vbd's handshake: the size, writable, a
    // write-back cache (NBD_FLAG_SEND_FLUSH: fsync sends FLUSH) and discard
    // (NBD_FLAG_SEND_TRIM).
    let c = "VBD-NBD-CONNECTED";
    assert_eq!(field(&serial, c, "size"), DISK_SIZE.to_string());
    assert_eq!(field(&serial, c, "ro"), "0");
    assert_eq!(field(&serial, c, "write_cache"), "write_back", "{serial}");
    assert_ne!(field(&serial, c, "discard_max"), "0", "{serial}");

    for (off, len) in regions(DISK_SIZE) {
        let off = off as usize;
        model[off..off + len].copy_from_slice(&guest_pattern(&format!("{t}-{off}"), len));
    }
    let (at, len) = (DISCARD.0 as usize, DISCARD.1);
    model[at..at + len].fill(0);

    // Over NBD from the host, while vbd still serves.
    vbd.assert_running();
    let copy = vbd.path("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://127.0.0.1:{port}/disk"))
        .arg(&copy));
    assert_bytes_eq(
        &std::fs::read(&copy).unwrap(),
        &model,
        "the export read back over NBD",
    );

    let log = vbd.log();
    assert_clean_log(&log);
    // The kernel's two connections (connect, reconnect) used simple
    // replies, had no failed request and ended with NBD_CMD_DISC (from
    // `nbd-client -d`), as did qemu-img's after them.
    let all = clients(&log, "disk");
    let kernel: Vec<&Client> = all.iter().filter(|c| c.mode == "Simple").collect();
    assert_eq!(kernel.len(), 2, "the guest connects twice:\n{log}");
    assert_eq!(all.len(), 3, "the guest's two and qemu-img's:\n{log}");
    for c in &all {
        assert_eq!(c.count("errors"), 0, "{:?}", c.closed);
    }
    assert_eq!(
        log.matches("client sent NBD_CMD_DISC").count(),
        3,
        "every client ends with NBD_CMD_DISC:\n{log}"
    );
    // The first connection wrote at least the guest's regions (a page more
    // for the unaligned one); the second one only read.
    let written: usize = regions(DISK_SIZE).iter().map(|r| r.1).sum();
    assert!(kernel[0].count("bytes_written") >= written as u64, "{log}");
    assert_eq!(kernel[1].count("bytes_written"), 0, "{log}");
    assert!(kernel[1].count("bytes_read") >= written as u64, "{log}");
    let img = vbd.path("disk.img");
    vbd.stop();
    assert_bytes_eq(&std::fs::read(img).unwrap(), &model, "disk.img");
}

#[test]
fn kernel_client_reads_a_read_only_export_and_cannot_write_it() {
    let _one = vm_common::one_guest();
    let dir = TempDir::new("knbd-ro");
    let t = tag("KNBDRO");
    // The guest expects its own pattern for `t` in the first 64 KiB.
    let mut content = guest_pattern(&t, 64 * 1024);
    content.extend(pattern(0x726f, (16 * MIB) as usize - content.len()));
    let img = dir.join("ro.img");
    std::fs::write(&img, &content).unwrap();
    let port = free_port();
    let mut vbd = serve(dir, port, "name=ro,backend=file,path=ro.img,read-only");

    let mut guest = Guest::boot(
        port,
        &format!("vbd.nbd_ro_export=ro vbd.nbd_ro_pattern={t}"),
    );
    let serial = guest.finish(&vbd);
    for m in ["VBD-NBD-RO-READ", "VBD-NBD-RO-WRITE-FAILED", "VBD-NBD-OK"] {
        assert!(serial.contains(m), "no {m} in the serial log:\n{serial}");
    }
    // nbd-client saw NBD_FLAG_READ_ONLY and made the device read-only, so
    // the kernel fails the write (EPERM; an I/O error would also do).
    assert_eq!(field(&serial, "VBD-NBD-RO-CONNECTED", "ro"), "1");
    let failed = serial
        .lines()
        .find(|l| l.starts_with("VBD-NBD-RO-WRITE-FAILED"))
        .unwrap_or_default();
    assert!(
        ["not permitted", "I/O error", "Read-only"]
            .iter()
            .any(|e| failed.contains(e)),
        "{failed}"
    );

    vbd.assert_running();
    let log = vbd.log();
    assert_clean_log(&log);
    // The write failed in the guest's kernel (EPERM on a read-only block
    // device): no write reached vbd, so nothing was refused there either.
    let all = clients(&log, "ro");
    assert_eq!(all.len(), 1, "{log}");
    assert_eq!(all[0].mode, "Simple", "{log}");
    assert_eq!(all[0].count("errors"), 0, "{log}");
    assert_eq!(all[0].count("bytes_written"), 0, "{log}");
    assert!(all[0].count("bytes_read") >= 64 * 1024, "{log}");
    vbd.stop();
    assert_bytes_eq(&std::fs::read(&img).unwrap(), &content, "ro.img");
}
