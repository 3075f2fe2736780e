//! One-shot all-reduce over peer access (`kernels/all_reduce.cu`) for the decode-size
//! all-reduces of tensor parallelism: one kernel that reads every rank's values over NVLink,
//! where NCCL's ring takes several latency-bound steps. Messages above the slot size, or not in
//! 16-byte units, go to NCCL. The ranks are threads of one process, so a peer's device pointer is
//! valid here once peer access is on; they learn each other's buffers by an NCCL all-gather.
//! `TANDEM_ALL_REDUCE=nccl` turns it off.
//!
//! The norm after o_proj and down_proj can take the all-reduce in (`add_rmsnorm_fp8_peer_k*`,
//! [`PeerAllReduce::norm_call`]): one launch and one pass fewer per all-reduce at decode sizes.
//! `TANDEM_ALL_REDUCE=peer` keeps the all-reduce a kernel of its own (comparisons).
//!
//! The kernels read their epoch from device memory (a base plus the call's number within the
//! step), and [`PeerAllReduce::end_step`] queues the kernel that moves the base on: a decode step
//! captured in a CUDA graph replays with fresh epochs.

use super::device::{DeviceBuffer, Gpu};
use super::kernels::{launch, Arg, Kernels};
use super::nccl::NcclComm;
use super::ops::Precision;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{result, sys, CudaContext};
use std::cell::Cell;
use std::sync::Arc;

/// Must match kernels/all_reduce.cu.
const MAX_BLOCKS: usize = 64;
const MAX_RANKS: usize = 8;
const THREADS: u32 = 512;
const FLAG_BYTES: usize = MAX_BLOCKS * MAX_RANKS * 4;

/// Largest message (bytes) taken here: a decode batch of 64 BF16 rows of 8192.
pub const SLOT_BYTES: usize = 1 << 20;

pub struct PeerAllReduce {
    rank: usize,
    world: usize,
    /// This rank's `[flags][slot 0][slot 1]`, read and written by the peers.
    buf: DeviceBuffer,
    /// Every rank's `buf` base address, for the kernel.
    bases: DeviceBuffer,
    /// One u32: the epoch before this step's first call (the same on every rank: they all run
    /// the same forward).
    epoch_base: DeviceBuffer,
    /// Calls queued since the last `end_step`.
    calls: Cell<u32>,
    /// May norms take the all-reduce in (not `TANDEM_ALL_REDUCE=peer`)? Read once.
    fuses: bool,
    /// Keeps the peers' contexts (and so the peer mappings) alive.
    _peers: Vec<Arc<CudaContext>>,
}

// Used by the one thread that owns the rank's backend.
unsafe impl Send for PeerAllReduce {}

/// The peer-buffer arguments of one all-reduce taken into another kernel (the fused norm's last
/// six: every rank's buffer, world, rank, epoch base, call number, slot bytes).
#[derive(Debug, Clone, Copy)]
pub struct PeerCall {
    bases: u64,
    world: usize,
    rank: usize,
    epoch_base: u64,
    call: u32,
}

impl PeerCall {
    pub fn args(&self) -> [Arg; 6] {
        [
            Arg::Ptr(self.bases),
            Arg::I32(self.world as i32),
            Arg::I32(self.rank as i32),
            Arg::Ptr(self.epoch_base),
            Arg::I32(self.call as i32),
            Arg::U64(SLOT_BYTES as u64),
        ]
    }
}

impl PeerAllReduce {
    /// Is it wanted (not turned off by `TANDEM_ALL_REDUCE=nccl`)?
    pub fn enabled() -> bool {
        std::env::var("TANDEM_ALL_REDUCE").map_or(true, |v| v != "nccl")
    }

    /// An all-reduce of `rows` BF16 rows of `cols` for a kernel that takes it in with a block per
    /// row, if it fits (rows <= the flag blocks, rows in the slot, whole 16-byte row pieces) and
    /// fusing is on; counts as the step's next call.
    pub fn norm_call(&self, rows: usize, cols: usize) -> Option<PeerCall> {
        let fits = (1..=MAX_BLOCKS).contains(&rows)
            && cols.is_multiple_of(8)
            && rows * cols * 2 <= SLOT_BYTES;
        if !fits || !self.fuses {
            return None;
        }
        let call = self.calls.get().wrapping_add(1);
        self.calls.set(call);
        Some(PeerCall {
            bases: self.bases.ptr,
            world: self.world,
            rank: self.rank,
            epoch_base: self.epoch_base.ptr,
            call,
        })
    }

    /// Collective: every rank of `comm` calls it at the same point. Allocates this rank's
    /// buffer, all-gathers (buffer base, GPU ordinal) of every rank, and turns on peer access to
    /// every other rank's GPU.
    pub fn new(gpu: &Gpu, comm: &NcclComm, rank: usize, world: usize) -> Result<Self> {
        ensure!(
            world <= MAX_RANKS,
            "peer all-reduce handles at most {MAX_RANKS} ranks, not {world}"
        );
        gpu.bind()?;
        let buf = gpu.alloc(FLAG_BYTES + 2 * SLOT_BYTES)?;
        gpu.memset(&buf, 0)?;
        let me = gpu.upload(&[buf.ptr, gpu.ctx.ordinal() as u64])?;
        let all = gpu.alloc(world * 16)?;
        // 16 bytes per rank, gathered as 4 F32 values (only the bits matter).
        comm.all_gather(me.ptr, all.ptr, 4, Precision::F32, gpu.cu_stream())?;
        gpu.sync()?;
        let pairs: Vec<u64> = gpu.download(&all, 2 * world)?;
        let mut peers = vec![];
        for r in (0..world).filter(|&r| r != rank) {
            peers.push(enable_peer(gpu, pairs[2 * r + 1] as usize)?);
        }
        let bases: Vec<u64> = (0..world).map(|r| pairs[2 * r]).collect();
        Self::with_buffers(gpu, rank, buf, &bases, peers)
    }

