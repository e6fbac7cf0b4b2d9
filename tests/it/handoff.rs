//! Object volumes that move between hosts (issue 17), with two `vbd serve`
//! processes as the two hosts (each its own WAL directory, run directory and
//! sockets) and one store: a local directory, the embedded S3 endpoint,
//! moto and Ceph RGW.
//!
//! - release: A writes and flushes, releases the volume (`vbd volume
//!   release` through A's control API); B opens it and reads every flushed
//!   byte, with nothing to recover.
//! - fencing: A writes, flushes and is frozen (SIGSTOP) while a FLUSH is on
//!   its way to the store; B takes over and writes; A is resumed (SIGCONT)
//!   and its client keeps writing: every FLUSH and FUA it sends after that
//!   fails, none of its late writes ever reads back, B's data and every
//!   write A made durable before read back, and B's garbage collection
//!   deletes A's leftovers and nothing that counts. In a loop with random
//!   timing and a printed seed (VBD_HANDOFF_SEED repeats it,
//!   VBD_HANDOFF_ROUNDS changes the count).
//! - host loss: A is killed right after a FLUSH returns and its WAL deleted;
//!   B takes over. durability=store: every flushed byte is there.
//!   durability=local: what was lost is counted and printed (the RPO the
//!   README states), and what is there is an older state, never garbage.
//!
//! Plus the SIGKILL crash rounds of tests/it/object.rs, shorter, against RGW.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::crash_common::tag_of;
use crate::stores::{self, TestStore};
use serde_json::Value;

/// Blocks in the test volume (8 MiB); writes go to the first `HOT` of them
/// so that writers overwrite each other's blocks.
const NBLOCKS: u64 = 2048;
const HOT: u64 = 256;
const SIZE: &str = "8M";

/// An NBD client driven over stdin: `W blk tag fua` writes a block whose
/// 4 KiB repeat (tag, blk) (tag 0: WRITE_ZEROES), `F` flushes, `Q` quits;
/// `random SEED` instead writes, zeroes and flushes at random until the
/// server goes away. Each request is printed before it is sent ("I ...")
/// and after its reply ("A ..." or "E ... errno").
const DRIVER: &str = r#"
import nbd, sys, random, struct
h = nbd.NBD()
h.connect_uri(sys.argv[1])
def out(*a):
    sys.stdout.write(" ".join(str(x) for x in a) + "\n")
    sys.stdout.flush()
def do(kind, args, f):
    out("I", kind, *args)
    try:
        f()
        out("A", kind, *args)
        return True
    except nbd.Error as e:
        out("E", kind, *args, e.errno or 0)
        return not (h.aio_is_dead() or h.aio_is_closed())
def write(blk, tag, fua):
    flags = nbd.CMD_FLAG_FUA if fua else 0
    if tag == 0:
        return do("W", [blk, 0, fua], lambda: h.zero(4096, blk * 4096, flags))
    data = struct.pack("<QQ", tag, blk) * 256
    return do("W", [blk, tag, fua], lambda: h.pwrite(data, blk * 4096, flags))
if len(sys.argv) > 2:
    seed, nblocks = int(sys.argv[3]), int(sys.argv[4])
    rnd = random.Random(seed)
    i, alive = 0, True
    while alive:
        r = rnd.random()
        if r < 0.06:
            alive = do("F", [], h.flush)
        else:
            blk = rnd.randrange(nblocks)
            tag = 0 if r < 0.10 else seed * 1000000 + i + 1
            alive = write(blk, tag, 1 if rnd.random() < 0.15 else 0)
        i += 1
else:
    for line in sys.stdin:
        f = line.split()
        if not f:
            continue
        if f[0] == "Q":
            break
        if f[0] == "F":
            do("F", [], h.flush)
        elif f[0] == "W":
            write(int(f[1]), int(f[2]), int(f[3]))
    out("Q")
"#;

/// A running driver and the lines it printed so far.
struct Driver {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    /// Commands sent so far (each gets exactly one reply).
    sent: usize,
}

