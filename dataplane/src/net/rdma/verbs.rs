//! RDMA verbs through `sideway`, shared by the daemon and the client: devices, memory
//! registration, completion queues with a wake-up fd, and reliable-connected queue pairs.
//!
//! `sideway` loads libibverbs at run time, so the same binary runs where there is no rdma-core
//! and no RDMA in the kernel: there, listing devices fails with ENOSYS, which means "no
//! devices" and never an error worth more than a log line.

use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use rdma_mummy_sys as sys;
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue as _, GenericCompletionQueue,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList, GetDeviceListErrorKind};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    ExtendedQueuePair, PostSendGuard as _, QueuePair, QueuePairAttribute, QueuePairState,
    SetScatterGatherEntry as _, WorkRequestFlags,
};

use crate::net::wire::RdmaEndpoint;

/// Requests one side may have outstanding on a queue pair unless the peer offers fewer.
pub const DEFAULT_CREDITS: u32 = 32;
/// Bytes of one message slot: a request or reply frame (header and a small body; error texts
/// are cut to fit) travels in one SEND of at most this size.
pub const MESSAGE_SLOT: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("no RDMA device{0}")]
    NoDevice(String),
    #[error("RDMA unavailable: {0}")]
    Unavailable(String),
    #[error("RDMA device {device}: {what}: {reason}")]
    Verbs {
        device: String,
        what: &'static str,
        reason: String,
    },
    #[error("RDMA peer endpoint is unusable: {0}")]
    BadEndpoint(String),
}

/// The names of the RDMA devices present (`mlx5_0`, `rxe0`); empty where there are none,
/// including on a kernel without RDMA (ENOSYS).
pub fn device_names() -> Result<Vec<String>, RdmaError> {
    Ok(device_list()?
        .map(|list| list.iter().map(|device| device.name()).collect())
        .unwrap_or_default())
}

fn device_list() -> Result<Option<DeviceList>, RdmaError> {
    match DeviceList::new() {
        Ok(list) => Ok(Some(list)),
        Err(error) => {
            let errno = match &error.0 {
                GetDeviceListErrorKind::Ibverbs(io) => io.raw_os_error(),
                _ => None,
            };
            match errno {
                // The kernel has no RDMA at all (no ib_uverbs): zero devices.
                Some(libc::ENOSYS) | Some(libc::ENOENT) => Ok(None),
                _ => Err(RdmaError::Unavailable(format!(
                    "listing RDMA devices: {} (is libibverbs installed?)",
                    crate::error_chain(&error)
                ))),
            }
        }
    }
}

/// An opened device, its port and GID, and one protection domain: everything memory
/// registrations and queue pairs hang off.
pub struct RdmaDevice {
    name: String,
    pd: Arc<ProtectionDomain>,
    context: Arc<DeviceContext>,
    port: u8,
    gid_index: u32,
    gid: Gid,
    lid: u16,
    mtu: Mtu,
}

impl std::fmt::Debug for RdmaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaDevice")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("gid", &self.gid.to_string())
            .field("mtu", &mtu_bytes(self.mtu))
            .finish()
    }
}