    /// `world` ranks whose buffers all lie on `gpu` (no NCCL, no peer access): for testing the
    /// kernels on one GPU, where each rank's calls must run on a stream of its own (a rank's
    /// kernel waits for the others').
    pub fn on_one_gpu(gpu: &Gpu, world: usize) -> Result<Vec<Self>> {
        ensure!(
            (1..=MAX_RANKS).contains(&world),
            "peer all-reduce handles 1 to {MAX_RANKS} ranks, not {world}"
        );
        gpu.bind()?;
        let bufs = (0..world)
            .map(|_| {
                let b = gpu.alloc(FLAG_BYTES + 2 * SLOT_BYTES)?;
                gpu.memset(&b, 0)?;
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        let bases: Vec<u64> = bufs.iter().map(|b| b.ptr).collect();
        bufs.into_iter()
            .enumerate()
            .map(|(rank, buf)| Self::with_buffers(gpu, rank, buf, &bases, vec![]))
            .collect()
    }

    fn with_buffers(
        gpu: &Gpu,
        rank: usize,
        buf: DeviceBuffer,
        bases: &[u64],
        peers: Vec<Arc<CudaContext>>,
    ) -> Result<Self> {
        Ok(Self {
            rank,
            world: bases.len(),
            bases: gpu.upload(bases)?,
            epoch_base: gpu.upload(&[0u32])?,
            calls: Cell::new(0),
            fuses: std::env::var("TANDEM_ALL_REDUCE").map_or(true, |v| v != "peer"),
            buf,
            _peers: peers,
        })
    }

    /// Sums `count` values of `p` at `ptr` over the ranks in place, if the message fits; returns
    /// whether it did (false: the caller uses NCCL). Queued on `stream`.
    pub fn try_all_reduce(
        &self,
        kernels: &Kernels,
        ptr: u64,
        count: usize,
        p: Precision,
        stream: sys::CUstream,
    ) -> Result<bool> {
        let bytes = count * p.bytes();
        if bytes == 0 || bytes > SLOT_BYTES || !bytes.is_multiple_of(16) || !ptr.is_multiple_of(16)
        {
            return Ok(false);
        }
        let n16 = bytes / 16;
        let blocks = n16.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
        // Epochs wrap through 0 like the kernel's comparison does.
        let call = self.calls.get().wrapping_add(1);
        self.calls.set(call);
        let name = match p {
            Precision::Bf16 => "all_reduce_oneshot_bf16",
            Precision::F32 => "all_reduce_oneshot_f32",
        };
        launch(
            kernels.get(name)?,
            (blocks, 1, 1),
            (THREADS, 1, 1),
            0,
            stream,
            &[
                Arg::Ptr(ptr),
                Arg::Ptr(self.bases.ptr),
                Arg::I32(self.world as i32),
                Arg::I32(self.rank as i32),
                Arg::U64(n16 as u64),
                Arg::Ptr(self.epoch_base.ptr),
                Arg::I32(call as i32),
                Arg::U64(SLOT_BYTES as u64),
            ],
        )?;
        let _ = &self.buf; // read and written only by the kernels
        Ok(true)
    }

    /// Queues the move of the epoch base past the calls queued since the last `end_step`
    /// (nothing if there were none). Every rank calls it at the same point of the same step.
    pub fn end_step(&self, kernels: &Kernels, stream: sys::CUstream) -> Result<()> {
        let calls = self.calls.replace(0);
        if calls == 0 {
            return Ok(());
        }
        launch(
            kernels.get("all_reduce_epoch_advance")?,
            (1, 1, 1),
            (1, 1, 1),
            0,
            stream,
            &[Arg::Ptr(self.epoch_base.ptr), Arg::I32(calls as i32)],
        )
    }
}

/// Lets kernels of `gpu`'s context read and write GPU `peer`'s memory; returns the peer's
/// context, which must stay alive while they do.
fn enable_peer(gpu: &Gpu, peer: usize) -> Result<Arc<CudaContext>> {
    let (dev, peer_dev) = (
        result::device::get(gpu.ctx.ordinal() as i32)?,
        result::device::get(peer as i32)?,
    );
    let mut can = 0;
    // SAFETY: plain out-parameter.
    unsafe { sys::cuDeviceCanAccessPeer(&mut can, dev, peer_dev) }.result()?;
    if can != 1 {
        bail!(
            "GPU {} cannot access GPU {peer} as a peer (set TANDEM_ALL_REDUCE=nccl)",
            gpu.ctx.ordinal()
        );
    }
    let peer_ctx = CudaContext::new(peer).with_context(|| format!("opening GPU {peer}"))?;
    gpu.bind()?;
    // SAFETY: both contexts are live; a second enable reports ALREADY_ENABLED, which is fine.
    match unsafe { sys::cuCtxEnablePeerAccess(peer_ctx.cu_ctx(), 0) } {
        sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
            Ok(peer_ctx)
        }
        e => bail!(
            "cuCtxEnablePeerAccess {} -> {peer}: {e:?}",
            gpu.ctx.ordinal()
        ),
    }
}
