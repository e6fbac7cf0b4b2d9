//! vbd's integration tests, linked into one test binary: one module per
//! area, sharing the harness in `common` (the real `vbd` binary, external
//! tools with deadlines, byte-exact comparisons) and `vm_common` (QEMU and
//! test guests). One binary links the library and its dependencies once
//! instead of once per file.
//!
//! To add tests for a new area, write `tests/it/AREA.rs` (a `//!` line
//! saying what it covers, `use crate::common::*;` for the harness) and add
//! `mod AREA;` below. Run one area with `cargo test --test it AREA::`, one
//! test with `cargo test --test it AREA::NAME -- --exact`.
//!
//! Tests of different areas now run side by side (two at a time on two
//! cores, as the tests of one file always did): anything process-wide, such
//! as a TCG guest, is serialised through `vm_common::one_guest`.

mod ceph_common;
mod common;
mod crash_common;
mod stores;
mod vm_common;

mod activation;
mod bench_smoke;
mod ceph_rgw;
mod clients;
mod fuzz_corpus;
mod handoff;
mod kernel_nbd_client;
mod large_requests;
mod lifecycle;
mod lifecycle_crash;
mod lifecycle_vm;
mod limits;
mod metrics;
mod object;
mod object_faults;
mod raw_protocol;
mod serve_errors;
mod soak;
mod systemd_units;
mod tls;
mod tls_keys;
mod vhost_frontend;
mod vhost_guest;
mod vm_guest;
mod vm_qmp;
mod vm_restart;
mod vm_supervisor;