impl RdmaDevice {
    /// Opens `name`, or the first device when `None`. The GID is the one RoCE v2 routes with
    /// (an IPv4-mapped one first), unless `TIER0_RDMA_GID_INDEX` names one.
    pub fn open(name: Option<&str>) -> Result<Arc<RdmaDevice>, RdmaError> {
        let Some(list) = device_list()? else {
            return Err(RdmaError::NoDevice(
                " (this kernel has no RDMA support)".into(),
            ));
        };
        let device = match name {
            Some(wanted) => list
                .iter()
                .find(|device| device.name() == wanted)
                .ok_or_else(|| RdmaError::NoDevice(format!(" named {wanted}")))?,
            None => list
                .iter()
                .next()
                .ok_or_else(|| RdmaError::NoDevice(String::new()))?,
        };
        let name = device.name();
        let verbs = |what: &'static str| {
            let name = name.clone();
            move |error: &dyn std::fmt::Display| RdmaError::Verbs {
                device: name.clone(),
                what,
                reason: error.to_string(),
            }
        };
        let context = device
            .open()
            .map_err(|error| verbs("opening")(&crate::error_chain(&error)))?;
        let port = 1;
        let port_attr = context
            .query_port(port)
            .map_err(|error| verbs("querying port 1")(&crate::error_chain(&error)))?;
        let (gid_index, gid) = choose_gid(&context, port).map_err(|reason| RdmaError::Verbs {
            device: name.clone(),
            what: "choosing a GID",
            reason,
        })?;
        let pd = context.alloc_pd().map_err(|error| {
            verbs("allocating a protection domain")(&crate::error_chain(&error))
        })?;
        Ok(Arc::new(RdmaDevice {
            name,
            pd,
            context,
            port,
            gid_index,
            gid,
            lid: port_attr.lid(),
            mtu: port_attr.active_mtu(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn gid_index(&self) -> u32 {
        self.gid_index
    }

    /// Registers `len` bytes at `addr` for local writes (the device fills them) and, with
    /// `remote_write`, for peers' RDMA WRITEs.
    ///
    /// # Safety
    /// The memory must stay mapped while the region lives, and with `remote_write` the caller
    /// must expect it to change under it while a peer may write.
    pub unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        remote_write: bool,
    ) -> Result<Arc<MemoryRegion>, RdmaError> {
        let mut access = AccessFlags::LocalWrite;
        if remote_write {
            access |= AccessFlags::RemoteWrite;
        }
        // SAFETY: the caller keeps the memory mapped for the region's life.
        unsafe { self.pd.reg_mr(addr as usize, len, access) }.map_err(|error| RdmaError::Verbs {
            device: self.name.clone(),
            what: "registering memory",
            reason: format!("{} ({len} bytes)", crate::error_chain(&error)),
        })
    }

    /// A completion queue of `entries` entries, with a completion channel to sleep on.
    pub fn completion_queue(&self, entries: u32) -> Result<Completions, RdmaError> {
        let verbs = |what: &'static str| {
            let device = self.name.clone();
            move |reason: String| RdmaError::Verbs {
                device,
                what,
                reason,
            }
        };
        let channel = CompletionChannel::new(&self.context)
            .map_err(|error| verbs("creating a completion channel")(crate::error_chain(&error)))?;
        channel
            .set_nonblocking(true)
            .map_err(|error| verbs("creating a completion channel")(error.to_string()))?;
        let cq = self
            .context
            .create_cq_builder()
            .setup_cqe(entries)
            .setup_comp_channel(&channel, 0)
            .build()
            .map_err(|error| verbs("creating a completion queue")(crate::error_chain(&error)))?;
        Ok(Completions { cq, channel })
    }

    /// A reliable-connected queue pair on `cq` (send and receive), in the INIT state.
    pub fn queue_pair(
        &self,
        cq: &CompletionQueueHandle,
        send_depth: u32,
        recv_depth: u32,
        remote_write: bool,
    ) -> Result<ExtendedQueuePair, RdmaError> {
        self.queue_pair_on(cq, cq, send_depth, recv_depth, remote_write)
    }

    /// A reliable-connected queue pair whose sends complete on `send_cq` and receives on
    /// `recv_cq`, in the INIT state.
    pub fn queue_pair_on(
        &self,
        send_cq: &CompletionQueueHandle,
        recv_cq: &CompletionQueueHandle,
        send_depth: u32,
        recv_depth: u32,
        remote_write: bool,
    ) -> Result<ExtendedQueuePair, RdmaError> {
        let error = |what: &'static str| {
            let device = self.name.clone();
            move |reason: String| RdmaError::Verbs {
                device,
                what,
                reason,
            }
        };
        let mut qp = self
            .pd
            .create_qp_builder()
            .setup_send_cq(GenericCompletionQueue::from(send_cq.0.clone()))
            .setup_recv_cq(GenericCompletionQueue::from(recv_cq.0.clone()))
            .setup_max_send_wr(send_depth)
            .setup_max_recv_wr(recv_depth)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .build_ex()
            .map_err(|e| error("creating a queue pair")(crate::error_chain(&e)))?;
        let mut access = AccessFlags::LocalWrite;
        if remote_write {
            access |= AccessFlags::RemoteWrite;
        }
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            .setup_access_flags(access);
        qp.modify(&attr)
            .map_err(|e| error("moving a queue pair to INIT")(crate::error_chain(&e)))?;
        Ok(qp)
    }

    /// This side of `qp`, for the peer.
    pub fn endpoint(&self, qp: &ExtendedQueuePair, psn: u32, credits: u32) -> RdmaEndpoint {
        RdmaEndpoint {
            lid: self.lid,
            qp_number: qp.qp_number(),
            psn: psn & 0xFF_FFFF,
            gid: self.gid.raw,
            mtu: mtu_bytes(self.mtu),
            credits,
        }
    }

    /// Connects `qp` (INIT) to the peer's endpoint: INIT → RTR → RTS. A dead peer is noticed
    /// after about half a second of retries (timeout 14 ≈ 67 ms, 7 retries).
    pub fn connect(
        &self,
        qp: &mut ExtendedQueuePair,
        local_psn: u32,
        remote: &RdmaEndpoint,
    ) -> Result<(), RdmaError> {
        let mtu = mtu_from_bytes(remote.mtu).ok_or_else(|| {
            RdmaError::BadEndpoint(format!("path MTU {} is not 256..4096", remote.mtu))
        })?;
        if remote.qp_number == 0 || remote.qp_number > 0xFF_FFFF {
            return Err(RdmaError::BadEndpoint(format!(
                "queue pair number {:#x} is out of range",
                remote.qp_number
            )));
        }
        let path_mtu = if (mtu as u32) < (self.mtu as u32) {
            mtu
        } else {
            self.mtu
        };
        let error = |what: &'static str| {
            let device = self.name.clone();
            move |e: sideway::ibverbs::queue_pair::ModifyQueuePairError| RdmaError::Verbs {
                device,
                what,
                reason: crate::error_chain(&e),
            }
        };
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(remote.lid)
            .setup_port(self.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(self.gid_index as u8)
            .setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_hop_limit(64);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(path_mtu)
            .setup_dest_qp_num(remote.qp_number)
            .setup_rq_psn(remote.psn & 0xFF_FFFF)
            .setup_max_dest_read_atomic(1)
            .setup_min_rnr_timer(12)
            .setup_address_vector(&ah);
        qp.modify(&attr)
            .map_err(error("moving a queue pair to RTR"))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(local_psn & 0xFF_FFFF)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(1);
        qp.modify(&attr)
            .map_err(error("moving a queue pair to RTS"))?;
        Ok(())
    }
}

/// The GID to route with: `TIER0_RDMA_GID_INDEX` if set; else RoCE v2 with an IPv4-mapped
/// address, then any RoCE v2, then InfiniBand, then index 0.
fn choose_gid(context: &Arc<DeviceContext>, port: u8) -> Result<(u32, Gid), String> {
    if let Ok(index) = std::env::var("TIER0_RDMA_GID_INDEX") {
        let index: u32 = index
            .parse()
            .map_err(|_| format!("TIER0_RDMA_GID_INDEX={index:?} is not a number"))?;
        let gid = context
            .query_gid(port, index)
            .map_err(|error| format!("GID index {index}: {}", crate::error_chain(&error)))?;
        return Ok((index, gid));
    }
    let rank = |gid_type: GidType, gid: &Gid| match gid_type {
        GidType::RoceV2 if gid.raw[..10] == [0; 10] && gid.raw[10..12] == [0xff, 0xff] => 0,
        GidType::RoceV2 => 1,
        GidType::InfiniBand => 2,
        GidType::RoceV1 => 3,
    };
    if let Ok(table) = context.query_gid_table() {
        let best = table
            .iter()
            .filter(|entry| entry.port_num() == u32::from(port) && !entry.gid().is_zero())
            .min_by_key(|entry| (rank(entry.gid_type(), &entry.gid()), entry.gid_index()));
        if let Some(entry) = best {
            return Ok((entry.gid_index(), entry.gid()));
        }
    }
    let gid = context
        .query_gid(port, 0)
        .map_err(|error| format!("GID index 0: {}", crate::error_chain(&error)))?;
    Ok((0, gid))
}

pub fn mtu_bytes(mtu: Mtu) -> u32 {
    match mtu {
        Mtu::Mtu256 => 256,
        Mtu::Mtu512 => 512,
        Mtu::Mtu1024 => 1024,
        Mtu::Mtu2048 => 2048,
        Mtu::Mtu4096 => 4096,
    }
}

fn mtu_from_bytes(bytes: u32) -> Option<Mtu> {
    Some(match bytes {
        256 => Mtu::Mtu256,
        512 => Mtu::Mtu512,
        1024 => Mtu::Mtu1024,
        2048 => Mtu::Mtu2048,
        4096 => Mtu::Mtu4096,
        _ => return None,
    })
}

/// One work completion, as the poll loop needs it.
#[derive(Clone, Copy, Debug)]
pub struct WorkCompletion {
    pub wr_id: u64,
    /// The local queue pair the work request was posted on.
    pub qp_num: u32,
    /// `IBV_WC_SUCCESS` (0) or the failure status.
    pub status: u32,
    pub byte_len: u32,
}

impl WorkCompletion {
    pub fn ok(&self) -> bool {
        self.status == sys::ibv_wc_status::IBV_WC_SUCCESS
    }

