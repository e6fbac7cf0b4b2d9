//! SIGKILL crash rounds with snapshots and clones taken mid-run (issue
//! 14): a libnbd client writes, zeroes and flushes while another thread
//! snapshots the volume through the CLI (routed to the server's control
//! API) and clones some snapshots; the server is killed at a random
//! moment. After each recovery: every acknowledged-and-flushed write is
//! there, every snapshot holds exactly what was acknowledged before it and
//! never changes afterwards, every clone reads as its snapshot, and
//! garbage collection (run offline every few rounds, deleting at once)
//! never deleted a chunk a snapshot or clone still needs.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::crash_common::{Allowed, crash_seed, tag_of};
use common::*;

/// Writer plus snapshotter; every event is printed under one lock, in order.
const WRITER: &str = r#"
import nbd, sys, random, struct, threading, subprocess, time, socket, http.client, json
uri, seed, nblocks, vbd, store, ctl, rnd_name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
rnd = random.Random(seed)
lock = threading.Lock()
def out(*a):
    with lock:
        sys.stdout.write(" ".join(str(x) for x in a) + "\n")
        sys.stdout.flush()
h = nbd.NBD()
h.connect_uri(uri)
stop = threading.Event()
class Control(http.client.HTTPConnection):
    # The server's control API only: a snapshot must never be taken by
    # anyone else once the server is gone.
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(ctl)
def snapshot(name):
    try:
        c = Control("localhost", timeout=60)
        c.request("POST", "/v1/volumes/c/snapshots", body=json.dumps({"name": name}),
                  headers={"Content-Type": "application/json"})
        return c.getresponse().status == 201
    except Exception:
        return False
