//! What the device offers: virtio and vhost-user feature bits and the
//! virtio-blk config space, as pure functions of the export's capabilities.

use std::mem::{offset_of, size_of};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, virtio_blk_config,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio-blk addresses the disk in 512-byte sectors whatever its block size.
pub const SECTOR_SIZE: u64 = 512;

/// Largest virtqueue a frontend may configure (QEMU's `VIRTQUEUE_MAX_SIZE`):
/// bounds every per-queue table the backend allocates at queue start.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Most queues one device serves; QEMU refuses a `num-queues` above what
/// the backend reports, so this bounds what a VM can ask for.
pub const MAX_QUEUES: u16 = 64;

/// Bytes of config space served: the whole `virtio_blk_config` (96 bytes,
/// zoned fields included and left zero because ZONED is never offered).
pub const CONFIG_SIZE: usize = size_of::<virtio_blk_config>();

/// Data segments per request (`seg_max`): QEMU's default queue size (128)
/// minus the header and status descriptors, which Linux also requires
/// when indirect descriptors are not in use.
pub const SEG_MAX: u32 = 126;

/// Largest data segment (`size_max`), so one request moves at most
/// `SEG_MAX * SIZE_MAX` bytes and per-request buffers have a bound.
pub const SIZE_MAX: u32 = 1 << 20;

/// Segments per DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 16;

/// Sectors per DISCARD or WRITE_ZEROES segment: 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// The export as the device sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportCaps {
    /// Size in bytes; the capacity advertised is this rounded down to sectors.
    pub size_bytes: u64,
    /// The volume's block size: offsets and lengths must be multiples of it.
    pub block_size: u32,
    /// Refuse writes: the device offers VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// FLUSH makes completed writes durable (also turns on CONFIG_WCE).
    pub flush: bool,
    /// The volume can discard ranges (offers DISCARD).
    pub trim: bool,
    /// The volume can zero ranges (offers WRITE_ZEROES).
    pub write_zeroes: bool,
    /// Virtqueues offered (at least 1, at most [`MAX_QUEUES`]).
    pub num_queues: u16,
}

/// The limits the request parser enforces: exactly what the config space
/// tells the driver, so a driver that follows it is never refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors, whole blocks only.
    pub capacity_sectors: u64,
    /// Logical block size in bytes (a power of two, at least 512).
    pub block_size: u32,
    /// Data descriptors per request.
    pub seg_max: u32,
    /// Bytes per data descriptor.
    pub size_max: u32,
    /// Writes, discards and zeroing are refused.
    pub read_only: bool,
    /// FLUSH was negotiated.
    pub flush: bool,
    /// DISCARD was negotiated.
    pub discard: bool,
    /// WRITE_ZEROES was negotiated.
    pub write_zeroes: bool,
    /// Ranges per DISCARD request.
    pub max_discard_seg: u32,
    /// Sectors per DISCARD range.
    pub max_discard_sectors: u32,
    /// Ranges per WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
    /// Sectors per WRITE_ZEROES range.
    pub max_write_zeroes_sectors: u32,
    /// WRITE_ZEROES may carry the UNMAP flag.
    pub write_zeroes_may_unmap: bool,
}

/// Everything negotiation needs, computed once per export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Virtio feature bits offered (vhost-user's PROTOCOL_FEATURES included).
    pub features: u64,
    /// vhost-user protocol features offered.
    pub protocol_features: VhostUserProtocolFeatures,
    /// Virtqueues offered (the config space's `num_queues`).
    pub num_queues: u16,
    /// Limits with every offered feature acked; see [`DeviceConfig::negotiated`].
    pub limits: Limits,
}

/// Why an export cannot be offered as a virtio-blk device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The volume's block size cannot be a virtio-blk logical block size.
    #[error("block size {0} is not a power of two between 1 and 64 KiB")]
    BlockSize(u32),
    /// Zero queues, or more than a device offers.
    #[error("{0} queues requested; a vhost-user-blk device serves 1 to {MAX_QUEUES}")]
    Queues(u16),
    /// The volume holds no whole block, so the disk would have no sectors.
    #[error("size {0} bytes is smaller than one {1}-byte block")]
    TooSmall(u64, u32),
}

impl ExportCaps {
    /// What `volume` supports, served over `num_queues` queues.
    pub fn of(volume: &dyn crate::volume::Volume, num_queues: u16) -> Self {
        let c = volume.caps();
        ExportCaps {
            size_bytes: volume.size(),
            block_size: volume.block_size(),
            read_only: c.read_only,
            flush: c.flush,
            trim: c.trim,
            write_zeroes: c.write_zeroes,
            num_queues,
        }
    }
}

fn bit(b: u32) -> u64 {
    1 << b
}