    /// The verbs name of the status (`IBV_WC_RETRY_EXC_ERR` reads "transport retry counter
    /// exceeded").
    pub fn status_text(&self) -> String {
        // SAFETY: ibv_wc_status_str returns a static string for any status value.
        let text = unsafe { sys::ibv_wc_status_str(self.status) };
        if text.is_null() {
            return format!("status {}", self.status);
        }
        // SAFETY: a NUL-terminated static string from libibverbs.
        unsafe { std::ffi::CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }
}

/// A completion queue and the channel that wakes a sleeper when it gets entries.
pub struct Completions {
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
}

impl std::fmt::Debug for Completions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completions")
            .field("fd", &self.fd())
            .finish()
    }
}

/// Work completions taken per `ibv_poll_cq`.
const POLL_BATCH: usize = 32;

/// A completion queue to create queue pairs on, from any thread.
#[derive(Clone)]
pub struct CompletionQueueHandle(Arc<BasicCompletionQueue>);

impl std::fmt::Debug for CompletionQueueHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompletionQueueHandle")
    }
}

impl Completions {
    pub fn handle(&self) -> CompletionQueueHandle {
        CompletionQueueHandle(self.cq.clone())
    }

    /// Turns readable after [`Completions::arm`] once a completion arrives.
    pub fn fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    /// Appends what the queue holds now to `out`.
    pub fn poll(&mut self, out: &mut Vec<WorkCompletion>) -> Result<usize, RdmaError> {
        let mut total = 0;
        loop {
            let mut wcs = [std::mem::MaybeUninit::<sys::ibv_wc>::uninit(); POLL_BATCH];
            // SAFETY: the CQ lives as long as self; ibv_poll_cq writes at most POLL_BATCH
            // entries into `wcs` and returns how many.
            let count = unsafe {
                sys::ibv_poll_cq(
                    self.cq.cq().as_ptr(),
                    POLL_BATCH as i32,
                    wcs.as_mut_ptr().cast(),
                )
            };
            if count < 0 {
                return Err(RdmaError::Verbs {
                    device: String::new(),
                    what: "polling a completion queue",
                    reason: std::io::Error::from_raw_os_error(-count).to_string(),
                });
            }
            for wc in &wcs[..count as usize] {
                // SAFETY: the first `count` entries were written by ibv_poll_cq.
                let wc = unsafe { wc.assume_init_ref() };
                out.push(WorkCompletion {
                    wr_id: wc.wr_id,
                    qp_num: wc.qp_num,
                    status: wc.status,
                    byte_len: wc.byte_len,
                });
            }
            total += count as usize;
            if (count as usize) < POLL_BATCH {
                return Ok(total);
            }
        }
    }

