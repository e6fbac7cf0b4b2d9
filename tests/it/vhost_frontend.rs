//! Drives a vbd vhost-user-blk device through its socket with the `vhost`
//! crate's frontend (the protocol QEMU speaks), the test playing the guest
//! too: it lays out a split virtqueue in a shared memfd, kicks, waits for
//! the call eventfd and checks the used ring, the status bytes and the
//! volume's bytes. Then hostile frontends: out-of-order messages,
//! overlapping or short memory regions, queues that do not exist, a second
//! frontend... each is refused, and the device keeps serving the next one.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::{TempDir, Vbd, qemu_io, vbd_cmd};
use crate::metrics::{scrape_unix, status_json, status_text, wait_until};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use vbd::server::{Registry, Server, ServerConfig};
use vbd::vhost::config::{DeviceConfig, ExportCaps};
use vbd::vhost::cores::CoreRunner;
use vbd::vhost::device::{SocketAccess, VhostUserDevice};
use vbd::volume::memory::MemoryVolume;
use vbd::volume::sync::SyncDriver;
use vbd::volume::{Caps, Completer, Ctx, Io, Op, Volume, VolumeError, Wake};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MEM_SIZE: u64 = 1 << 20;
/// Where the frontend pretends the guest's RAM sits in its address space.
const USER_BASE: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3100;
const DATA: u64 = 0x10000;
const DISK: u64 = 4 << 20;

fn memfd(len: u64) -> File {
    // SAFETY: literal name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vbd-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor this test owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// A device serving a memory volume on the cores of a vbd server (two
/// cores, so a device's queues land on different ones), and that volume.
struct Served {
    sock: PathBuf,
    volume: Arc<MemoryVolume>,
    device: Option<VhostUserDevice>,
    server: Option<Server>,
    _dir: TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        // The device's queues stop before the cores do.
        drop(self.device.take());
        if let Some(s) = self.server.take() {
            s.stop().unwrap();
        }
    }
}

impl std::ops::Deref for Served {
    type Target = VhostUserDevice;
    fn deref(&self) -> &VhostUserDevice {
        self.device.as_ref().unwrap()
    }
}

/// A vbd server with no exports, whose cores host the device's queues.
fn cores(dir: &TempDir) -> Server {
    let cfg = ServerConfig {
        unix: vec![dir.join("nbd.sock")],
        threads: 2,
        ..ServerConfig::default()
    };
    Server::start(cfg, Arc::new(Registry::new())).unwrap()
}

fn serve(queues: u16, read_only: bool) -> Served {
    let volume = Arc::new(MemoryVolume::new(DISK, read_only));
    serve_volume(volume.clone(), volume, queues)
}

/// Serves `served` (which may wrap `volume`, the one tests look into).
fn serve_volume(served: Arc<dyn Volume>, volume: Arc<MemoryVolume>, queues: u16) -> Served {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("vbd=debug")
        .try_init();
    let dir = TempDir::new("fe");
    let sock = dir.join("blk.sock");
    let server = cores(&dir);
    let config = DeviceConfig::new(&ExportCaps::of(&*served, queues)).unwrap();
    let runner = CoreRunner::new(served, Arc::new(server.handle()));
    let device = VhostUserDevice::start(
        &sock,
        SocketAccess::default(),
        "disk-serial",
        config,
        runner,
    )
    .unwrap();
    Served {
        sock,
        volume,
        device: Some(device),
        server: Some(server),
        _dir: dir,
    }
}

/// The test's side of guest memory and of one virtqueue, whose rings,
/// header, status byte and data area sit `base` bytes into the memory.
struct Guest {
    file: File,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
    base: u64,
}

