//! The vhost-user control plane of one device: what each frontend message
//! does to the device's state, and when a virtqueue is handed to the
//! [`QueueRunner`] or taken back. The `vhost` crate decodes and validates
//! the messages and calls this through `VhostUserBackendReqHandlerMut`;
//! nothing here touches a socket.
//!
//! A queue runs while it is *started* (it has a kick fd; GET_VRING_BASE
//! stops it) and *enabled* (SET_VRING_ENABLE, or at SET_FEATURES when
//! PROTOCOL_FEATURES was not negotiated), and everything it needs is set.
//! Reconfiguring a running queue is refused, except for its call fd,
//! which restarts it.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VhostError, GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};

use super::config::{CONFIG_SIZE, DeviceConfig, MAX_QUEUE_SIZE, WCE_OFFSET};
use super::inflight::{self, InflightError, InflightRegion};
use super::memory::{MAX_MEM_SLOTS, MemoryError, MemoryTable, RegionSpec};
use super::metrics::DeviceMetrics;
use super::runner::{DeviceState, InflightQueue, QueueRunner, QueueStart, RunnerError};

/// Why a frontend request is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandlerError {
    #[error("the device already has an owner")]
    AlreadyOwned,
    #[error("features {0:#x} were never offered")]
    UnofferedFeatures(u64),
    #[error("features cannot change while queues run")]
    FeaturesWhileRunning,
    #[error("queue {0} does not exist (the device has {1})")]
    NoQueue(u32, u16),
    #[error("queue size {0} is not a power of two up to {MAX_QUEUE_SIZE}")]
    QueueSize(u32),
    #[error("ring base {0} does not fit 16 bits")]
    RingBase(u32),
    #[error("queue {0} cannot be reconfigured while it runs")]
    Running(u32),
    #[error("queue {0}: {1} arrived before {2}")]
    OutOfOrder(u32, &'static str, &'static str),
    #[error("queue {0}: polling without a kick fd is not supported")]
    NoKick(u8),
    #[error("config bytes {0}+{1} are outside the {CONFIG_SIZE}-byte config space")]
    ConfigRange(u32, u32),
    #[error("config write at {0}+{1}: only the 1-byte write-cache flag is writable")]
    ConfigWrite(u32, usize),
    #[error(
        "inflight area for {0} queues of {1}: the device has {2} queues of at most {MAX_QUEUE_SIZE}"
    )]
    InflightShape(u16, u16, u16),
    #[error("queue {0} of size {1} does not fit the inflight area's {2} descriptors")]
    InflightTooSmall(u16, u16, u16),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Inflight(#[from] InflightError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

impl From<HandlerError> for VhostError {
    fn from(e: HandlerError) -> Self {
        VhostError::ReqHandlerError(io::Error::other(e))
    }
}

/// One virtqueue's configuration as the frontend has set it so far.
#[derive(Debug, Default)]
struct VringConfig {
    size: Option<u16>,
    /// Descriptor table, avail ring, used ring (guest addresses).
    rings: Option<[GuestAddress; 3]>,
    base: u16,
    kick: Option<Arc<File>>,
    call: Option<Arc<File>>,
    err: Option<File>,
    started: bool,
    enabled: bool,
    running: bool,
}

/// A device's vhost-user state for the frontend attached now.
pub(crate) struct Handler<R: QueueRunner> {
    config: DeviceConfig,
    serial: [u8; 20],
    runner: R,
    owned: bool,
    acked: Option<u64>,
    protocol: VhostUserProtocolFeatures,
    memory: MemoryTable,
    vrings: Vec<VringConfig>,
    inflight: Option<Arc<InflightRegion>>,
    writeback: Arc<AtomicBool>,
    /// The disk's size in sectors: the device's (a resize changes it), not
    /// the frontend's, so a reset keeps it.
    capacity_sectors: Arc<AtomicU64>,
    /// Shared with the running queues; made when the first one starts.
    device: Option<Arc<DeviceState>>,
    /// Per-queue counters, handed to each queue as it starts.
    metrics: Arc<DeviceMetrics>,
}

impl<R: QueueRunner> Handler<R> {
    /// A device offering `config`, answering GET_ID with `serial`, whose
    /// queues count into `metrics`.
    pub(crate) fn new(
        config: DeviceConfig,
        serial: &str,
        runner: R,
        metrics: Arc<DeviceMetrics>,
    ) -> Self {
        let mut id = [0u8; 20];
        let n = serial.len().min(20);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let vrings = (0..config.num_queues)
            .map(|_| VringConfig::default())
            .collect();
        Handler {
            serial: id,
            runner,
            owned: false,
            acked: None,
            protocol: VhostUserProtocolFeatures::empty(),
            memory: MemoryTable::default(),
            vrings,
            inflight: None,
            writeback: Arc::new(AtomicBool::new(true)),
            capacity_sectors: Arc::new(AtomicU64::new(config.limits.capacity_sectors)),
            device: None,
            metrics,
            config,
        }
    }

    /// The disk's size in sectors, shared with the queues and GET_CONFIG.
    pub(crate) fn capacity_sectors(&self) -> Arc<AtomicU64> {
        self.capacity_sectors.clone()
    }

    /// Whether the frontend took the backend request channel
    /// (BACKEND_REQ), on which a resize is announced.
    pub(crate) fn backend_channel_acked(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
    }

    /// Stops every queue and forgets the frontend: for a disconnect or a
    /// reset. Returns the queues that could not be stopped cleanly.
    pub(crate) fn reset(&mut self) -> Vec<RunnerError> {
        let mut errors = Vec::new();
        for i in 0..self.vrings.len() {
            if self.vrings[i].running
                && let Err(e) = self.runner.stop(i as u16)
            {
                errors.push(e);
            }
        }
        for v in &mut self.vrings {
            *v = VringConfig::default();
        }
        self.owned = false;
        self.acked = None;
        self.protocol = VhostUserProtocolFeatures::empty();
        self.memory.clear();
        self.inflight = None;
        self.writeback.store(true, Ordering::Relaxed);
        self.device = None;
        errors
    }

    /// How many queues are being served now.
    pub(crate) fn running_queues(&self) -> usize {
        self.vrings.iter().filter(|v| v.running).count()
    }

    fn vring(&mut self, index: u32) -> Result<&mut VringConfig, HandlerError> {
        let n = self.config.num_queues;
        self.vrings
            .get_mut(index as usize)
            .ok_or(HandlerError::NoQueue(index, n))
    }

    fn idle_vring(&mut self, index: u32) -> Result<&mut VringConfig, HandlerError> {
        let v = self.vring(index)?;
        if v.running {
            return Err(HandlerError::Running(index));
        }
        Ok(v)
    }

    fn device_state(&mut self) -> Arc<DeviceState> {
        let limits = self.config.negotiated(self.acked.unwrap_or(0));
        self.device
            .get_or_insert_with(|| {
                Arc::new(DeviceState {
                    limits,
                    serial: self.serial,
                    writeback: self.writeback.clone(),
                    capacity_sectors: self.capacity_sectors.clone(),
                })
            })
            .clone()
    }

    /// Starts or stops queue `index` to match its configuration.
    fn sync(&mut self, index: usize) -> Result<(), HandlerError> {
        let v = &self.vrings[index];
        let should_run = v.started && v.enabled && self.acked.is_some() && !self.memory.is_empty();
        if v.running && !should_run {
            self.vrings[index].base = self.runner.stop(index as u16)?;
            self.vrings[index].running = false;
        } else if !v.running && should_run {
            let start = self.queue_start(index)?;
            self.runner.start(start)?;
            self.vrings[index].running = true;
        }
        Ok(())
    }

    fn queue_start(&mut self, index: usize) -> Result<QueueStart, HandlerError> {
        let i = index as u32;
        let v = &self.vrings[index];
        let size = v.size.ok_or(HandlerError::OutOfOrder(
            i,
            "SET_VRING_KICK",
            "SET_VRING_NUM",
        ))?;
        let [desc_table, avail_ring, used_ring] = v.rings.ok_or(HandlerError::OutOfOrder(
            i,
            "SET_VRING_KICK",
            "SET_VRING_ADDR",
        ))?;
        let kick = v.kick.clone().ok_or(HandlerError::NoKick(index as u8))?;
        let call = v.call.clone();
        let mut next_avail = v.base;
        let memory = self.memory.shared();
        let used_idx: u16 = used_ring
            .checked_add(2)
            .and_then(|a| memory.memory().read_obj(a).ok())
            .ok_or(RunnerError::InvalidQueue(index as u16))?;
        let mut resubmit = Vec::new();
        let mut tracked = None;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            && let Some(region) = &self.inflight
            && let Some(area) = region.area(index as u16)
        {
            if region.queue_size() < size {
                return Err(HandlerError::InflightTooSmall(
                    index as u16,
                    size,
                    region.queue_size(),
                ));
            }
            let r = inflight::recover(&area, size, used_idx);
            next_avail = r.next_avail;
            resubmit = r.resubmit;
            tracked = Some(InflightQueue {
                region: region.clone(),
                index: index as u16,
                next_counter: r.next_counter,
            });
        }
        let event_idx = self.acked.unwrap_or(0) & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let metrics = self
            .metrics
            .queue(index as u16)
            .ok_or(HandlerError::NoQueue(i, self.config.num_queues))?;
        Ok(QueueStart {
            index: index as u16,
            size,
            desc_table,
            avail_ring,
            used_ring,
            next_avail,
            next_used: used_idx,
            event_idx,
            kick,
            call,
            memory,
            inflight: tracked,
            resubmit,
            device: self.device_state(),
            metrics,
        })
    }

    fn sync_all(&mut self) -> Result<(), HandlerError> {
        for i in 0..self.vrings.len() {
            self.sync(i)?;
        }
        Ok(())
    }

    fn memory_changed(&mut self) -> Result<(), HandlerError> {
        self.runner.memory_changed();
        // A queue waiting only for memory starts now.
        self.sync_all()
    }
}

fn spec(r: &VhostUserMemoryRegion) -> RegionSpec {
    RegionSpec {
        guest_phys_addr: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

fn unsupported<T>(what: &'static str) -> VhostResult<T> {
    Err(HandlerError::Unsupported(what).into())
}

impl<R: QueueRunner> VhostUserBackendReqHandlerMut for Handler<R> {
    fn set_owner(&mut self) -> VhostResult<()> {
        if self.owned {
            return Err(HandlerError::AlreadyOwned.into());
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.reset()
            .into_iter()
            .next()
            .map_or(Ok(()), |e| Err(HandlerError::from(e).into()))
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.reset_owner()
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.config.features)
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let extra = features & !self.config.features;
        if extra != 0 {
            return Err(HandlerError::UnofferedFeatures(extra).into());
        }
        if self.running_queues() > 0 {
            return Err(HandlerError::FeaturesWhileRunning.into());
        }
        self.acked = Some(features);
        self.device = None;
        // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings are
        // enabled from here on.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for v in &mut self.vrings {
                v.enabled = true;
            }
        }
        self.sync_all()?;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let specs: Vec<RegionSpec> = ctx.iter().map(spec).collect();
        self.memory.set(&specs, files).map_err(HandlerError::from)?;
        self.memory_changed()?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let v = self.idle_vring(index)?;
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(HandlerError::QueueSize(num).into());
        }
        v.size = Some(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        self.idle_vring(index)?;
        if self.memory.is_empty() {
            return Err(HandlerError::OutOfOrder(index, "SET_VRING_ADDR", "SET_MEM_TABLE").into());
        }
        let t = |va| self.memory.to_guest(va).map_err(HandlerError::from);
        let rings = [t(descriptor)?, t(available)?, t(used)?];
        self.idle_vring(index)?.rings = Some(rings);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let v = self.idle_vring(index)?;
        v.base = u16::try_from(base).map_err(|_| HandlerError::RingBase(base))?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let v = self.vring(index)?;
        v.started = false;
        self.sync(index as usize)?;
        let v = self.vring(index)?;
        v.kick = None;
        v.call = None;
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let i = u32::from(index);
        let fd = fd.ok_or(HandlerError::NoKick(index))?;
        let was_running = self.vring(i)?.running;
        if was_running {
            // A new kick fd for a running queue: restart it on the new one.
            self.vring(i)?.started = false;
            self.sync(index.into())?;
        }
        let v = self.vring(i)?;
        v.kick = Some(Arc::new(fd));
        v.started = true;
        self.sync(index.into())?;
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let i = u32::from(index);
        let was_running = self.vring(i)?.running;
        if was_running {
            self.vring(i)?.started = false;
            self.sync(index.into())?;
            self.vring(i)?.started = true;
        }
        self.vring(i)?.call = fd.map(Arc::new);
        self.sync(index.into())?;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.vring(u32::from(index))?.err = fd;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(self.config.protocol_features)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        // REPLY_ACK is the vhost crate's own; anything else must be ours.
        let offered = self.config.protocol_features | VhostUserProtocolFeatures::REPLY_ACK;
        let f = VhostUserProtocolFeatures::from_bits(features)
            .filter(|f| offered.contains(*f))
            .ok_or(HandlerError::UnofferedFeatures(features))?;
        self.protocol = f;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.config.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.vring(index)?.enabled = enable;
        self.sync(index as usize)?;
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        let space = self.config.config_space(
            self.writeback.load(Ordering::Relaxed),
            self.capacity_sectors.load(Ordering::Relaxed),
        );
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= CONFIG_SIZE => Ok(space[start..end].to_vec()),
            _ => Err(HandlerError::ConfigRange(offset, size).into()),
        }
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        let wce_acked = self.acked.unwrap_or(0) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        match buf {
            [v @ (0 | 1)] if offset as usize == WCE_OFFSET && wce_acked => {
                self.writeback.store(*v == 1, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(HandlerError::ConfigWrite(offset, buf.len()).into()),
        }
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        unsupported("GPU_SET_SOCKET")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        unsupported("GET_SHARED_OBJECT")
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        let (n, q) = (inflight.num_queues, inflight.queue_size);
        if n > self.config.num_queues || q > MAX_QUEUE_SIZE {
            return Err(HandlerError::InflightShape(n, q, self.config.num_queues).into());
        }
        let (region, file) = InflightRegion::create(n, q).map_err(HandlerError::from)?;
        self.inflight = Some(Arc::new(region));
        let size = (inflight::queue_area_size(q) * usize::from(n)) as u64;
        Ok((VhostUserInflight::new(size, 0, n, q), file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        let (n, q) = (inflight.num_queues, inflight.queue_size);
        if n > self.config.num_queues || q > MAX_QUEUE_SIZE {
            return Err(HandlerError::InflightShape(n, q, self.config.num_queues).into());
        }
        if let Some(i) = self.vrings.iter().position(|v| v.running) {
            return Err(HandlerError::Running(i as u32).into());
        }
        let region = InflightRegion::map(file, inflight.mmap_offset, inflight.mmap_size, n, q)
            .map_err(HandlerError::from)?;
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        self.memory
            .add(spec(region), fd)
            .map_err(HandlerError::from)?;
        self.memory_changed()?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.memory
            .remove(region.guest_phys_addr, region.memory_size)
            .map_err(HandlerError::from)?;
        self.memory_changed()?;
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        unsupported("SET_DEVICE_STATE_FD")
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        unsupported("CHECK_DEVICE_STATE")
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        unsupported("GET_SHMEM_CONFIG")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        unsupported("SET_LOG_BASE")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::config::ExportCaps;

    /// Records what the handler asks of it.
    #[derive(Default)]
    struct Recorder {
        started: Vec<u16>,
    }

    impl QueueRunner for Recorder {
        fn start(&mut self, q: QueueStart) -> Result<(), RunnerError> {
            self.started.push(q.index);
            Ok(())
        }
        fn stop(&mut self, _index: u16) -> Result<u16, RunnerError> {
            Ok(7)
        }
    }

    fn handler() -> Handler<Recorder> {
        let caps = ExportCaps {
            size_bytes: 1 << 20,
            block_size: 512,
            read_only: false,
            flush: true,
            trim: true,
            write_zeroes: true,
            num_queues: 2,
        };
        let config = DeviceConfig::new(&caps).unwrap();
        let metrics = Arc::new(DeviceMetrics::new(config.num_queues));
        Handler::new(config, "serial", Recorder::default(), metrics)
    }

    #[test]
    fn config_reads_stay_inside_the_config_space() {
        let mut h = handler();
        let f = VhostUserConfigFlags::WRITABLE;
        assert_eq!(h.get_config(0, 96, f).unwrap().len(), 96);
        assert_eq!(h.get_config(34, 2, f).unwrap(), [2, 0], "num_queues");
        assert!(h.get_config(90, 16, f).is_err());
        assert!(h.get_config(u32::MAX, 2, f).is_err());
    }

    #[test]
    fn only_the_write_cache_flag_is_writable_and_only_once_negotiated() {
        let mut h = handler();
        let f = VhostUserConfigFlags::WRITABLE;
        let wce = WCE_OFFSET as u32;
        assert!(h.set_config(wce, &[0], f).is_err(), "CONFIG_WCE not acked");
        let all = h.get_features().unwrap();
        h.set_features(all).unwrap();
        h.set_config(wce, &[0], f).unwrap();
        assert_eq!(h.get_config(wce, 1, f).unwrap(), [0]);
        assert!(h.set_config(wce, &[2], f).is_err());
        assert!(h.set_config(0, &[0; 8], f).is_err());
        assert!(h.set_config(wce, &[1, 0], f).is_err());
    }

    #[test]
    fn queues_wait_for_everything_they_need() {
        let mut h = handler();
        let all = h.get_features().unwrap();
        h.set_features(all).unwrap();
        h.set_vring_num(0, 16).unwrap();
        // Enabled and kicked, but no memory and no ring addresses yet.
        h.set_vring_enable(0, true).unwrap();
        let kick = tempfile_like();
        assert!(h.set_vring_kick(0, Some(kick)).is_ok());
        assert!(h.runner.started.is_empty());
        assert!(matches!(
            h.set_vring_addr(0, VhostUserVringAddrFlags::empty(), 0, 0, 0, 0),
            Err(VhostError::ReqHandlerError(_))
        ));
        assert!(h.set_vring_num(5, 16).is_err());
        assert!(h.set_vring_base(0, 1 << 16).is_err());
        // GET_VRING_BASE on a queue that never ran returns its base.
        h.set_vring_base(0, 3).unwrap();
        let state = h.get_vring_base(0).unwrap();
        assert_eq!({ state.num }, 3);
    }

    fn tempfile_like() -> File {
        // Any fd will do: the recorder never reads it.
        File::open("/dev/null").unwrap()
    }
}