def snapper():
    r2 = random.Random(seed + 7)
    n = 0
    while not stop.is_set():
        time.sleep(0.05 + r2.random() * 0.15)
        name = "%s-%d" % (rnd_name, n)
        n += 1
        out("S", "begin", name)
        if not snapshot(name):
            return
        out("S", "end", name)
        if r2.random() < 0.4:
            p = subprocess.run([vbd, "volume", "clone", "--store", store, "c@" + name, "k-" + name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if p.returncode == 0:
                out("C", name)
t = threading.Thread(target=snapper)
t.start()
i = 0
try:
    while True:
        r = rnd.random()
        if r < 0.06:
            out("I", "F"); h.flush(); out("A", "F")
        else:
            blk = rnd.randrange(nblocks)
            fua = 1 if rnd.random() < 0.15 else 0
            flags = nbd.CMD_FLAG_FUA if fua else 0
            if r < 0.10:
                out("I", "W", blk, 0, fua); h.zero(4096, blk * 4096, flags); out("A", "W", blk, 0, fua)
            else:
                tag = seed * 1000000 + i + 1
                out("I", "W", blk, tag, fua); h.pwrite(struct.pack("<QQ", tag, blk) * 256, blk * 4096, flags); out("A", "W", blk, tag, fua)
        i += 1
except Exception as e:
    out("E", e)
stop.set()
t.join()
"#;

/// A snapshot being taken: what it must hold at least, what it may hold.
struct Pending {
    floor: Vec<u64>,
    may: Vec<Vec<u64>>,
    ended: bool,
}

struct Rig {
    dir: TempDir,
    store: String,
    wal: String,
    nblocks: u64,
}

impl Rig {
    fn serve(&self) -> Vbd {
        Vbd::start(
            "lcc-srv",
            &[
                "--wal-dir",
                &self.wal,
                "--export",
                &format!("name=c,store={}", self.store),
            ],
        )
    }

    /// Tags of every block of a volume or snapshot, exported to a file.
    fn tags(&self, name: &str, what: &str) -> Vec<u64> {
        let out = self.dir.join("dump");
        let o = vbd_cmd(
            &[
                "volume",
                "export",
                "--store",
                &self.store,
                "--wal-dir",
                &self.wal,
                name,
                out.to_str().unwrap(),
            ],
            &[],
        );
        assert!(
            o.status.success(),
            "{what}: export of {name} failed: {}",
            o.stderr
        );
        let data = std::fs::read(&out).unwrap();
        (0..self.nblocks)
            .map(|b| {
                tag_of(&data[b as usize * 4096..(b as usize + 1) * 4096], b)
                    .unwrap_or_else(|| panic!("{what}: {name} block {b} is torn"))
            })
            .collect()
    }

    fn snapshots(&self) -> Vec<String> {
        let dir = self.dir.join("store/volumes/c/snapshots");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }
}

#[test]
fn snapshots_and_clones_survive_sigkill_rounds() {
    require_python_nbd();
    let dir = TempDir::new("lc-crash");
    let rig = Rig {
        store: format!("file://{}", dir.join("store").display()),
        wal: dir.join("wal").display().to_string(),
        nblocks: 1024,
        dir,
    };
    let o = vbd_cmd(
        &[
            "volume", "create", "--store", &rig.store, "c", "--size", "4M",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", o.stderr);
    let (seed0, mut next) = crash_seed();
    let n = rig.nblocks as usize;
    let mut head: HashMap<u64, Allowed> = HashMap::new();
    let mut last_acked = vec![0u64; n];
    let mut known: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut clones: Vec<String> = Vec::new();
    let mut v = rig.serve();
    let rounds = 12u64;
    let mut taken = 0;
    for round in 1..=rounds {
        let ctl = v.path("control.sock");
        let writer = Command::new(SYSTEM_PYTHON)
            .args([
                "-c",
                WRITER,
                &v.uri("c"),
                &(seed0 % 1000 + round).to_string(),
                &rig.nblocks.to_string(),
                env!("CARGO_BIN_EXE_vbd"),
                &rig.store,
                ctl.to_str().unwrap(),
                &format!("r{round}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start writer");
        std::thread::sleep(Duration::from_millis(400 + next() % 600));
        v.kill();
        let out = writer.wait_with_output().expect("writer output");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut in_flight: Vec<Option<u64>> = vec![None; n];
        let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["I", "W", blk, tag, _] => {
                    let (b, t): (u64, u64) = (blk.parse().unwrap(), tag.parse().unwrap());
                    head.entry(b).or_default().maybe.push(t);
                    in_flight[b as usize] = Some(t);
                    for p in pending.values_mut().filter(|p| !p.ended) {
                        p.may[b as usize].push(t);
                    }
                }
                ["A", "W", blk, tag, fua] => {
                    let (b, t): (u64, u64) = (blk.parse().unwrap(), tag.parse().unwrap());
                    last_acked[b as usize] = t;
                    in_flight[b as usize] = None;
                    if *fua == "1" {
                        let a = head.entry(b).or_default();
                        a.durable = t;
                        a.maybe.clear();
                    }
                }
                ["A", "F"] => {
                    for a in head.values_mut() {
                        if let Some(&last) = a.maybe.last() {
                            a.durable = last;
                            a.maybe.clear();
                        }
                    }
                }
                ["S", "begin", name] => {
                    let may = in_flight
                        .iter()
                        .map(|f| f.iter().copied().collect())
                        .collect();
                    pending.insert(
                        name.to_string(),
                        Pending {
                            floor: last_acked.clone(),
                            may,
                            ended: false,
                        },
                    );
                }
                ["S", "end", name] => {
                    if let Some(p) = pending.get_mut(*name) {
                        p.ended = true;
                    }
                }
                ["C", name] => clones.push(name.to_string()),
                _ => {}
            }
        }
        // Every few rounds, a clean stop and an offline collection that
        // deletes at once.
        if round % 4 == 0 {
            v = rig.serve();
            v.stop();
            let o = vbd_cmd(
                &[
                    "volume",
                    "gc",
                    "--store",
                    &rig.store,
                    "--wal-dir",
                    &rig.wal,
                    "c",
                ],
                &[],
            );
            assert!(o.status.success(), "gc: {}", o.stderr);
        }
        v = rig.serve();
        // The head: every durable write is there.
        let data = rig.tags("c", &format!("round {round} head"));
        for (blk, &tag) in data.iter().enumerate() {
            let a = head.entry(blk as u64).or_default();
            assert!(
                tag == a.durable || a.maybe.contains(&tag),
                "round {round}: block {blk} holds {tag}, must hold {} (or one of {:?})",
                a.durable,
                a.maybe
            );
            a.durable = tag;
            a.maybe.clear();
            last_acked[blk] = tag;
        }
        // Snapshots: new ones hold what was acknowledged before them,
        // old ones never change.
        let present = rig.snapshots();
        for (name, p) in &pending {
            assert!(
                !p.ended || present.contains(name),
                "round {round}: snapshot {name} was taken but is gone"
            );
        }
        for name in &present {
            let tags = rig.tags(&format!("c@{name}"), &format!("round {round}"));
            match (known.get(name), pending.get(name)) {
                (Some(before), _) => assert!(
                    *before == tags,
                    "round {round}: snapshot {name} changed after it was taken"
                ),
                (None, Some(p)) => {
                    for (blk, (tag, (floor, may))) in
                        tags.iter().zip(p.floor.iter().zip(&p.may)).enumerate()
                    {
                        assert!(
                            tag == floor || may.contains(tag),
                            "round {round}: snapshot {name} block {blk} holds {tag}, must hold {floor} (or one of {may:?})",
                        );
                    }
                    known.insert(name.clone(), tags);
                    taken += 1;
                }
                (None, None) => panic!("round {round}: snapshot {name} appeared from nowhere"),
            }
        }
        for c in &clones {
            let tags = rig.tags(&format!("k-{c}"), &format!("round {round} clone"));
            assert!(
                known[c] == tags,
                "round {round}: clone k-{c} differs from its snapshot"
            );
        }
    }
    assert!(taken >= rounds, "snapshots were taken: {taken}");
    assert!(!clones.is_empty(), "clones were made");
    v.stop();
}