impl Guest {
    fn new() -> Self {
        let file = memfd(MEM_SIZE);
        let region = MmapRegion::from_file(
            FileOffset::new(file.try_clone().unwrap(), 0),
            MEM_SIZE as usize,
        )
        .unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![
            GuestRegionMmap::new(region, GuestAddress(0)).unwrap(),
        ])
        .unwrap();
        Guest {
            file,
            mem,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
            used_seen: 0,
            base: 0,
        }
    }

    /// Another queue in the same memory, its layout `base` bytes on.
    fn another_queue(&self, base: u64) -> Guest {
        Guest {
            file: self.file.try_clone().unwrap(),
            mem: self.mem.clone(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
            used_seen: 0,
            base,
        }
    }

    /// Guest address `a` of this queue's layout.
    fn at(&self, a: u64) -> GuestAddress {
        GuestAddress(self.base + a)
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: USER_BASE,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn vring(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: USER_BASE + self.base + DESC,
            used_ring_addr: USER_BASE + self.base + USED,
            avail_ring_addr: USER_BASE + self.base + AVAIL,
            log_addr: None,
        }
    }

    /// Puts a chain of (addr, len, writable) at descriptor 0 onward and
    /// makes it available; returns its head.
    fn submit(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let head = (self.avail_idx % 4) * 4;
        for (i, &(addr, len, w)) in parts.iter().enumerate() {
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = head + i as u16 + 1;
            if i + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = Descriptor::new(self.base + addr, len, flags, next);
            self.mem
                .write_obj(d, self.at(DESC + 16 * u64::from(head + i as u16)))
                .unwrap();
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, self.at(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, self.at(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();
        head
    }

    /// Waits for the next used entry: (head, bytes written).
    fn wait_used(&mut self) -> (u16, u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let idx: u16 = self.mem.read_obj(self.at(USED + 2)).unwrap();
            if idx != self.used_seen {
                let at = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
                let id: u32 = self.mem.read_obj(self.at(at)).unwrap();
                let len: u32 = self.mem.read_obj(self.at(at + 4)).unwrap();
                self.used_seen = self.used_seen.wrapping_add(1);
                return (id as u16, len);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no completion within 10 s"
            );
            // Without EVENT_IDX every completion signals the call eventfd.
            let _ = self.call.read();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn header(&self, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, self.at(HDR)).unwrap();
        self.mem.write_obj(0xffu8, self.at(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(self.at(STATUS)).unwrap()
    }

    /// One request: header, data (if any), status; (status, used len).
    fn request(&mut self, t: u32, sector: u64, data: Option<(u64, u32, bool)>) -> (u8, u32) {
        self.header(t, sector);
        let mut parts = vec![(HDR, 16, false)];
        parts.extend(data);
        parts.push((STATUS, 1, true));
        let head = self.submit(&parts);
        let (id, len) = self.wait_used();
        assert_eq!(id, head);
        (self.status(), len)
    }
}

/// Connects once the device has let go of the previous frontend: a
/// frontend the test dropped can linger for a moment when another test's
/// thread forks (qemu-io, nbdinfo) and the child holds a copy of its
/// socket until it execs, and the device rightly refuses a second one.
fn connect(s: &Served) -> Frontend {
    let start = std::time::Instant::now();
    while s.frontend_attached() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the device still holds the last frontend"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    connect_to(&s.sock)
}

/// Waits for a device's socket to appear.
fn wait_for_socket(sock: &Path) {
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} did not appear",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn connect_to(sock: &Path) -> Frontend {
    let f = Frontend::connect(sock, 64).unwrap();
    // Every request asks for an ack, so a refusal shows on the call itself.
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    f
}

/// Negotiates what QEMU would and returns the acked protocol features.
fn negotiate(f: &mut Frontend) -> u64 {
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    let proto = f.get_protocol_features().unwrap();
    assert!(proto.contains(
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    ));
    f.set_protocol_features(proto).unwrap();
    // No EVENT_IDX: the test counts on a call per completion.
    f.set_features(features & !(1 << 29)).unwrap();
    features
}

/// Sets up queue 0 over `g`'s memory and enables it.
fn start_queue(f: &mut Frontend, g: &Guest) {
    f.set_mem_table(&[g.region()]).unwrap();
    enable_queue(f, 0, g);
}

/// Sets up queue `q` with `g`'s rings (the memory table is set) and enables it.
fn enable_queue(f: &mut Frontend, q: usize, g: &Guest) {
    f.set_vring_num(q, QSIZE).unwrap();
    f.set_vring_base(q, 0).unwrap();
    f.set_vring_addr(q, &g.vring()).unwrap();
    f.set_vring_kick(q, &g.kick).unwrap();
    f.set_vring_call(q, &g.call).unwrap();
    f.set_vring_enable(q, true).unwrap();
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WZ: u32 = 13;

/// A full set-up and one write/read round trip: the device serves.
fn round_trip(s: &Served) {
    let mut f = connect(s);
    negotiate(&mut f);
    let mut g = Guest::new();
    start_queue(&mut f, &g);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    g.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(g.request(T_OUT, 16, Some((DATA, 4096, false))), (0, 1));
    assert_eq!(
        g.request(T_IN, 16, Some((DATA + 0x2000, 4096, true))),
        (0, 4097)
    );
    let mut back = vec![0u8; 4096];
    g.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(back, data);
}

fn volume_bytes(v: &MemoryVolume, offset: u64, len: usize) -> Vec<u8> {
    SyncDriver::new().unwrap().read(v, offset, len).unwrap()
}

#[test]
fn guest_requests_reach_the_volume_and_come_back() {
    let s = serve(2, false);
    let mut f = connect(&s);
    negotiate(&mut f);
    assert_eq!(f.get_queue_num().unwrap(), 2);
    let (_, cfg) = f
        .get_config(0, 96, VhostUserConfigFlags::WRITABLE, &[0u8; 96])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[..8].try_into().unwrap()),
        DISK / 512,
        "capacity"
    );
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2, "num_queues");
    let mut g = Guest::new();
    start_queue(&mut f, &g);
    assert!(s.frontend_attached());

    // Write 8 KiB at sector 8 from two descriptors, read it back in one.
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    g.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    g.header(T_OUT, 8);
    let head = g.submit(&[
        (HDR, 16, false),
        (DATA, 4096, false),
        (DATA + 4096, 4096, false),
        (STATUS, 1, true),
    ]);
    assert_eq!(g.wait_used(), (head, 1));
    assert_eq!(g.status(), 0);
    assert_eq!(volume_bytes(&s.volume, 4096, 8192), data);

    assert_eq!(
        g.request(T_IN, 8, Some((DATA + 0x4000, 8192, true))),
        (0, 8193)
    );
    let mut back = vec![0u8; 8192];
    g.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x4000))
        .unwrap();
    assert_eq!(back, data);

    assert_eq!(g.request(T_FLUSH, 0, None), (0, 1));
    assert_eq!(
        g.request(T_GET_ID, 0, Some((DATA + 0x8000, 20, true))),
        (0, 21)
    );
    let mut id = [0u8; 20];
    g.mem
        .read_slice(&mut id, GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!(&id[..11], b"disk-serial");
    assert!(id[11..].iter().all(|&b| b == 0));

    // Discard the first 4 KiB of what was written: zeroes there, data after.
    let range = |sector: u64, n: u32, flags: u32| {
        let mut r = sector.to_le_bytes().to_vec();
        r.extend(n.to_le_bytes());
        r.extend(flags.to_le_bytes());
        r
    };
    g.mem
        .write_slice(&range(8, 8, 0), GuestAddress(DATA + 0x9000))
        .unwrap();
    assert_eq!(
        g.request(T_DISCARD, 0, Some((DATA + 0x9000, 16, false))),
        (0, 1)
    );
    let after = volume_bytes(&s.volume, 4096, 8192);
    assert!(after[..4096].iter().all(|&b| b == 0));
    assert_eq!(after[4096..], data[4096..]);
    // Write zeroes over the rest.
    g.mem
        .write_slice(&range(16, 8, 0), GuestAddress(DATA + 0x9000))
        .unwrap();
    assert_eq!(g.request(T_WZ, 0, Some((DATA + 0x9000, 16, false))), (0, 1));
    assert!(volume_bytes(&s.volume, 8192, 4096).iter().all(|&b| b == 0));

    // Refusals: an unknown type is UNSUPP, a read past the end IOERR, and
    // a chain without a status byte completes with nothing written.
    assert_eq!(g.request(99, 0, None), (2, 1));
    assert_eq!(g.request(T_IN, DISK / 512, Some((DATA, 512, true))), (1, 1));
    g.header(T_IN, 0);
    let head = g.submit(&[(HDR, 16, false), (DATA, 512, true)]);
    assert_eq!(g.wait_used(), (head, 0));
    // And the queue still serves.
    assert_eq!(g.request(T_IN, 8, Some((DATA, 512, true))), (0, 513));

    // GET_VRING_BASE stops the queue where the guest's avail index is.
    assert_eq!(f.get_vring_base(0).unwrap(), u32::from(g.avail_idx));
    drop(f);
    round_trip(&s);
}

#[test]
fn read_only_export_refuses_writes() {
    let s = serve(1, true);
    let mut f = connect(&s);
    let features = negotiate(&mut f);
    assert_ne!(features & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    let mut g = Guest::new();
    start_queue(&mut f, &g);
    assert_eq!(g.request(T_OUT, 0, Some((DATA, 512, false))), (1, 1));
    assert_eq!(g.request(T_DISCARD, 0, Some((DATA, 16, false))), (2, 1));
    assert_eq!(g.request(T_IN, 0, Some((DATA, 512, true))), (0, 513));
}

/// Runs `hostile` on a fresh frontend; it must be refused, and the device
/// must then serve a well-behaved frontend.
fn refused(s: &Served, what: &str, hostile: impl FnOnce(&mut Frontend, &Guest) -> bool) {
    let mut f = connect(s);
    let g = Guest::new();
    assert!(hostile(&mut f, &g), "{what}: accepted");
    drop(f);
    round_trip(s);
}

#[test]
fn hostile_frontends_are_refused_and_the_device_keeps_serving() {
    let s = serve(2, false);
    refused(&s, "SET_VRING_ADDR before SET_MEM_TABLE", |f, g| {
        negotiate(f);
        f.set_vring_num(0, QSIZE).unwrap();
        f.set_vring_addr(0, &g.vring()).is_err()
    });
    refused(&s, "SET_VRING_KICK before SET_VRING_ADDR", |f, g| {
        negotiate(f);
        f.set_mem_table(&[g.region()]).unwrap();
        f.set_vring_num(0, QSIZE).unwrap();
        f.set_vring_enable(0, true).unwrap();
        f.set_vring_kick(0, &g.kick).is_err()
    });
    refused(&s, "overlapping memory regions", |f, g| {
        negotiate(f);
        let mut b = g.region();
        b.guest_phys_addr = MEM_SIZE / 2;
        b.userspace_addr = USER_BASE + MEM_SIZE;
        f.set_mem_table(&[g.region(), b]).is_err()
    });
    refused(&s, "a region longer than its fd", |f, g| {
        negotiate(f);
        let mut r = g.region();
        r.memory_size = 2 * MEM_SIZE;
        f.set_mem_table(&[r]).is_err()
    });
    refused(&s, "ADD_MEM_REG overlapping a region", |f, g| {
        negotiate(f);
        f.add_mem_region(&g.region()).unwrap();
        let mut r = g.region();
        r.userspace_addr = USER_BASE + 4 * MEM_SIZE;
        f.add_mem_region(&r).is_err()
    });
    refused(&s, "REM_MEM_REG of a region never added", |f, g| {
        negotiate(f);
        f.add_mem_region(&g.region()).unwrap();
        let mut r = g.region();
        r.guest_phys_addr = 8 * MEM_SIZE;
        f.remove_mem_region(&r).is_err()
    });
    refused(&s, "a queue the device does not have", |f, _| {
        negotiate(f);
        f.set_vring_num(2, QSIZE).is_err()
    });
    refused(&s, "a queue size that is not a power of two", |f, _| {
        negotiate(f);
        f.set_vring_num(0, 100).is_err()
    });
    refused(&s, "a queue larger than 1024", |f, _| {
        negotiate(f);
        f.set_vring_num(0, 2048).is_err()
    });
    refused(&s, "features never offered", |f, _| {
        f.set_owner().unwrap();
        let offered = f.get_features().unwrap();
        // Before REPLY_ACK is negotiated the refusal shows as a hang-up.
        f.set_features(offered | 1 << 40).is_err() || f.get_features().is_err()
    });
    refused(&s, "SET_OWNER twice", |f, _| {
        f.set_owner().unwrap();
        f.set_owner().is_err() || f.get_features().is_err()
    });
    // (GET_CONFIG beyond the config space is answered with an empty
    // reply, as the spec says; the `vhost` frontend then waits for a
    // payload that never comes, so the handler's unit tests cover it.)
    refused(&s, "a config write to the capacity", |f, _| {
        negotiate(f);
        f.set_config(0, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .is_err()
    });
    refused(&s, "an inflight area for more queues than exist", |f, _| {
        negotiate(f);
        f.get_inflight_fd(&VhostUserInflight::new(0, 0, 9, 128))
            .is_err()
    });
    refused(&s, "reconfiguring a running queue", |f, g| {
        negotiate(f);
        start_queue(f, g);
        f.set_vring_num(0, 8).is_err()
    });
}

#[test]
fn a_second_frontend_is_refused_while_one_is_attached() {
    let s = serve(1, false);
    let mut first = connect(&s);
    negotiate(&mut first);
    let mut g = Guest::new();
    start_queue(&mut first, &g);
    let second = Frontend::connect(&s.sock, 64).unwrap();
    assert!(
        second.get_features().is_err(),
        "the second frontend was served"
    );
    // The first one is unaffected.
    assert_eq!(g.request(T_IN, 0, Some((DATA, 512, true))), (0, 513));
    drop(first);
    // Once it is gone, the next one is served.
    std::thread::sleep(Duration::from_millis(100));
    assert!(!s.frontend_attached());
    round_trip(&s);
}

#[test]
fn inflight_area_is_shared_with_the_frontend() {
    let s = serve(1, false);
    let mut f = connect(&s);
    negotiate(&mut f);
    let (info, file) = f
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .unwrap();
    assert_eq!(info.mmap_size, 320, "16 descriptors, padded to 64");
    f.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    let mut g = Guest::new();
    start_queue(&mut f, &g);
    assert_eq!(g.request(T_IN, 0, Some((DATA, 512, true))), (0, 513));
    // The backend initialised the area and logged the completion.
    let mut area = [0u8; 16];
    std::os::unix::fs::FileExt::read_at(&file, &mut area, 0).unwrap();
    assert_eq!(u16::from_le_bytes([area[8], area[9]]), 1, "version");
    assert_eq!(u16::from_le_bytes([area[10], area[11]]), QSIZE, "desc_num");
    assert_eq!(u16::from_le_bytes([area[14], area[15]]), 1, "used_idx");
}

#[test]
fn a_restarted_backend_resubmits_what_was_in_flight() {
    let s = serve(1, false);
    let mut f = connect(&s);
    negotiate(&mut f);
    let (info, file) = f
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .unwrap();
    f.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    let mut g = Guest::new();
    start_queue(&mut f, &g);
    assert_eq!(g.request(T_IN, 0, Some((DATA, 512, true))), (0, 513));
    drop(f);
    // The backend notices and stops its queue before the guest goes on.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.frontend_attached() || s.status().running_queues > 0 {
        assert!(std::time::Instant::now() < deadline, "still attached");
        std::thread::sleep(Duration::from_millis(5));
    }

    // As if a backend had taken head 4 (a write) and died: the avail ring
    // moved past it, the used ring did not.
    let data = vec![0x5au8; 512];
    g.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    g.header(T_OUT, 40);
    let avail_before = g.avail_idx;
    g.kick.read().ok();
    let head = g.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    let mut slot = [0u8; 16];
    slot[0] = 1; // inflight
    std::os::unix::fs::FileExt::write_at(&file, &slot, 16 + 16 * u64::from(head)).unwrap();

    // QEMU reconnects with the same area and the used index as the base.
    std::thread::sleep(Duration::from_millis(100));
    let mut f = connect(&s);
    negotiate(&mut f);
    f.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    f.set_mem_table(&[g.region()]).unwrap();
    f.set_vring_num(0, QSIZE).unwrap();
    f.set_vring_base(0, avail_before).unwrap();
    f.set_vring_addr(0, &g.vring()).unwrap();
    f.set_vring_kick(0, &g.kick).unwrap();
    f.set_vring_call(0, &g.call).unwrap();
    f.set_vring_enable(0, true).unwrap();
    assert_eq!(g.wait_used(), (head, 1));
    assert_eq!(g.status(), 0);
    assert_eq!(volume_bytes(&s.volume, 40 * 512, 512), data);
    // Nothing was done twice: the avail ring resumes after it.
    assert_eq!(f.get_vring_base(0).unwrap(), u32::from(g.avail_idx));
}

#[test]
fn a_file_in_the_way_of_the_socket_is_left_alone() {
    let dir = TempDir::new("inway");
    let path = dir.join("blk.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let server = cores(&dir);
    let volume = Arc::new(MemoryVolume::new(DISK, false));
    let config = DeviceConfig::new(&ExportCaps::of(&*volume, 1)).unwrap();
    let runner = CoreRunner::new(volume, Arc::new(server.handle()));
    let access = SocketAccess::default();
    assert!(VhostUserDevice::start(&path, access, "d", config, runner).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    server.stop().unwrap();
}

/// A memory volume whose reads and writes wait at a gate until the test
/// opens it; the data moves only then (on the queue's core), so a test
/// can change things (stop the queue, unmap memory) while they wait.
struct Gate {
    inner: Arc<MemoryVolume>,
    held: Mutex<Vec<Completer>>,
}

impl Gate {
    fn new(inner: Arc<MemoryVolume>) -> Arc<Gate> {
        Arc::new(Gate {
            inner,
            held: Mutex::new(Vec::new()),
        })
    }

    /// Waits until `n` requests are held.
    fn wait_held(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.held.lock().unwrap().len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "requests never reached the volume"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn open(&self) {
        for c in self.held.lock().unwrap().drain(..) {
            c.complete(Ok(None));
        }
    }
}

impl Volume for Gate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    fn describe(&self) -> String {
        "gated memory".into()
    }
    fn start(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if matches!(io.op, Op::Read | Op::Write) {
            self.held.lock().unwrap().push(ctx.completer());
            return Poll::Pending;
        }
        self.inner.start(io, ctx)
    }
    fn resume(&self, io: &mut Io, _wake: Wake, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        self.inner.start(io, ctx)
    }
}

#[test]
fn queues_spread_over_the_cores_and_each_serves() {
    let s = serve(2, false);
    let mut f = connect(&s);
    negotiate(&mut f);
    let mut g0 = Guest::new();
    let mut g1 = g0.another_queue(MEM_SIZE / 2);
    f.set_mem_table(&[g0.region()]).unwrap();
    enable_queue(&mut f, 0, &g0);
    enable_queue(&mut f, 1, &g1);
    for (g, sector, fill) in [(&mut g0, 0u64, 0x11u8), (&mut g1, 64, 0x22)] {
        g.mem.write_slice(&[fill; 4096], g.at(DATA)).unwrap();
        assert_eq!(g.request(T_OUT, sector, Some((DATA, 4096, false))), (0, 1));
        assert_eq!(
            g.request(T_IN, sector, Some((DATA + 0x2000, 4096, true))),
            (0, 4097)
        );
        assert_eq!(
            volume_bytes(&s.volume, sector * 512, 4096),
            vec![fill; 4096]
        );
    }
    let st = s.status();
    assert!(st.attached);
    assert_eq!((st.num_queues, st.running_queues), (2, 2));
    let cores: Vec<_> = st.queues.iter().map(|q| q.core).collect();
    assert_eq!(cores, [Some(0), Some(1)], "queue i on core i % 2");
    for q in &st.queues {
        assert_eq!(q.requests(), 2, "queue {} served its own requests", q.index);
        assert_eq!(q.ops[0].bytes + q.ops[1].bytes, 8192);
        assert!(q.kicks >= 2 && q.calls >= 2);
    }
    assert_eq!(f.get_vring_base(1).unwrap(), 2);
    assert_eq!(f.get_vring_base(0).unwrap(), 2);
    let st = s.status();
    assert_eq!(st.running_queues, 0);
    assert_eq!(
        st.queues[1].requests(),
        2,
        "counters outlive the queue's run"
    );
}

/// A one-queue device over a gated memory volume, with a frontend that
/// negotiated.
fn gated() -> (Served, Arc<Gate>, Frontend) {
    let volume = Arc::new(MemoryVolume::new(DISK, false));
    let gate = Gate::new(volume.clone());
    let s = serve_volume(gate.clone(), volume, 1);
    let mut f = connect(&s);
    negotiate(&mut f);
    (s, gate, f)
}

#[test]
fn stopping_a_queue_waits_for_its_requests_in_flight() {
    let (s, gate, mut f) = gated();
    let mut g = Guest::new();
    start_queue(&mut f, &g);
    g.mem.write_slice(&[0x77; 4096], g.at(DATA)).unwrap();
    g.header(T_OUT, 8);
    let head = g.submit(&[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)]);
    gate.wait_held(1);
    // GET_VRING_BASE must not answer while the write is in flight.
    let stopper = {
        let f = f.clone();
        std::thread::spawn(move || f.get_vring_base(0).unwrap())
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !stopper.is_finished(),
        "the queue stopped with a request in flight"
    );
    let used: u16 = g.mem.read_obj(g.at(USED + 2)).unwrap();
    assert_eq!(used, 0);
    gate.open();
    assert_eq!(stopper.join().unwrap(), 1, "the next avail index");
    // The request completed, with its used entry, before the answer.
    assert_eq!(g.wait_used(), (head, 1));
    assert_eq!(g.status(), 0);
    assert_eq!(volume_bytes(&s.volume, 4096, 4096), vec![0x77; 4096]);
}

#[test]
fn memory_removed_under_a_request_stays_mapped_until_it_ends() {
    let (s, gate, mut f) = gated();
    let mut g = Guest::new();
    f.add_mem_region(&g.region()).unwrap();
    enable_queue(&mut f, 0, &g);
    // A second region, added while the queue runs, holds the data.
    let extra = memfd(MEM_SIZE);
    let extra_gpa = 4 * MEM_SIZE;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: extra_gpa,
        memory_size: MEM_SIZE,
        userspace_addr: USER_BASE + 4 * MEM_SIZE,
        mmap_offset: 0,
        mmap_handle: extra.as_raw_fd(),
    };
    f.add_mem_region(&region).unwrap();
    std::os::unix::fs::FileExt::write_at(&extra, &[0x42; 4096], 0).unwrap();
    g.header(T_OUT, 16);
    // (The data address is absolute: outside the test's own mapping.)
    let head = g.submit(&[
        (HDR, 16, false),
        (extra_gpa - g.base, 4096, false),
        (STATUS, 1, true),
    ]);
    gate.wait_held(1);
    // The frontend takes the region away while the write waits...
    f.remove_mem_region(&region).unwrap();
    drop(extra);
    // ...and the write still reads it from the mapping it was parsed in.
    gate.open();
    assert_eq!(g.wait_used(), (head, 1));
    assert_eq!(g.status(), 0);
    assert_eq!(volume_bytes(&s.volume, 16 * 512, 4096), vec![0x42; 4096]);
    // A new request into the removed range is refused, not served.
    g.header(T_IN, 0);
    let head = g.submit(&[
        (HDR, 16, false),
        (extra_gpa - g.base, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(g.wait_used(), (head, 1));
    assert_eq!(g.status(), 1, "IOERR");
}

#[test]
fn event_idx_decides_when_the_guest_is_interrupted() {
    let s = serve(1, false);
    let mut f = connect(&s);
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    assert_ne!(features & (1 << 29), 0, "EVENT_IDX offered");
    let proto = f.get_protocol_features().unwrap();
    f.set_protocol_features(proto).unwrap();
    f.set_features(features).unwrap();
    let mut g = Guest::new();
    start_queue(&mut f, &g);
    let used_event = g.at(AVAIL + 4 + 2 * u64::from(QSIZE));
    // Completes one read; returns whether the call eventfd fired.
    let read_one = |g: &mut Guest| {
        let _ = g.call.read();
        g.header(T_IN, 0);
        let before: u16 = g.mem.read_obj(g.at(USED + 2)).unwrap();
        g.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while g.mem.read_obj::<u16>(g.at(USED + 2)).unwrap() == before {
            assert!(std::time::Instant::now() < deadline, "no completion");
            std::thread::sleep(Duration::from_millis(2));
        }
        g.used_seen = g.used_seen.wrapping_add(1);
        std::thread::sleep(Duration::from_millis(50));
        g.call.read().is_ok()
    };
    // The driver asks for an interrupt once the used index passes 0...
    g.mem.write_obj(0u16, used_event).unwrap();
    assert!(read_one(&mut g), "interrupt wanted and not sent");
    // ...then only once it passes 100: none for the next completion.
    g.mem.write_obj(100u16, used_event).unwrap();
    assert!(!read_one(&mut g), "interrupt sent though suppressed");
    // Caught up again: the next one interrupts.
    g.mem.write_obj(g.used_seen, used_event).unwrap();
    assert!(read_one(&mut g), "interrupt wanted and not sent");
}

/// `vbd serve --export ...,vhost-user=PATH`: the socket gets mode 0600, a
/// frontend's writes land in the export NBD serves (and NBD's writes read
/// back over vhost-user), and `vbd status`, its JSON and `/metrics` show the
/// device, its frontend and the queue's counters; the socket goes with vbd.
#[test]
fn serve_exports_a_vhost_user_socket_beside_nbd_and_reports_it() {
    let dir = TempDir::new("serve-vhost");
    let sock = dir.join("d.vhost");
    let spec = format!(
        "name=d,backend=memory,size=4M,vhost-user={}",
        sock.display()
    );
    let mut vbd = Vbd::start_in(dir, &["--threads", "2", "--export", &spec]);
    // vbd greets on NBD as soon as its cores run; the device comes next.
    wait_for_socket(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let printed = vbd.printed_uris(2).join("\n");
    assert!(
        printed.contains(&format!("vhost-user-blk {} export=d", sock.display())),
        "{printed}"
    );

    let mut f = connect_to(&sock);
    negotiate(&mut f);
    let mut g = Guest::new();
    start_queue(&mut f, &g);
    // The guest writes 4 KiB of 0x5a at 8 KiB; NBD reads it.
    g.mem
        .write_slice(&[0x5a; 4096], GuestAddress(DATA))
        .unwrap();
    assert_eq!(g.request(T_OUT, 16, Some((DATA, 4096, false))), (0, 1));
    qemu_io(&["-r"], &["read -P 0x5a 8192 4096".into()], &vbd.uri("d"));
    // NBD writes 0xc3 at 64 KiB; the guest reads it.
    qemu_io(&[], &["write -P 0xc3 65536 4096".into()], &vbd.uri("d"));
    assert_eq!(
        g.request(T_IN, 128, Some((DATA + 0x2000, 4096, true))),
        (0, 4097)
    );
    let mut back = vec![0u8; 4096];
    g.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert!(back.iter().all(|&b| b == 0xc3));

    let st = status_json(&vbd);
    let v = &st["exports"][0]["vhost_user"];
    assert_eq!(v["socket"], sock.display().to_string(), "{st}");
    assert_eq!(v["attached"], true, "{st}");
    assert_eq!(v["queues_running"], 1, "{st}");
    assert!(v["queues_offered"].as_u64().unwrap() >= 16, "{st}");
    let q = &v["queues"][0];
    assert_eq!(
        (
            &q["index"],
            &q["requests"],
            &q["bytes_written"],
            &q["bytes_read"]
        ),
        (&0.into(), &2.into(), &4096.into(), &4096.into()),
        "{st}"
    );
    let text = status_text(&vbd);
    assert!(
        text.contains("VHOST-USER") && text.contains("attached") && text.contains("1/"),
        "{text}"
    );
    let m = scrape_unix(&vbd);
    let l = |op: &str| format!("{{export=\"d\",queue=\"0\",op=\"{op}\"}}");
    assert_eq!(m.get("vbd_vhost_frontend_attached{export=\"d\"}"), 1.0);
    assert_eq!(
        m.get("vbd_vhost_queues{export=\"d\",state=\"running\"}"),
        1.0
    );
    assert_eq!(
        m.get(&format!("vbd_vhost_requests_total{}", l("write"))),
        1.0
    );
    assert_eq!(
        m.get(&format!("vbd_vhost_requests_total{}", l("read"))),
        1.0
    );
    assert_eq!(
        m.get(&format!("vbd_vhost_request_bytes_total{}", l("read"))),
        4096.0
    );
    assert_eq!(
        m.get(&format!("vbd_vhost_request_errors_total{}", l("write"))),
        0.0
    );
    assert_eq!(
        m.get(&format!(
            "vbd_vhost_request_duration_seconds_count{}",
            l("write")
        )),
        1.0
    );
    assert!(m.get("vbd_vhost_kicks_total{export=\"d\",queue=\"0\"}") >= 2.0);

    // The frontend goes: the device says so, and keeps its counters.
    drop(f);
    wait_until(
        "the frontend to be detached",
        Duration::from_secs(10),
        || status_json(&vbd)["exports"][0]["vhost_user"]["attached"] == false,
    );
    vbd.stop();
    assert!(!sock.exists(), "vbd left {} behind", sock.display());
}

/// The capacity GET_CONFIG reports, in sectors.
fn capacity(f: &mut Frontend) -> u64 {
    let (_, space) = f
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    u64::from_le_bytes(space[..8].try_into().unwrap())
}

/// Gives the device a backend request channel; returns the frontend's end.
fn backend_channel(f: &mut Frontend) -> std::os::unix::net::UnixStream {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    f.set_backend_request_fd(&theirs).unwrap();
    ours
}

/// Reads one backend-channel message header: (request, flags, size).
fn backend_message(ch: &mut std::os::unix::net::UnixStream) -> (u32, u32, u32) {
    use std::io::Read;
    let mut h = [0u8; 12];
    ch.read_exact(&mut h)
        .expect("a message on the backend channel");
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    (word(0), word(4), word(8))
}

/// A resize: requests are checked against the new size at once, GET_CONFIG
/// reports it, and a frontend that gave a backend request channel hears
/// CONFIG_CHANGE_MSG (2, version flag, no payload, no reply asked) on it,
/// as QEMU needs to re-read the config space and tell the guest.
#[test]
fn a_resize_is_enforced_reported_and_announced_on_the_backend_channel() {
    let s = serve(1, false);
    let mut f = connect(&s);
    negotiate(&mut f);
    let mut ours = backend_channel(&mut f);
    let mut g = Guest::new();
    start_queue(&mut f, &g);
    let sectors = DISK / 512;
    let last = sectors - 1;
    assert_eq!(g.request(T_IN, last, Some((DATA, 512, true))), (0, 513));

    assert!(s.set_capacity(DISK / 2).unwrap(), "the frontend was told");
    assert_eq!(backend_message(&mut ours), (2, 1, 0));
    assert_eq!(capacity(&mut f), sectors / 2);
    assert_eq!(s.capacity_bytes(), DISK / 2);
    // Past the new end: refused; just inside it: served.
    assert_eq!(g.request(T_IN, last, Some((DATA, 512, true))).0, 1);
    assert_eq!(
        g.request(T_IN, sectors / 2 - 1, Some((DATA, 512, true))),
        (0, 513)
    );

    // Growing back; a partial block does not count.
    assert!(s.set_capacity(DISK + 100).unwrap());
    assert_eq!(backend_message(&mut ours), (2, 1, 0));
    assert_eq!(capacity(&mut f), sectors);
    assert_eq!(g.request(T_IN, last, Some((DATA, 512, true))), (0, 513));
    assert!(s.set_capacity(100).is_err(), "less than a block");
    assert_eq!(capacity(&mut f), sectors);

    // The next frontend gives no channel: the size still changes, and
    // nobody is told.
    drop(f);
    drop(g);
    let mut f = connect(&s);
    negotiate(&mut f);
    assert!(!s.set_capacity(DISK / 4).unwrap());
    assert_eq!(capacity(&mut f), sectors / 4);
    ours.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(std::io::Read::read(&mut ours, &mut b), Ok(0)),
        "the old channel was closed, not written to"
    );
}

/// `vbd volume resize` of an object export served over vhost-user (routed
/// to the server that has it open): the attached frontend hears
/// CONFIG_CHANGE_MSG and reads the new capacity, as QEMU would before
/// telling the guest.
#[test]
fn resizing_an_export_tells_its_vhost_user_frontend() {
    let dir = TempDir::new("vhost-resize");
    let store = format!("file://{}", dir.join("store").display());
    let wal = dir.join("wal").display().to_string();
    let sock = dir.join("v.vhost");
    let spec = format!(
        "name=v,backend=object,store={store},volume=v,size=16M,vhost-user={}",
        sock.display()
    );
    let _vbd = Vbd::start_in(dir, &["--wal-dir", &wal, "--export", &spec]);
    wait_for_socket(&sock);
    let mut f = connect_to(&sock);
    negotiate(&mut f);
    let mut ours = backend_channel(&mut f);
    assert_eq!(capacity(&mut f), (16 << 20) / 512);
    let out = vbd_cmd(
        &[
            "volume",
            "resize",
            "--store",
            &store,
            "--wal-dir",
            &wal,
            "v",
            "64M",
        ],
        &[],
    );
    assert!(
        out.status.success() && out.stdout.contains("to 67108864"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(backend_message(&mut ours), (2, 1, 0));
    assert_eq!(capacity(&mut f), (64 << 20) / 512);
}