    /// Consumes the channel's event, if one is there, and asks for the next one. Poll once
    /// more afterwards: a completion that arrived before arming raises no event.
    pub fn arm(&mut self) -> Result<(), RdmaError> {
        self.take_event();
        // SAFETY: the CQ lives as long as self.
        let result = unsafe { sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        if result != 0 {
            return Err(RdmaError::Verbs {
                device: String::new(),
                what: "arming a completion queue",
                reason: std::io::Error::from_raw_os_error(result).to_string(),
            });
        }
        Ok(())
    }

    /// Reads one event from the channel, if there is one, and acknowledges it. One: an
    /// arming raises at most one event, so a read per arming keeps up, and reading on to
    /// the empty channel was a system call per wake-up. An event left over (one that came
    /// after a read found none) keeps the channel readable, so the next sleep on it ends at
    /// once and the next arming reads it.
    pub fn take_event(&mut self) {
        let mut cq = ptr::null_mut();
        let mut context = ptr::null_mut();
        // SAFETY: the channel is non-blocking; on success it names our CQ, which we ack.
        let got = unsafe {
            sys::ibv_get_cq_event(self.channel.comp_channel().as_ptr(), &mut cq, &mut context)
        };
        if got == 0 {
            // SAFETY: acknowledges the event just taken from this CQ's channel (destroying
            // the CQ waits for every one to be).
            unsafe { sys::ibv_ack_cq_events(self.cq.cq().as_ptr(), 1) };
        }
    }

    /// Waits up to `timeout` for completions: polls, arms, polls again, then sleeps on the
    /// channel. Returns how many it appended.
    pub fn wait(
        &mut self,
        out: &mut Vec<WorkCompletion>,
        timeout: Duration,
    ) -> Result<usize, RdmaError> {
        let got = self.poll(out)?;
        if got > 0 {
            return Ok(got);
        }
        self.arm()?;
        let got = self.poll(out)?;
        if got > 0 {
            return Ok(got);
        }
        let mut fd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: polls one pollfd we own.
        unsafe { libc::poll(&mut fd, 1, millis) };
        self.poll(out)
    }
}

/// Posts one receive of `len` bytes at `addr` (in the region `lkey`).
pub fn post_recv(
    qp: &mut ExtendedQueuePair,
    wr_id: u64,
    lkey: u32,
    addr: u64,
    len: u32,
) -> Result<(), RdmaError> {
    let mut guard = qp.start_post_recv();
    let handle = guard.construct_wr(wr_id);
    // SAFETY: the caller's region `lkey` covers addr..addr+len and outlives the receive.
    unsafe { handle.setup_sge(lkey, addr, len) };
    guard.post().map_err(|error| RdmaError::Verbs {
        device: String::new(),
        what: "posting a receive",
        reason: crate::error_chain(&error),
    })
}

/// A local buffer in a registered region: (lkey, address, length).
pub type Local = (u32, u64, u32);

/// Posts a SEND of `message`, signaled, as work request `wr_id`.
pub fn post_send(qp: &mut ExtendedQueuePair, wr_id: u64, message: Local) -> Result<(), RdmaError> {
    let mut guard = qp.start_post_send();
    let handle = guard
        .construct_wr(wr_id, WorkRequestFlags::Signaled)
        .setup_send();
    // SAFETY: the caller's region covers the message and outlives the send's completion.
    unsafe { handle.setup_sge(message.0, message.1, message.2) };
    guard.post().map_err(|error| RdmaError::Verbs {
        device: String::new(),
        what: "posting a send",
        reason: crate::error_chain(&error),
    })
}

/// Posts an unsignaled RDMA WRITE of `data` to (`rkey`, `remote_addr`) and then a signaled
/// SEND of `message`, as one batch: on a reliable-connected queue pair the peer sees the
/// SEND only after the WRITE's bytes are in place, and one completion covers both.
pub fn post_write_and_send(
    qp: &mut ExtendedQueuePair,
    wr_id: u64,
    data: Local,
    rkey: u32,
    remote_addr: u64,
    message: Local,
) -> Result<(), RdmaError> {
    let mut guard = qp.start_post_send();
    if data.2 > 0 {
        let write = guard
            .construct_wr(wr_id, WorkRequestFlags::none())
            .setup_write(rkey, remote_addr);
        // SAFETY: the caller's region covers `data` and outlives the send's completion (which
        // comes after the write's).
        unsafe { write.setup_sge(data.0, data.1, data.2) };
    }
    let send = guard
        .construct_wr(wr_id, WorkRequestFlags::Signaled)
        .setup_send();
    // SAFETY: as above, for the message.
    unsafe { send.setup_sge(message.0, message.1, message.2) };
    guard.post().map_err(|error| RdmaError::Verbs {
        device: String::new(),
        what: "posting a write and a send",
        reason: crate::error_chain(&error),
    })
}

/// Moves `qp` to the error state: every posted work request completes (flushed) and the peer
/// can no longer write into this side's memory.
pub fn disconnect(qp: &mut ExtendedQueuePair) {
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Error);
    if let Err(error) = qp.modify(&attr) {
        tracing::warn!(
            error = crate::error_chain(&error),
            "moving a queue pair to ERROR failed"
        );
    }
}

/// A random 24-bit packet sequence number.
pub fn random_psn() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into `bytes`.
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 4, 0) };
    u32::from_le_bytes(bytes) & 0xFF_FFFF
}
