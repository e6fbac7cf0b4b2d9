//! The whole server in-process: a minimal NBD client and vbd's reactors
//! talk over a Unix socket, at queue depth 1 (latency) and 32 (pipelined
//! throughput), for 4 KiB reads and writes on a memory export.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vbd::nbd::client;
use vbd::nbd::wire::*;
use vbd::server::{Registry, Server, ServerConfig};
use vbd::test_support::TempDir;
use vbd::volume::memory::MemoryVolume;

struct Client {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(path: &std::path::Path) -> Client {
        let mut s = UnixStream::connect(path).expect("connect");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        // GO "m" with no info requests; simple replies.
        s.write_all(&client::option(OPT_GO, &client::go_data("m", &[])))
            .unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).unwrap();
            if typ == REP_ACK {
                break;
            }
        }
        Client { s, buf: Vec::new() }
    }

    /// Sends `depth` requests in one write, then reads all replies.
    fn batch(&mut self, cmd: u16, depth: usize, payload: &[u8]) {
        self.buf.clear();
        for i in 0..depth as u64 {
            client::put_request(&mut self.buf, false, 0, cmd, i, i * 4096, 4096);
            if cmd == CMD_WRITE {
                self.buf.extend_from_slice(payload);
            }
        }
        self.s.write_all(&self.buf).unwrap();
        let per = if cmd == CMD_READ { 16 + 4096 } else { 16 };
        self.buf.resize(per * depth, 0);
        self.s.read_exact(&mut self.buf).unwrap();
    }
}

fn loopback(c: &mut Criterion) {
    let dir = TempDir::new("loopback");
    let sock = dir.join("vbd.sock");
    let registry = Arc::new(Registry::new());
    registry
        .add("m", Arc::new(MemoryVolume::new(64 << 20, false)), false)
        .expect("export");
    let cfg = ServerConfig {
        unix: vec![sock.clone()],
        threads: 1,
        ..ServerConfig::default()
    };
    let server = Server::start(cfg, registry).expect("server");
    let mut client = Client::connect(&sock);
    let payload = vec![0x5au8; 4096];
    client.batch(CMD_WRITE, 32, &payload);
    let mut g = c.benchmark_group("loopback");
    for depth in [1usize, 32] {
        g.throughput(Throughput::Elements(depth as u64));
        g.bench_function(format!("read_4k_qd{depth}"), |b| {
            b.iter(|| client.batch(CMD_READ, depth, &[]))
        });
        g.bench_function(format!("write_4k_qd{depth}"), |b| {
            b.iter(|| client.batch(CMD_WRITE, depth, &payload))
        });
    }
    g.finish();
    drop(client);
    let _ = server.stop();
}

criterion_group!(benches, loopback);
criterion_main!(benches);