/// The sectors a disk of `size_bytes` advertises with `block_size`-byte
/// blocks: whole blocks only, since a partial last block could be neither
/// read nor written with aligned I/O.
pub fn whole_block_sectors(size_bytes: u64, block_size: u32) -> u64 {
    let block = u64::from(block_size.max(SECTOR_SIZE as u32));
    size_bytes / block * (block / SECTOR_SIZE)
}

impl DeviceConfig {
    /// What to offer for `caps`.
    pub fn new(caps: &ExportCaps) -> Result<Self, ConfigError> {
        let bs = caps.block_size;
        if bs == 0 || !bs.is_power_of_two() || bs > 65536 {
            return Err(ConfigError::BlockSize(bs));
        }
        if caps.num_queues == 0 || caps.num_queues > MAX_QUEUES {
            return Err(ConfigError::Queues(caps.num_queues));
        }
        // virtio-blk cannot describe blocks below a sector.
        let block_size = bs.max(SECTOR_SIZE as u32);
        let capacity_sectors = whole_block_sectors(caps.size_bytes, block_size);
        if capacity_sectors == 0 {
            return Err(ConfigError::TooSmall(caps.size_bytes, block_size));
        }
        let writable = !caps.read_only;
        let limits = Limits {
            capacity_sectors,
            block_size,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
            read_only: caps.read_only,
            flush: caps.flush,
            discard: writable && caps.trim,
            write_zeroes: writable && caps.write_zeroes,
            max_discard_seg: MAX_DISCARD_SEG,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            // Zeroing by unmapping needs trim underneath.
            write_zeroes_may_unmap: writable && caps.write_zeroes && caps.trim,
        };
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_MQ);
        if caps.flush {
            features |= bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_CONFIG_WCE);
        }
        if caps.read_only {
            features |= bit(VIRTIO_BLK_F_RO);
        }
        if limits.discard {
            features |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if limits.write_zeroes {
            features |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        Ok(DeviceConfig {
            features,
            protocol_features: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                // The channel a resize is announced on (CONFIG_CHANGE_MSG).
                | VhostUserProtocolFeatures::BACKEND_REQ,
            num_queues: caps.num_queues,
            limits,
        })
    }

    /// The limits in force once the driver acked `acked` (a feature the
    /// driver did not ack is refused as unsupported).
    pub fn negotiated(&self, acked: u64) -> Limits {
        let mut l = self.limits;
        l.flush &= acked & bit(VIRTIO_BLK_F_FLUSH) != 0;
        l.discard &= acked & bit(VIRTIO_BLK_F_DISCARD) != 0;
        l.write_zeroes &= acked & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0;
        l
    }

    /// The config space, with the write cache in `writeback` mode or not,
    /// and `capacity_sectors` (the disk's size now: a resize changes it).
    pub fn config_space(&self, writeback: bool, capacity_sectors: u64) -> [u8; CONFIG_SIZE] {
        type C = virtio_blk_config;
        let l = &self.limits;
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(offset_of!(C, capacity), &capacity_sectors.to_le_bytes());
        put(offset_of!(C, size_max), &l.size_max.to_le_bytes());
        put(offset_of!(C, seg_max), &l.seg_max.to_le_bytes());
        put(offset_of!(C, blk_size), &l.block_size.to_le_bytes());
        // One logical block per physical block, no offset, no I/O hints.
        put(offset_of!(C, min_io_size), &1u16.to_le_bytes());
        put(offset_of!(C, wce), &[u8::from(writeback)]);
        put(offset_of!(C, num_queues), &self.num_queues.to_le_bytes());
        if l.discard {
            put(
                offset_of!(C, max_discard_sectors),
                &l.max_discard_sectors.to_le_bytes(),
            );
            put(
                offset_of!(C, max_discard_seg),
                &l.max_discard_seg.to_le_bytes(),
            );
            let align = l.block_size / SECTOR_SIZE as u32;
            put(
                offset_of!(C, discard_sector_alignment),
                &align.to_le_bytes(),
            );
        }
        if l.write_zeroes {
            put(
                offset_of!(C, max_write_zeroes_sectors),
                &l.max_write_zeroes_sectors.to_le_bytes(),
            );
            put(
                offset_of!(C, max_write_zeroes_seg),
                &l.max_write_zeroes_seg.to_le_bytes(),
            );
            put(
                offset_of!(C, write_zeroes_may_unmap),
                &[u8::from(l.write_zeroes_may_unmap)],
            );
        }
        c
    }
}