impl Driver {
    fn start(uri: &str, random: Option<(u64, u64)>) -> Driver {
        require_python_nbd();
        let mut cmd = Command::new(SYSTEM_PYTHON);
        cmd.args(["-c", DRIVER, uri]);
        if let Some((seed, nblocks)) = random {
            cmd.args(["random", &seed.to_string(), &nblocks.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the NBD driver");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("driver stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Driver {
            stdin: child.stdin.take(),
            child,
            lines,
            sent: 0,
        }
    }

    fn send(&mut self, cmd: &str) {
        self.sent += 1;
        let stdin = self.stdin.as_mut().expect("driver stdin");
        writeln!(stdin, "{cmd}").expect("send to the driver");
        stdin.flush().expect("send to the driver");
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Replies ("A"/"E" lines) received so far.
    fn replies(&self) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.starts_with("A ") || l.starts_with("E "))
            .count()
    }

    /// Waits until `n` replies came, failing after a minute.
    fn wait_replies(&self, n: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.replies() < n {
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {n} replies after 120 s:\n{}",
                self.replies(),
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends the commands and waits for every reply.
    fn run(&mut self, cmds: &[String], what: &str) {
        for c in cmds {
            self.send(c);
        }
        self.wait_replies(self.sent, what);
    }

    /// The replies, in order.
    fn reply_lines(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.starts_with("A ") || l.starts_with("E "))
            .collect()
    }

    /// Quits and returns every line printed.
    fn finish(mut self) -> Vec<String> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "Q");
        }
        let _ = wait_deadline(&mut self.child, Duration::from_secs(60));
        // The reader thread gets the last lines once the pipe closes.
        std::thread::sleep(Duration::from_millis(50));
        self.lines()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one block may read back as: the last value made durable, and
/// later writes that may or may not have landed (with whether each was
/// acknowledged, and by which client).
#[derive(Clone, Default)]
struct Allowed {
    durable: u64,
    maybe: Vec<Maybe>,
}

/// A write that may have landed.
#[derive(Clone, Copy, Debug)]
struct Maybe {
    tag: u64,
    acked: bool,
    client: u8,
}

/// Every block's allowed values, and tags that must never be read.
#[derive(Default)]
struct Model {
    blocks: HashMap<u64, Allowed>,
    forbidden: HashSet<u64>,
}

impl Model {
    /// Follows one client's output: issued writes may land; acknowledged FUA
    /// writes, and writes this client had acknowledged before one of its
    /// FLUSHes was, are durable. (A FLUSH covers its own client's writes:
    /// another host's client is another volume's as far as it knows.)
    fn apply(&mut self, lines: &[String], client: u8) {
        for line in lines {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("{line}"));
            match f.as_slice() {
                ["I", "W", blk, tag, _] => {
                    let a = self.blocks.entry(num(blk)).or_default();
                    a.maybe.push(Maybe {
                        tag: num(tag),
                        acked: false,
                        client,
                    });
                }
                ["A", "W", blk, tag, fua] => {
                    let a = self.blocks.entry(num(blk)).or_default();
                    if *fua == "1" {
                        a.durable = num(tag);
                        a.maybe.clear();
                    } else if let Some(m) = a.maybe.iter_mut().rev().find(|m| m.tag == num(tag)) {
                        m.acked = true;
                    }
                }
                ["A", "F"] => {
                    for a in self.blocks.values_mut() {
                        if let Some(i) = a.maybe.iter().rposition(|m| m.acked && m.client == client)
                        {
                            a.durable = a.maybe[i].tag;
                            a.maybe.drain(..=i);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Checks an image of the volume against the model; what it holds
    /// becomes the durable baseline. Returns how many blocks lost a
    /// durable value to an older allowed one (only `lossy` allows that,
    /// from `history`).
    fn check(&mut self, image: &[u8], what: &str, lossy: Option<&History>) -> usize {
        let mut lost = 0;
        for blk in 0..NBLOCKS {
            let b = &image[blk as usize * 4096..(blk as usize + 1) * 4096];
            let Some(tag) = tag_of(b, blk) else {
                panic!("{what}: block {blk} is corrupt (neither zeroes nor a whole written block)");
            };
            assert!(
                !self.forbidden.contains(&tag),
                "{what}: block {blk} holds {tag}, written by a fenced writer after the fence"
            );
            let a = self.blocks.entry(blk).or_default();
            let ok = tag == a.durable || a.maybe.iter().any(|m| m.tag == tag);
            if !ok {
                let older = lossy.is_some_and(|h| h.had(blk, tag));
                assert!(
                    older,
                    "{what}: block {blk} holds {tag}, but must hold {} (or one of {:?})",
                    a.durable, a.maybe
                );
                lost += 1;
            }
            a.durable = tag;
            a.maybe.clear();
        }
        lost
    }
}

/// Every value each block ever durably held, for the durability=local
/// check (a lost write leaves an older one, never anything else).
#[derive(Default)]
struct History(HashMap<u64, HashSet<u64>>);

impl History {
    fn note(&mut self, m: &Model) {
        for (blk, a) in &m.blocks {
            self.0.entry(*blk).or_default().insert(a.durable);
        }
    }

    fn had(&self, blk: u64, tag: u64) -> bool {
        tag == 0 || self.0.get(&blk).is_some_and(|s| s.contains(&tag))
    }
}

/// A small xorshift generator, seeded from the clock or VBD_HANDOFF_SEED.
struct Rng(u64);

impl Rng {
    fn seeded(what: &str) -> Rng {
        let seed: u64 = std::env::var("VBD_HANDOFF_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{what}: seed {seed} (set VBD_HANDOFF_SEED to repeat)");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn rounds(default: u32) -> u32 {
    std::env::var("VBD_HANDOFF_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One store and the scratch space of the hosts that use it.
struct Site {
    dir: TempDir,
    store: TestStore,
    /// The volume the scenario running now uses (each starts a new one).
    volume: std::cell::RefCell<String>,
}

impl Site {
    fn new(tag: &str, store: impl FnOnce(&TempDir) -> TestStore) -> Site {
        let dir = TempDir::new(tag);
        let store = store(&dir);
        Site {
            dir,
            store,
            volume: Default::default(),
        }
    }

    /// Creates volume `name` and makes it the one the hosts export (as `v`).
    fn use_volume(&self, name: &str) {
        *self.volume.borrow_mut() = name.to_owned();
        self.volume_cmd("create", &["--size", SIZE]);
    }

    /// `vbd volume SUB --store URL VOLUME EXTRA...` on the volume in use;
    /// it must succeed.
    fn volume_cmd(&self, sub: &str, extra: &[&str]) -> String {
        let vol = self.volume();
        let mut args = vec!["volume", sub, "--store", &self.store.url, &vol];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    fn volume(&self) -> String {
        self.volume.borrow().clone()
    }

    fn wal(&self, host: &str) -> PathBuf {
        self.dir.join(&format!("wal-{host}"))
    }

    /// Runs a vbd command against this store; it must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let o = vbd_cmd(args, &self.store.env());
        assert!(
            o.status.success(),
            "vbd {args:?} on {}: {}{}",
            self.store.kind,
            o.stdout,
            o.stderr
        );
        o.stdout
    }

    fn info(&self) -> Value {
        let out = self.volume_cmd("info", &[]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("info JSON ({e}): {out}"))
    }

    /// `vbd serve` as host `host` with the volume exported as `v`.
    fn serve(&self, host: &str, options: &str) -> Vbd {
        let spec = format!(
            "name=v,volume={},store={},{options}",
            self.volume(),
            self.store.url
        );
        let wal = self.wal(host).display().to_string();
        Vbd::start_with(
            TempDir::new(&format!("host-{host}")),
            &["--wal-dir", &wal, "--export", &spec],
            &self.store.env(),
        )
    }

    /// The whole volume as `host` serves it.
    fn image(&self, v: &Vbd) -> Vec<u8> {
        require("nbdcopy", "libnbd-bin");
        let path = self.dir.join("image");
        run(Command::new("nbdcopy").arg(v.uri("v")).arg(&path));
        std::fs::read(&path).expect("image")
    }
}

/// Sends a signal to a server process this test started.
fn signal_pid(pid: u32, sig: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) on the id of a vbd child this test started and has
    // not reaped (the Vbd handle still owns it).
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// The opening log line of `vbd serve`'s volume, for its handover and
/// replayed segments.
fn open_line(v: &Vbd) -> String {
    v.log()
        .lines()
        .find(|l| l.contains("object volume open"))
        .unwrap_or_else(|| panic!("no open line in the log:\n{}", v.log()))
        .to_owned()
}

/// A writes and flushes 4 MiB through nbdcopy, releases the volume through
/// its control API, and B (another WAL directory, nothing shared with A but
/// the store) opens it with nothing to recover and reads every byte.
fn release_then_open_elsewhere(site: &Site) {
    require("nbdcopy", "libnbd-bin");
    site.use_volume("released");
    let vol = site.volume();
    let mut a = site.serve("a", "");
    let src = site.dir.join("src");
    write_pattern_file(&src, 23, 4 << 20);
    run(Command::new("nbdcopy").arg(&src).arg(a.uri("v")));
    let control = a.path("control.sock").display().to_string();
    let wal_a = site.wal("a").display().to_string();
    let out = site.volume_cmd("release", &["--control", &control, "--wal-dir", &wal_a]);
    assert!(out.contains(&format!("released volume {vol}")), "{out}");
    let i = site.info();
    assert_eq!(i["released"], true, "{i}");
    assert!(i["locked_by"].is_null(), "{i}");
    // A still runs, but no longer exports the volume.
    let again = vbd_cmd(
        &["volume", "release", "--store", &site.store.url, &vol],
        &site.store.env(),
    );
    assert!(again.stdout.contains("is not held"), "{}", again.stdout);
    let mut b = site.serve("b", "");
    let line = open_line(&b);
    assert!(
        line.contains("handover=\"released\"") || line.contains("handover=released"),
        "B opened without a clean handover: {line}"
    );
    assert!(
        line.contains("replayed_segments=0"),
        "B replayed a WAL: {line}"
    );
    assert!(!b.log().contains("took the volume over"), "{}", b.log());
    let image = site.image(&b);
    assert_bytes_eq(
        &image[..4 << 20],
        &std::fs::read(&src).unwrap(),
        &format!("what A released, read on B ({})", site.store.kind),
    );
    b.stop();
    a.stop();
    // A holder on this host that died: `vbd volume release` replays the WAL
    // it left and releases the volume.
    let mut a = site.serve("a", "");
    let mut ca = Driver::start(&a.uri("v"), None);
    ca.run(
        &["W 3 77 0".into(), "F".into(), "W 4 78 1".into()],
        "writes before the crash",
    );
    a.kill();
    drop(ca);
    let out = site.volume_cmd("release", &["--wal-dir", &wal_a]);
    assert!(out.contains("is gone"), "{out}");
    let mut b = site.serve("b", "");
    let image = site.image(&b);
    for (blk, tag) in [(3u64, 77u64), (4, 78)] {
        let at = blk as usize * 4096;
        assert_eq!(
            tag_of(&image[at..at + 4096], blk),
            Some(tag),
            "block {blk} after a release of a dead holder's volume ({})",
            site.store.kind
        );
    }
    b.stop();
}

/// Rounds of: A writes and flushes, is frozen mid-FLUSH, B takes over and
/// writes, A resumes and keeps writing (and must fail), then checks.
///
/// Under durability=store no FLUSH or FUA A's client sends after SIGCONT
/// is acknowledged. Under durability=local A only learns of the fence at
/// its next upload, so it may acknowledge some first (locally: the RPO of
/// durability=local); then its client must see them fail within 30 s, and
/// what B reads may be older than what A's client had flushed, but never
/// anything A wrote after the fence.
fn fenced_writer_rounds(site: &Site, durability: &str, rounds: u32) {
    site.use_volume(&format!("fenced-{durability}"));
    let strict = durability == "store";
    let mut rng = Rng::seeded(&format!(
        "fencing, durability={durability}, on {}",
        site.store.kind
    ));
    let mut model = Model::default();
    let mut history = History::default();
    let mut fenced_seen = 0;
    let mut tag = 0u64;
    let mut next_tag = || {
        tag += 1;
        tag
    };
    for round in 1..=rounds {
        let what = format!("{} durability={durability} round {round}", site.store.kind);
        let mut a = site.serve("a", &format!("durability={durability}"));
        // What the last round left (B's close collected garbage) reads back.
        model.check(&site.image(&a), &format!("{what}: at A's open"), None);
        history.note(&model);
        let mut ca = Driver::start(&a.uri("v"), None);
        let mut cmds = Vec::new();
        for i in 0..(5 + rng.below(30)) {
            let fua = u8::from(rng.below(10) == 0);
            cmds.push(format!("W {} {} {fua}", rng.below(HOT), next_tag()));
            if i % 8 == 7 {
                cmds.push("F".into());
            }
        }
        cmds.push("F".into());
        ca.run(&cmds, &format!("{what}: A's first writes"));
        // A FLUSH on its way to the store when A is frozen.
        for _ in 0..(1 + rng.below(20)) {
            ca.send(&format!("W {} {} 0", rng.below(HOT), next_tag()));
        }
        ca.send("F");
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        signal_pid(a.pid(), libc::SIGSTOP);
        let mut b = site.serve("b", &format!("durability={durability},take-over"));
        let mut cb = Driver::start(&b.uri("v"), None);
        let mut cmds = Vec::new();
        for _ in 0..(1 + rng.below(20)) {
            cmds.push(format!("W {} {} 0", rng.below(HOT), next_tag()));
        }
        cmds.push("F".into());
        cb.run(&cmds, &format!("{what}: B's writes"));
        signal_pid(a.pid(), libc::SIGCONT);
        // A's client keeps going: all of this comes after the fence.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut late = Vec::new();
            for i in 0..(2 + rng.below(8)) {
                let t = next_tag();
                model.forbidden.insert(t);
                late.push(format!("W {} {t} {}", rng.below(HOT), u8::from(i % 3 == 2)));
                if i % 4 == 3 {
                    late.push("F".into());
                }
            }
            late.push("F".into());
            ca.run(&late, &format!("{what}: A after SIGCONT"));
            let replies = ca.reply_lines();
            let late_replies = &replies[replies.len() - late.len()..];
            for l in late_replies.iter().filter(|_| strict) {
                assert!(
                    !(l == "A F" || (l.starts_with("A W ") && l.ends_with(" 1"))),
                    "{what}: the fenced writer acknowledged a FLUSH or FUA after the take-over: {l}\n{}",
                    ca.lines().join("\n")
                );
            }
            if late_replies.iter().any(|l| l.starts_with("E F")) {
                break;
            }
            assert!(
                !strict && Instant::now() < deadline,
                "{what}: the fenced writer's FLUSHes kept succeeding:\n{}",
                ca.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let a_lines = ca.finish();
        model.apply(&a_lines, 0);
        model.apply(&cb.finish(), 1);
        let lossy = (!strict).then_some(&history);
        model.check(&site.image(&b), &format!("{what}: read on B"), lossy);
        history.note(&model);
        a.stop();
        assert!(
            a.log().contains("FENCED"),
            "{what}: A did not say it was fenced:\n{}",
            a.log()
        );
        let i = site.info();
        fenced_seen += i["fenced_objects"].as_u64().unwrap_or(0);
        b.stop();
        let i = site.info();
        assert_eq!(
            i["fenced_objects"], 0,
            "{what}: B's close left fenced objects: {i}"
        );
        assert_eq!(i["released"], true, "{what}: {i}");
    }
    // The final state, through a fresh open after the last collection.
    let mut c = site.serve("c", "");
    model.check(&site.image(&c), "after the last round", None);
    c.stop();
    eprintln!(
        "fencing on {}, durability={durability}: {rounds} rounds; fenced writers left \
         {fenced_seen} objects that B collected",
        site.store.kind
    );
}

/// Rounds of: A (durability `durability`) writes and flushes, and the
/// moment the FLUSH returns A is killed and its WAL directory deleted (the
/// host is lost); B takes over and reads. Returns (flushed blocks, blocks
/// whose flushed value was lost), summed over the rounds.
fn host_loss_rounds(site: &Site, durability: &str, rounds: u32) -> (usize, usize) {
    site.use_volume(&format!("lost-{durability}"));
    let mut rng = Rng::seeded(&format!(
        "host loss, durability={durability}, on {}",
        site.store.kind
    ));
    let mut model = Model::default();
    let mut history = History::default();
    let mut tag = 0u64;
    let (mut flushed, mut lost) = (0, 0);
    for round in 1..=rounds {
        let what = format!("{} durability={durability} round {round}", site.store.kind);
        let mut a = site.serve("a", &format!("durability={durability}"));
        let mut ca = Driver::start(&a.uri("v"), None);
        let mut cmds = Vec::new();
        let mut blocks = HashSet::new();
        for _ in 0..(10 + rng.below(60)) {
            tag += 1;
            let blk = rng.below(HOT);
            blocks.insert(blk);
            cmds.push(format!("W {blk} {tag} 0"));
        }
        cmds.push("F".into());
        ca.run(&cmds, &format!("{what}: A's writes"));
        // The FLUSH returned: the host goes, WAL and all.
        a.kill();
        std::fs::remove_dir_all(site.wal("a")).expect("delete A's WAL");
        let lines = ca.finish();
        assert!(
            lines.iter().any(|l| l == "A F"),
            "{what}: {}",
            lines.join("\n")
        );
        model.apply(&lines, 0);
        flushed += blocks.len();
        // Odd rounds take over in B's export, even ones with the CLI first.
        let mut b = if round % 2 == 1 {
            let b = site.serve("b", "take-over");
            assert!(
                b.log().contains("took the volume over"),
                "{what}: B printed nothing about what may be lost:\n{}",
                b.log()
            );
            b
        } else {
            let wal = site.wal("b").display().to_string();
            let out = site.volume_cmd("take-over", &["--wal-dir", &wal]);
            assert!(
                out.contains("may be lost: took the volume over") && out.contains("released"),
                "{what}: vbd volume take-over said: {out}"
            );
            assert!(out.contains(&format!("durability={durability}")), "{out}");
            site.serve("b", "")
        };
        let lossy = (durability == "local").then_some(&history);
        let n = model.check(&site.image(&b), &format!("{what}: read on B"), lossy);
        lost += n;
        history.note(&model);
        b.stop();
    }
    eprintln!(
        "host loss on {}, durability={durability}: {lost} of {flushed} flushed blocks lost over {rounds} rounds",
        site.store.kind
    );
    (flushed, lost)
}

/// The crash rounds of tests/it/object.rs (a client writing at random while
/// the server is SIGKILLed, then a restart on the same WAL that must
/// recover every acknowledged-durable write), against any store.
fn sigkill_rounds(site: &Site, rounds: u32) {
    site.use_volume("crash");
    let mut rng = Rng::seeded(&format!("SIGKILL rounds on {}", site.store.kind));
    let mut model = Model::default();
    let mut total = 0;
    let mut v = site.serve("k", "");
    for round in 1..=rounds {
        let seed = rng.below(1000) * 1000 + u64::from(round);
        let writer = Driver::start(&v.uri("v"), Some((seed, NBLOCKS)));
        std::thread::sleep(Duration::from_millis(200 + rng.below(600)));
        v.kill();
        let lines = writer.finish();
        total += lines.iter().filter(|l| l.starts_with("A W")).count();
        model.apply(&lines, 0);
        v = site.serve("k", "");
        model.check(
            &site.image(&v),
            &format!("{} SIGKILL round {round}", site.store.kind),
            None,
        );
    }
    v.stop();
    assert!(
        total > 100,
        "the writers made progress: {total} acknowledged writes"
    );
}

/// Everything above against one store.
fn all_scenarios(site: &Site, fencing_rounds: u32, loss_rounds: u32) {
    release_then_open_elsewhere(site);
    fenced_writer_rounds(site, "store", rounds(fencing_rounds));
    fenced_writer_rounds(site, "local", 5);
    let (flushed, lost) = host_loss_rounds(site, "store", loss_rounds);
    assert_eq!(
        lost, 0,
        "durability=store lost {lost} of {flushed} flushed blocks"
    );
    host_loss_rounds(site, "local", loss_rounds);
}

#[test]
fn handoff_through_a_local_directory() {
    let site = Site::new("ho-dir", stores::local_dir);
    all_scenarios(&site, 20, 5);
}

#[test]
fn handoff_through_the_embedded_s3_endpoint() {
    let site = Site::new("ho-s3s", stores::embedded);
    all_scenarios(&site, 20, 5);
}

#[test]
fn handoff_through_moto() {
    let site = Site::new("ho-moto", |_| stores::moto());
    all_scenarios(&site, 20, 5);
}

/// Fewer host-loss rounds on RGW, and the SIGKILL crash rounds, shorter
/// than tests/it/object.rs's (10 rather than 50).
#[test]
fn handoff_and_crash_rounds_through_ceph_rgw() {
    let Some(store) = stores::ceph("handoff") else {
        return;
    };
    let site = Site::new("ho-ceph", |_| store);
    all_scenarios(&site, 20, 3);
    sigkill_rounds(&site, 10);
}
