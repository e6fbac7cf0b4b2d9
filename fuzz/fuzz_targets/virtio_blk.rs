#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vbd::vhost::fuzz::virtio_blk(data));