/// Offset of the one config byte a driver may write (`wce`, with CONFIG_WCE).
pub const WCE_OFFSET: usize = offset_of!(virtio_blk_config, wce);

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> ExportCaps {
        ExportCaps {
            size_bytes: 64 << 20,
            block_size: 4096,
            read_only: false,
            flush: true,
            trim: true,
            write_zeroes: true,
            num_queues: 2,
        }
    }

    fn le32(c: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(c[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn full_featured_export() {
        let d = DeviceConfig::new(&caps()).unwrap();
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            30, // VHOST_USER_F_PROTOCOL_FEATURES
        ] {
            assert_ne!(d.features & bit(b), 0, "feature bit {b}");
        }
        assert_eq!(d.features & bit(VIRTIO_BLK_F_RO), 0);
        let p = d.protocol_features;
        for f in [
            VhostUserProtocolFeatures::MQ,
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::REPLY_ACK,
            VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            VhostUserProtocolFeatures::BACKEND_REQ,
        ] {
            assert!(p.contains(f), "{f:?}");
        }
        let c = d.config_space(true, d.limits.capacity_sectors);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (64 << 20) / 512
        );
        assert_eq!(le32(&c, 8), SIZE_MAX);
        assert_eq!(le32(&c, 12), SEG_MAX);
        assert_eq!(le32(&c, 20), 4096);
        assert_eq!(c[32], 1, "writeback");
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
        assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 40), MAX_DISCARD_SEG);
        assert_eq!(le32(&c, 44), 8, "discard alignment in sectors");
        assert_eq!(le32(&c, 48), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 52), MAX_DISCARD_SEG);
        assert_eq!(c[56], 1, "write_zeroes_may_unmap");
        assert_eq!(d.config_space(false, 1)[32], 0, "writethrough");
        assert_eq!(CONFIG_SIZE, 96);
    }

    #[test]
    fn read_only_export_offers_no_writes() {
        let d = DeviceConfig::new(&ExportCaps {
            read_only: true,
            ..caps()
        })
        .unwrap();
        assert_ne!(d.features & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(d.features & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(d.features & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert!(d.limits.read_only && !d.limits.discard && !d.limits.write_zeroes);
        let c = d.config_space(true, d.limits.capacity_sectors);
        assert!(c[36..60].iter().all(|&b| b == 0), "no discard limits");
    }

    #[test]
    fn missing_capabilities_are_not_offered() {
        let d = DeviceConfig::new(&ExportCaps {
            flush: false,
            trim: false,
            write_zeroes: true,
            ..caps()
        })
        .unwrap();
        assert_eq!(d.features & bit(VIRTIO_BLK_F_FLUSH), 0);
        assert_eq!(d.features & bit(VIRTIO_BLK_F_CONFIG_WCE), 0);
        assert_eq!(d.features & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(d.features & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert!(!d.limits.write_zeroes_may_unmap, "unmap needs trim");
    }

    #[test]
    fn small_blocks_become_sectors_and_capacity_rounds_down() {
        let d = DeviceConfig::new(&ExportCaps {
            size_bytes: 10_000,
            block_size: 1,
            ..caps()
        })
        .unwrap();
        assert_eq!(d.limits.block_size, 512);
        assert_eq!(d.limits.capacity_sectors, 19);
        let d = DeviceConfig::new(&ExportCaps {
            size_bytes: 3 * 4096 + 4095,
            ..caps()
        })
        .unwrap();
        assert_eq!(d.limits.capacity_sectors, 24, "whole 4 KiB blocks only");
        // A resize counts the same way.
        assert_eq!(whole_block_sectors(3 * 4096 + 4095, 4096), 24);
        assert_eq!(whole_block_sectors(10_000, 1), 19);
        assert_eq!(whole_block_sectors(4095, 4096), 0);
    }

    #[test]
    fn bad_exports_are_refused() {
        for (c, e) in [
            (
                ExportCaps {
                    block_size: 3000,
                    ..caps()
                },
                ConfigError::BlockSize(3000),
            ),
            (
                ExportCaps {
                    num_queues: 0,
                    ..caps()
                },
                ConfigError::Queues(0),
            ),
            (
                ExportCaps {
                    num_queues: MAX_QUEUES + 1,
                    ..caps()
                },
                ConfigError::Queues(MAX_QUEUES + 1),
            ),
            (
                ExportCaps {
                    size_bytes: 4095,
                    ..caps()
                },
                ConfigError::TooSmall(4095, 4096),
            ),
        ] {
            assert_eq!(DeviceConfig::new(&c), Err(e));
        }
    }

    #[test]
    fn negotiation_keeps_only_what_the_driver_acked() {
        let d = DeviceConfig::new(&caps()).unwrap();
        let l = d.negotiated(d.features & !bit(VIRTIO_BLK_F_DISCARD));
        assert!(l.flush && !l.discard && l.write_zeroes);
        let l = d.negotiated(0);
        assert!(!l.flush && !l.discard && !l.write_zeroes);
    }
}
