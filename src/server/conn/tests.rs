//! Dispatch tests: a real core (its reactor, ring and connection code) on
//! a thread, fed real NBD over a socketpair, serving memory volumes (one
//! wrapped in a gate that holds writes until the test completes them from
//! another thread, as an object-store volume would).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;

use super::ConnConfig;
use crate::lock::MutexExt;
use crate::nbd::wire::*;
use crate::server::limits::Gauges;
use crate::server::listener::{SocketTuning, Transport};
use crate::server::reactor::{self, CoreHandle, CoreMsg, CoreSetup};
use crate::server::registry::Registry;
use crate::uring::{RemoteSink, Waker};
use crate::volume::memory::MemoryVolume;
use crate::volume::sync::SyncDriver;
use crate::volume::{Caps, Completer, Ctx, Io, Op, Volume, VolumeError, Wake};

const SIZE: u64 = 1 << 20;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// A memory volume that logs every operation it starts and, while
/// `holding`, parks writes until the test completes them.
struct Gate {
    inner: MemoryVolume,
    holding: AtomicBool,
    held: Mutex<Vec<Completer>>,
    log: Mutex<Vec<(Op, u64)>>,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            inner: MemoryVolume::new(SIZE, false),
            holding: AtomicBool::new(true),
            held: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
        })
    }

    fn log(&self) -> Vec<(Op, u64)> {
        self.log.locked().clone()
    }

    /// Waits until `n` writes are parked, and takes them.
    fn take_held(&self, n: usize) -> Vec<Completer> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let mut held = self.held.locked();
                if held.len() >= n {
                    assert_eq!(held.len(), n, "more writes parked than expected");
                    return std::mem::take(&mut *held);
                }
            }
            assert!(
                Instant::now() < deadline,
                "{n} writes never reached the volume"
            );
            std::thread::sleep(Duration::from_millis(2));
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
        self.log.locked().push((io.op, io.offset));
        if io.op == Op::Write && self.holding.load(Ordering::Relaxed) {
            self.held.locked().push(ctx.completer());
            return Poll::Pending;
        }
        self.inner.start(io, ctx)
    }
    fn resume(&self, io: &mut Io, wake: Wake, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        match wake {
            // Released: the write lands now.
            Wake::Remote(Ok(_)) => self.inner.start(io, ctx),
            Wake::Remote(Err(e)) => Poll::Ready(Err(e)),
            Wake::Cqe(_) => Poll::Ready(Err(VolumeError::from_errno("gate", libc::EIO))),
        }
    }
}

