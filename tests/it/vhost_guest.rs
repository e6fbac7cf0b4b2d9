//! End to end under TCG: a QEMU 7.2 guest whose disk is a vbd memory
//! volume served over vhost-user-blk, its queues on a vbd server's cores.
//! The test drives the guest's shell on the serial console and checks
//! data both ways: what the host put in the volume reads back in the
//! guest, what the guest writes (copied from the disk itself, and from a
//! file) lands in the volume, a guest discard zeroes the range, and the
//! guest sees the size, the serial (GET_ID) and two queues, and a resize
//! of the device while it runs. Then the device is stopped and started
//! again on the same socket, and QEMU (`reconnect=1`) re-attaches with the
//! guest's I/O resuming.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vm_common::{TempDir, one_guest, test_guest, wait_for_path};
use vbd::server::{Registry, Server, ServerConfig};
use vbd::vhost::config::{DeviceConfig, ExportCaps};
use vbd::vhost::cores::CoreRunner;
use vbd::vhost::device::{SocketAccess, VhostUserDevice};
use vbd::volume::memory::MemoryVolume;
use vbd::volume::sync::SyncDriver;

const DISK: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

/// QEMU with the guest's serial console on its stdin/stdout.
struct Guest {
    child: Child,
    stdin: ChildStdin,
    console: Arc<Mutex<String>>,
}

