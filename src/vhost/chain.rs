//! A descriptor chain from a head index the avail ring no longer names:
//! what re-submitting an inflight request after a reconnect needs.
//! `virtio_queue::DescriptorChain` walks the same way but can only be had
//! from the avail ring, so this mirrors its rules exactly (length bounded
//! by the table, one level of indirection, at most 4 GiB in total); the
//! `virtio_blk` fuzz target checks that both yield the same descriptors.

use std::mem::size_of;

use virtio_bindings::virtio_ring::VRING_DESC_ALIGN_SIZE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// The descriptors of the chain starting at `head` in a split queue's
/// descriptor table. Ends early, like `DescriptorChain`, on anything
/// malformed; the parser notices from the last descriptor's NEXT flag.
pub(crate) struct Chain<'a, M> {
    mem: &'a M,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    yielded_bytes: u32,
    indirect: bool,
}

impl<'a, M: GuestMemoryBackend> Chain<'a, M> {
    /// The chain at `head` of the table at `table` with `queue_size` entries.
    pub(crate) fn new(mem: &'a M, table: GuestAddress, queue_size: u16, head: u16) -> Self {
        Chain {
            mem,
            table,
            size: queue_size,
            next: head,
            ttl: queue_size,
            yielded_bytes: 0,
            indirect: false,
        }
    }
}

impl<M: GuestMemoryBackend> Iterator for Chain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        // At most two rounds: the second follows an indirect descriptor.
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let at = self
                .table
                .checked_add(u64::from(self.next) * size_of::<Descriptor>() as u64)?;
            let desc: Descriptor = self.mem.read_obj(at).ok()?;
            if desc.refers_to_indirect_table() {
                if self.indirect || desc.len() & (VRING_DESC_ALIGN_SIZE - 1) != 0 {
                    return None;
                }
                let len = desc.len() / VRING_DESC_ALIGN_SIZE;
                self.size = u16::try_from(len).ok()?;
                self.table = desc.addr();
                self.next = 0;
                self.ttl = self.size;
                self.indirect = true;
                continue;
            }
            self.yielded_bytes = self.yielded_bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    fn put(m: &GuestMemoryMmap, table: u64, i: u16, d: Descriptor) {
        m.write_obj(d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    #[test]
    fn walks_direct_and_indirect_chains_and_stops_on_loops() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        put(&m, 0, 3, Descriptor::new(0x1000, 16, NEXT, 5));
        put(&m, 0, 5, Descriptor::new(0x2000, 512, 0, 0));
        let lens: Vec<u32> = Chain::new(&m, GuestAddress(0), 8, 3)
            .map(|d| d.len())
            .collect();
        assert_eq!(lens, [16, 512]);

        // An indirect table of two at 0x3000.
        put(
            &m,
            0,
            1,
            Descriptor::new(0x3000, 32, VRING_DESC_F_INDIRECT as u16, 0),
        );
        put(&m, 0x3000, 0, Descriptor::new(0x1000, 16, NEXT, 1));
        put(&m, 0x3000, 1, Descriptor::new(0x4000, 1, 2, 0));
        let lens: Vec<u32> = Chain::new(&m, GuestAddress(0), 8, 1)
            .map(|d| d.len())
            .collect();
        assert_eq!(lens, [16, 1]);

        // A loop ends after queue-size descriptors, the last one still NEXT.
        put(&m, 0, 6, Descriptor::new(0x1000, 16, NEXT, 6));
        let c: Vec<_> = Chain::new(&m, GuestAddress(0), 8, 6).collect();
        assert_eq!(c.len(), 8);
        assert!(c[7].has_next());
        // A head beyond the table yields nothing.
        assert_eq!(Chain::new(&m, GuestAddress(0), 8, 8).count(), 0);
    }
}