/// One reactor core on a thread, serving "mem", "ro" and "gate".
struct Core {
    handle: CoreHandle,
    gauges: Arc<Gauges>,
    mem: Arc<MemoryVolume>,
    gate: Arc<Gate>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Core {
    fn start() -> Core {
        Core::start_with(ConnConfig::default(), SocketTuning::default())
    }

    fn start_with(conn: ConnConfig, tuning: SocketTuning) -> Core {
        let registry = Arc::new(Registry::new());
        let mem = Arc::new(MemoryVolume::new(SIZE, false));
        let gate = Gate::new();
        registry.add("mem", mem.clone(), false).unwrap();
        let ro = Arc::new(MemoryVolume::new(SIZE, false));
        registry.add("ro", ro, true).unwrap();
        registry.add("gate", gate.clone(), false).unwrap();
        let (tx, rx) = unbounded();
        let (remote_tx, remote_rx) = unbounded();
        let waker = Arc::new(Waker::new().unwrap());
        let handle = CoreHandle {
            tx,
            waker: waker.clone(),
        };
        let gauges = Arc::new(Gauges::new(
            1,
            conn.max_connections,
            conn.max_buffered_total,
        ));
        let setup = CoreSetup {
            index: 0,
            rx,
            remote_rx,
            sink: RemoteSink {
                tx: remote_tx,
                waker: waker.clone(),
            },
            waker,
            peers: vec![handle.clone()],
            listeners: Vec::new(),
            registry,
            conn,
            gauges: gauges.clone(),
            tuning,
            ring_entries: 64,
            busy_poll: Duration::ZERO,
            tls: None,
        };
        let thread = std::thread::spawn(move || reactor::run(setup));
        Core {
            handle,
            gauges,
            mem,
            gate,
            thread: Some(thread),
        }
    }

    /// A new connection, handed to the core as the accepting core would.
    fn connect(&self) -> Client {
        let (client, server) = UnixStream::pair().unwrap();
        assert!(self.gauges.try_connect());
        self.handle.send(CoreMsg::Conn {
            fd: server.into(),
            transport: Transport::Unix,
            peer: "test".into(),
        });
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client { s: client }
    }

    /// A connection in transmission on `export`.
    fn attach(&self, export: &str) -> Client {
        let mut c = self.connect();
        c.greet();
        c.go(export);
        c
    }

    /// A connection on `export` with structured replies and `base:allocation`.
    fn attach_structured(&self, export: &str) -> (Client, u32) {
        let mut c = self.connect();
        c.greet();
        c.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.option_reply().1, REP_ACK);
        let mut data = string(export);
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&string(BASE_ALLOCATION));
        c.option(OPT_SET_META_CONTEXT, &data);
        let (_, typ, data) = c.option_reply();
        assert_eq!(typ, REP_META_CONTEXT);
        assert_eq!(&data[4..], BASE_ALLOCATION.as_bytes());
        let context = be32(&data);
        assert_eq!(c.option_reply().1, REP_ACK);
        c.go(export);
        (c, context)
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.handle.send(CoreMsg::Stop);
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("reactor panicked").expect("reactor failed");
            }
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A compact (non-extended) request header, with `payload` after it.
fn request(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(28 + payload.len());
    v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn write(cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    request(CMD_WRITE, 0, cookie, offset, data.len() as u32, data)
}

fn read(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    request(CMD_READ, 0, cookie, offset, len, &[])
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The client end of a connection.
struct Client {
    s: UnixStream,
}

impl Client {
    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// Reads the greeting and answers it (fixed newstyle, no zeroes).
    fn greet(&mut self) {
        let g = self.recv(18);
        assert_eq!(be64(&g), NBDMAGIC);
        assert_eq!(be64(&g[8..]), IHAVEOPT);
        self.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        self.send(&option(opt, data));
    }

    /// One option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.recv(20);
        assert_eq!(be64(&h), REPLY_MAGIC);
        let data = self.recv(be32(&h[16..]) as usize);
        (be32(&h[8..]), be32(&h[12..]), data)
    }

    /// NBD_OPT_GO: returns the export's size and transmission flags.
    fn go(&mut self, name: &str) -> (u64, u16) {
        let mut data = string(name);
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &data);
        let mut export = None;
        loop {
            let (opt, typ, data) = self.option_reply();
            assert_eq!(opt, OPT_GO);
            match typ {
                REP_ACK => return export.expect("NBD_INFO_EXPORT before the ACK"),
                REP_INFO if be16(&data) == INFO_EXPORT => {
                    export = Some((be64(&data[2..]), be16(&data[10..])));
                }
                REP_INFO => {}
                _ => panic!("GO {name} refused: {typ:#x}"),
            }
        }
    }

    /// A simple reply: (cookie, error).
    fn reply(&mut self) -> (u64, u32) {
        let h = self.recv(16);
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
        (be64(&h[8..]), be32(&h[4..]))
    }

    /// A simple reply that must be a success for `cookie`.
    fn ok(&mut self, cookie: u64) {
        assert_eq!(self.reply(), (cookie, 0));
    }

    /// One structured reply chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.recv(20);
        assert_eq!(be32(&h), STRUCTURED_REPLY_MAGIC);
        let payload = self.recv(be32(&h[16..]) as usize);
        (be16(&h[4..]), be16(&h[6..]), be64(&h[8..]), payload)
    }

    /// Asserts that the server closed the connection without a word more.
    fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        assert_eq!(self.s.read(&mut b).unwrap(), 0, "expected end of stream");
    }
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn pipelined_writes_and_reads_reach_the_volume_in_order() {
    let core = Core::start();
    let mut c = core.attach("mem");
    let (a, b) = (pattern(1, 8192), pattern(2, 70_000));
    // One segment: two writes (one straddling a page), a read of each, a flush.
    let mut batch = write(1, 4096, &a);
    batch.extend(write(2, 60_000, &b));
    batch.extend(read(3, 4096, 8192));
    batch.extend(read(4, 60_000, 70_000));
    batch.extend(request(CMD_FLUSH, 0, 5, 0, 0, &[]));
    c.send(&batch);
    c.ok(1);
    c.ok(2);
    c.ok(3);
    assert_eq!(c.recv(a.len()), a);
    c.ok(4);
    assert_eq!(c.recv(b.len()), b);
    c.ok(5);
    // The data is in the volume, not only echoed back.
    let mut d = SyncDriver::new().unwrap();
    assert_eq!(d.read(&*core.mem, 4096, a.len()).unwrap(), a);
    assert_eq!(d.read(&*core.mem, 60_000, b.len()).unwrap(), b);
    assert_eq!(d.read(&*core.mem, 0, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn refusals_carry_the_nbd_error_and_the_connection_goes_on() {
    let core = Core::start();
    let mut c = core.attach("mem");
    c.send(&read(1, SIZE - 512, 1024));
    assert_eq!(c.reply(), (1, EINVAL), "read past the end");
    // A refused write's payload is skipped, not parsed as requests.
    let junk = request(CMD_WRITE, 0, 99, 0, 8, &[0xee; 8]);
    c.send(&write(2, SIZE, &junk));
    assert_eq!(c.reply(), (2, ENOSPC), "write past the end");
    c.send(&request(CMD_FLUSH, 0, 3, 4096, 0, &[]));
    assert_eq!(c.reply(), (3, EINVAL), "flush with an offset");
    c.send(&request(0x55, 0, 4, 0, 512, &[]));
    assert_eq!(c.reply(), (4, EINVAL), "unknown command");
    let data = pattern(3, 512);
    c.send(&write(5, 0, &data));
    c.ok(5);
    c.send(&read(6, 0, 512));
    c.ok(6);
    assert_eq!(c.recv(512), data);

    let mut ro = core.attach("ro");
    ro.send(&write(7, 0, &data));
    assert_eq!(ro.reply(), (7, EPERM), "write to a read-only export");
    ro.send(&request(CMD_TRIM, 0, 8, 0, 4096, &[]));
    assert_eq!(ro.reply(), (8, EPERM), "trim of a read-only export");
    ro.send(&read(9, 0, 512));
    ro.ok(9);
    assert_eq!(ro.recv(512), vec![0; 512], "the refused write left nothing");
}

#[test]
fn requests_over_the_maximum_are_einval_and_a_write_payload_is_dropped() {
    let max = 64 << 10;
    let core = Core::start_with(
        ConnConfig {
            handshake: crate::nbd::HandshakeConfig {
                max_payload: max,
                ..Default::default()
            },
            ..ConnConfig::default()
        },
        SocketTuning::default(),
    );
    let mut c = core.attach("mem");
    c.send(&read(1, 0, max + 512));
    assert_eq!(c.reply(), (1, EINVAL), "read over the maximum");
    // The payload is made of request headers: had the server parsed it,
    // they would be answered.
    let junk: Vec<u8> = (0u64..)
        .map(|i| write(100 + i, 0, &[0xee; 8]))
        .take(2000)
        .flatten()
        .take(max as usize + 512)
        .collect();
    c.send(&write(2, 0, &junk));
    assert_eq!(c.reply(), (2, EINVAL), "write over the maximum");
    let data = pattern(4, max as usize);
    c.send(&write(3, 0, &data));
    c.ok(3);
    c.send(&read(4, 0, max));
    c.ok(4);
    assert_eq!(c.recv(max as usize), data, "the connection goes on");
}

#[test]
fn replies_leave_in_completion_order_and_volumes_see_arrival_order() {
    let core = Core::start();
    let mut c = core.attach("gate");
    let data = pattern(4, 4096);
    let mut batch = write(1, 0, &data);
    batch.extend(read(2, 65_536, 512));
    batch.extend(request(CMD_FLUSH, 0, 3, 0, 0, &[]));
    c.send(&batch);
    // The held write has not completed, so the read and the flush that
    // came after it are answered first.
    c.ok(2);
    assert_eq!(c.recv(512), vec![0; 512]);
    c.ok(3);
    let held = core.gate.take_held(1);
    assert_eq!(
        core.gate.log(),
        [(Op::Write, 0), (Op::Read, 65_536), (Op::Flush, 0)]
    );
    // Completed from another thread, as an object-store fetch would be.
    std::thread::spawn(move || held.into_iter().for_each(|h| h.complete(Ok(None))))
        .join()
        .unwrap();
    c.ok(1);
    c.send(&read(4, 0, 4096));
    c.ok(4);
    assert_eq!(c.recv(4096), data);
}

#[test]
fn volume_errors_map_to_nbd_errors() {
    let core = Core::start();
    let mut c = core.attach("gate");
    let cases = [
        (VolumeError::NoSpace, ENOSPC),
        (VolumeError::ReadOnly, EPERM),
        (VolumeError::OutOfRange { offset: 0, len: 1 }, EINVAL),
        (VolumeError::from_errno("write", libc::EIO), EIO),
    ];
    for (i, (error, code)) in cases.into_iter().enumerate() {
        let cookie = 10 + i as u64;
        c.send(&write(cookie, 0, &[7; 512]));
        let mut held = core.gate.take_held(1);
        held.pop().unwrap().complete(Err(error));
        assert_eq!(c.reply(), (cookie, code));
    }
    c.send(&read(20, 0, 512));
    c.ok(20);
    assert_eq!(c.recv(512), vec![0; 512], "failed writes changed nothing");
}

#[test]
fn requests_beyond_max_inflight_wait_for_a_free_slot() {
    let core = Core::start_with(
        ConnConfig {
            max_inflight: 2,
            ..ConnConfig::default()
        },
        SocketTuning::default(),
    );
    let mut c = core.attach("gate");
    let mut batch = Vec::new();
    for i in 0..3u64 {
        batch.extend(write(i, i * 4096, &pattern(i as u8, 4096)));
    }
    c.send(&batch);
    let first = core.gate.take_held(2);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(core.gate.log().len(), 2, "a third request started");
    first.into_iter().for_each(|h| h.complete(Ok(None)));
    c.ok(0);
    c.ok(1);
    core.gate.take_held(1).pop().unwrap().complete(Ok(None));
    c.ok(2);
    assert_eq!(core.gate.log()[2], (Op::Write, 8192));
}

#[test]
fn disc_answers_requests_in_flight_then_closes() {
    let core = Core::start();
    let mut c = core.attach("gate");
    let mut batch = write(1, 0, &[9; 512]);
    batch.extend(request(CMD_DISC, 0, 2, 0, 0, &[]));
    c.send(&batch);
    core.gate.take_held(1).pop().unwrap().complete(Ok(None));
    c.ok(1);
    c.expect_closed();
    assert_eq!(core.gate.log(), [(Op::Write, 0)]);
}

#[test]
fn block_status_describes_the_volume_extents() {
    let core = Core::start();
    let (mut c, context) = core.attach_structured("mem");
    // Memory volumes allocate 64 KiB pages: this write allocates the second.
    let mut batch = write(1, 65_536 + 512, &[1; 512]);
    batch.extend(request(CMD_BLOCK_STATUS, 0, 2, 0, 4 * 65_536, &[]));
    batch.extend(request(
        CMD_BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        3,
        0,
        4 * 65_536,
        &[],
    ));
    c.send(&batch);
    c.ok(1);
    let descriptors = |payload: &[u8]| -> Vec<(u32, u32)> {
        assert_eq!(be32(payload), context);
        payload[4..]
            .chunks(8)
            .map(|d| (be32(d), be32(&d[4..])))
            .collect()
    };
    let (flags, typ, cookie, payload) = c.chunk();
    assert_eq!(
        (flags, typ, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 2)
    );
    let hole = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        descriptors(&payload),
        [(65_536, hole), (65_536, 0), (2 * 65_536, hole)]
    );
    let (_, _, cookie, payload) = c.chunk();
    assert_eq!(cookie, 3);
    assert_eq!(descriptors(&payload), [(65_536, hole)], "REQ_ONE");
}

#[test]
fn pipelined_options_wait_while_replies_back_up() {
    // A small send buffer, so the server's replies stall until we read.
    let core = Core::start_with(
        ConnConfig {
            handshake: crate::nbd::HandshakeConfig {
                max_options: 4096,
                ..Default::default()
            },
            ..ConnConfig::default()
        },
        SocketTuning {
            sndbuf: Some(4096),
            rcvbuf: None,
        },
    );
    let mut c = core.connect();
    c.greet();
    let batch: Vec<u8> = (0..500).flat_map(|_| option(OPT_LIST, &[])).collect();
    c.send(&batch);
    // Let the server answer the first batch into a full socket, then send
    // more options while that send is still waiting for room.
    std::thread::sleep(Duration::from_millis(100));
    c.send(&batch);
    let mut names = Vec::new();
    for _ in 0..1000 {
        loop {
            let (opt, typ, data) = c.option_reply();
            assert_eq!(opt, OPT_LIST);
            if typ == REP_ACK {
                break;
            }
            assert_eq!(typ, REP_SERVER);
            let n = be32(&data) as usize;
            names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
        }
    }
    assert_eq!(names.len(), 3000, "three exports listed per option");
    assert_eq!(&names[..3], ["mem", "ro", "gate"]);
    assert_eq!(c.go("mem").0, SIZE);
    c.send(&read(1, 0, 512));
    c.ok(1);
    assert_eq!(c.recv(512), vec![0; 512]);
}