impl Guest {
    fn boot(sock: &std::path::Path, queues: u16) -> Guest {
        let (kernel, initrd) = test_guest(&[], "initrd.img");
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35,accel=tcg,memory-backend=mem", "-m", "256M"])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-smp", &queues.to_string(), "-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-serial", "stdio"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args([
                "-append",
                "console=ttyS0 quiet panic=-1 vbd.mode=shell",
                "-chardev",
            ])
            .arg(format!("socket,id=c0,path={},reconnect=1", sock.display()))
            .args([
                "-device",
                &format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 must be installed");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let console = Arc::new(Mutex::new(String::new()));
        let sink = console.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut b) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&b[..n]).into_owned();
                sink.lock().unwrap().push_str(&text);
            }
        });
        Guest {
            child,
            stdin,
            console,
        }
    }

    /// Waits for `marker` on the console after byte `from`; returns the
    /// text from `from` to just past it.
    fn wait(&self, from: usize, marker: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.console.lock().unwrap().clone();
            if let Some(i) = text.get(from..).and_then(|t| t.find(marker)) {
                return text[from..from + i + marker.len()].to_string();
            }
            assert!(
                start.elapsed() < limit,
                "no {marker:?} within {limit:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a shell command that ends by printing `marker`; returns its
    /// output. The console echoes the command, so `marker` must be text
    /// only its output contains (e.g. `X=0-END` for `echo X=$?-END`).
    fn run(&mut self, cmd: &str, marker: &str) -> String {
        let from = self.console.lock().unwrap().len();
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.wait(from, marker, Duration::from_secs(120))
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8 | 1).collect()
}

#[test]
fn tcg_guest_reads_and_writes_a_vbd_volume_over_vhost_user() {
    let _guest = one_guest();
    let dir = TempDir::new("vhost-guest");
    let sock = dir.join("blk.sock");
    let volume = Arc::new(MemoryVolume::new(DISK, false));
    let mut io = SyncDriver::new().unwrap();
    let pat = pattern(64 << 10);
    io.write(&*volume, 0, &pat, false).unwrap();
    io.write(&*volume, 3 * MIB, b"host-pattern-ABC", false)
        .unwrap();

    // Two cores host the queues, as `vbd serve --threads 2` would.
    let server = Server::start(
        ServerConfig {
            unix: vec![dir.join("nbd.sock")],
            threads: 2,
            ..ServerConfig::default()
        },
        Arc::new(Registry::new()),
    )
    .unwrap();
    let start_device = || {
        let config = DeviceConfig::new(&ExportCaps::of(&*volume, 2)).unwrap();
        let runner = CoreRunner::new(volume.clone(), Arc::new(server.handle()));
        VhostUserDevice::start(&sock, SocketAccess::default(), "vbd-e2e", config, runner).unwrap()
    };
    let device = start_device();
    wait_for_path(&sock, Duration::from_secs(5));
    let mut g = Guest::boot(&sock, 2);
    g.wait(0, "VBD-BOOTED", Duration::from_secs(300));
    assert!(device.frontend_attached());

    // What the guest sees: 64 MiB in sectors, the export name, two queues.
    g.run(
        "echo VBD-SIZE=$(cat /sys/block/vda/size)-$(cat /sys/block/vda/serial)-$(ls /sys/block/vda/mq | wc -l)-END",
        &format!("VBD-SIZE={}-vbd-e2e-2-END", DISK / 512),
    );

    // A resize reaches the guest: QEMU hears CONFIG_CHANGE_MSG on the
    // backend channel, re-reads the capacity and interrupts the driver.
    assert!(device.set_capacity(DISK / 2).unwrap(), "QEMU was told");
    g.run(
        "sleep 1; echo VBD-RESIZED=$(cat /sys/block/vda/size)-END",
        &format!("VBD-RESIZED={}-END", DISK / 2 / 512),
    );
    assert!(device.set_capacity(DISK).unwrap());
    g.run(
        "sleep 1; echo VBD-REGROWN=$(cat /sys/block/vda/size)-END",
        &format!("VBD-REGROWN={}-END", DISK / 512),
    );

    // Host data read by the guest.
    let out = g.run(
        "dd if=/dev/vda bs=512 skip=6144 count=1 iflag=direct 2>/dev/null | head -c 16; echo; echo VBD-READ=$?-END",
        "VBD-READ=0-END",
    );
    assert!(out.contains("host-pattern-ABC"), "{out}");

    // The guest copies 64 KiB from 0 to 2 MiB (read then write, O_DIRECT),
    // and writes a line of its own at 4 MiB.
    g.run(
        "dd if=/dev/vda of=/dev/vda bs=65536 count=1 seek=32 iflag=direct oflag=direct conv=fsync 2>/dev/null; echo VBD-COPY=$?-END",
        "VBD-COPY=0-END",
    );
    g.run(
        "echo guest-line-XYZ > /tmp/l; dd if=/tmp/l of=/dev/vda bs=512 seek=8192 conv=sync,fsync 2>/dev/null; echo VBD-WROTE=$?-END",
        "VBD-WROTE=0-END",
    );
    assert_eq!(io.read(&*volume, 2 * MIB, 64 << 10).unwrap(), pat);
    let line = io.read(&*volume, 4 * MIB, 512).unwrap();
    assert_eq!(&line[..15], b"guest-line-XYZ\n");
    assert!(line[15..].iter().all(|&b| b == 0));

    // A guest discard zeroes what the copy wrote.
    g.run(
        "blkdiscard -o 2097152 -l 65536 /dev/vda; echo VBD-DISCARD=$?-END",
        "VBD-DISCARD=0-END",
    );
    assert!(
        io.read(&*volume, 2 * MIB, 64 << 10)
            .unwrap()
            .iter()
            .all(|&b| b == 0),
        "discarded range still holds data"
    );
    // The source of the copy is untouched.
    assert_eq!(io.read(&*volume, 0, 64 << 10).unwrap(), pat);

    // vbd's device goes away (as in a restart) and comes back on the same
    // socket: QEMU (reconnect=1) re-attaches and the guest's I/O resumes.
    drop(device);
    let device = start_device();
    let start = Instant::now();
    while !device.frontend_attached() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "QEMU did not reconnect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    g.run(
        "echo again-XYZ > /tmp/l; dd if=/tmp/l of=/dev/vda bs=512 seek=8200 conv=sync,fsync 2>/dev/null; echo VBD-AGAIN=$?-END",
        "VBD-AGAIN=0-END",
    );
    assert_eq!(&io.read(&*volume, 8200 * 512, 10).unwrap(), b"again-XYZ\n");
    let out = g.run(
        "dd if=/dev/vda bs=512 skip=6144 count=1 iflag=direct 2>/dev/null | head -c 16; echo; echo VBD-READ2=$?-END",
        "VBD-READ2=0-END",
    );
    assert!(out.contains("host-pattern-ABC"), "{out}");
    drop(g);
    // QEMU gone: the device drops the frontend and waits for the next.
    let start = Instant::now();
    while device.frontend_attached() {
        assert!(start.elapsed() < Duration::from_secs(10), "still attached");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(device);
    server.stop().unwrap();
}
