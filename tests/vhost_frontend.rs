//! Drives a vbd vhost-user-blk device through its socket with the `vhost`
//! crate's frontend (the protocol QEMU speaks), the test playing the guest
//! too: it lays out a split virtqueue in a shared memfd, kicks, waits for
//! the call eventfd and checks the used ring, the status bytes and the
//! volume's bytes. Then hostile frontends: out-of-order messages,
//! overlapping or short memory regions, queues that do not exist, a second
//! frontend... each is refused, and the device keeps serving the next one.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vbd::vhost::config::{DeviceConfig, ExportCaps};
use vbd::vhost::device::VhostUserDevice;
use vbd::vhost::worker::ThreadRunner;
use vbd::volume::memory::MemoryVolume;
use vbd::volume::sync::SyncDriver;
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

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "vbd-vhost-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn memfd(len: u64) -> File {
    // SAFETY: literal name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vbd-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor this test owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// A device serving a memory volume, and that volume.
struct Served {
    _dir: TempDir,
    sock: PathBuf,
    volume: Arc<MemoryVolume>,
    device: VhostUserDevice,
}

fn serve(queues: u16, read_only: bool) -> Served {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("vbd=debug")
        .try_init();
    let dir = TempDir::new("fe");
    let sock = dir.0.join("blk.sock");
    let volume = Arc::new(MemoryVolume::new(DISK, read_only));
    let config = DeviceConfig::new(&ExportCaps::of(&*volume, queues)).unwrap();
    let device = VhostUserDevice::start(
        &sock,
        "disk-serial",
        config,
        ThreadRunner::new(volume.clone()),
    )
    .unwrap();
    Served {
        _dir: dir,
        sock,
        volume,
        device,
    }
}

/// The test's side of guest memory and of one virtqueue.
struct Guest {
    file: File,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
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
        }
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
            desc_table_addr: USER_BASE + DESC,
            used_ring_addr: USER_BASE + USED,
            avail_ring_addr: USER_BASE + AVAIL,
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
            let d = Descriptor::new(addr, len, flags, next);
            self.mem
                .write_obj(d, GuestAddress(DESC + 16 * u64::from(head + i as u16)))
                .unwrap();
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();
        head
    }

    /// Waits for the next used entry: (head, bytes written).
    fn wait_used(&mut self) -> (u16, u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if idx != self.used_seen {
                let at = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
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
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
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

fn connect(s: &Served) -> Frontend {
    let f = Frontend::connect(&s.sock, 64).unwrap();
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
    f.set_vring_num(0, QSIZE).unwrap();
    f.set_vring_base(0, 0).unwrap();
    f.set_vring_addr(0, &g.vring()).unwrap();
    f.set_vring_kick(0, &g.kick).unwrap();
    f.set_vring_call(0, &g.call).unwrap();
    f.set_vring_enable(0, true).unwrap();
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
    assert!(s.device.frontend_attached());

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
    assert!(!s.device.frontend_attached());
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
    let path = dir.0.join("blk.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let volume = Arc::new(MemoryVolume::new(DISK, false));
    let config = DeviceConfig::new(&ExportCaps::of(&*volume, 1)).unwrap();
    assert!(VhostUserDevice::start(&path, "d", config, ThreadRunner::new(volume)).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}
