//! NCCL for tensor parallelism: one communicator per rank, collectives enqueued on the rank's
//! stream with raw device pointers (cudarc's `nccl::result` calls; libnccl is loaded at run time).
//!
//! [`TpRank`] is what a [`super::CudaBackend`] of one rank holds: its [`Shard`], the communicator,
//! and the buffers that lay the all-gathered vocab slices of the logits out as `[rows, vocab]`.

use super::device::{DeviceBuffer, Gpu};
use super::kernels::Kernels;
use super::ops::Precision;
use super::peer_all_reduce::{PeerAllReduce, PeerCall};
use super::shard::Shard;
use anyhow::{anyhow, bail, Result};
use cudarc::driver::sys as cu;
use cudarc::nccl::{result, sys};
use std::ffi::c_void;

/// Can libnccl be loaded here? Never panics.
pub fn nccl_available() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { sys::is_culib_present() }
}

/// The id every rank of one communicator joins with (made once, copied to each rank).
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl NcclId {
    pub fn new() -> Result<Self> {
        if !nccl_available() {
            bail!("tensor parallelism needs NCCL: libnccl.so is not on the library path");
        }
        Ok(Self(
            result::get_uniqueid().map_err(|e| anyhow!("ncclGetUniqueId: {:?}", e.0))?,
        ))
    }
}

pub struct NcclComm {
    comm: sys::ncclComm_t,
}

// The communicator is used by the one thread that owns the rank's backend.
unsafe impl Send for NcclComm {}

fn check(what: &str, r: Result<result::NcclStatus, result::NcclError>) -> Result<()> {
    r.map(|_| ()).map_err(|e| anyhow!("NCCL {what}: {:?}", e.0))
}

impl NcclComm {
    /// Joins communicator `id` as `rank` of `world` on the GPU whose context is current. Blocks
    /// until every rank has joined, so the ranks must call it concurrently.
    pub fn join(id: NcclId, rank: usize, world: usize) -> Result<Self> {
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator.
        check("init", unsafe {
            result::comm_init_rank(&mut comm, world as i32, id.0, rank as i32)
        })?;
        Ok(Self { comm })
    }

    fn dtype(p: Precision) -> sys::ncclDataType_t {
        match p {
            Precision::Bf16 => sys::ncclDataType_t::ncclBfloat16,
            Precision::F32 => sys::ncclDataType_t::ncclFloat32,
        }
    }

    /// In-place sum of `count` values over all ranks, queued on `stream`.
    pub fn all_reduce_sum(
        &self,
        ptr: u64,
        count: usize,
        p: Precision,
        stream: cu::CUstream,
    ) -> Result<()> {
        self.all_reduce_op(ptr, count, p, sys::ncclRedOp_t::ncclSum, stream)
    }

    /// In-place maximum of `count` F32 values over all ranks, queued on `stream`.
    pub fn all_reduce_max_f32(&self, ptr: u64, count: usize, stream: cu::CUstream) -> Result<()> {
        self.all_reduce_op(
            ptr,
            count,
            Precision::F32,
            sys::ncclRedOp_t::ncclMax,
            stream,
        )
    }

    fn all_reduce_op(
        &self,
        ptr: u64,
        count: usize,
        p: Precision,
        op: sys::ncclRedOp_t,
        stream: cu::CUstream,
    ) -> Result<()> {
        // SAFETY: `ptr` holds `count` values of `p` on this rank's GPU (callers' buffers).
        check("all-reduce", unsafe {
            result::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                Self::dtype(p),
                op,
                self.comm,
                stream as sys::cudaStream_t,
            )
        })
    }

    /// `recv[rank · count ..] = send` of every rank, queued on `stream`.
    pub fn all_gather(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        p: Precision,
        stream: cu::CUstream,
    ) -> Result<()> {
        // SAFETY: `send` holds `count` values, `recv` room for `world · count`.
        check("all-gather", unsafe {
            result::all_gather(
                send as *const c_void,
                recv as *mut c_void,
                count,
                Self::dtype(p),
                self.comm,
                stream as sys::cudaStream_t,
            )
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: created by `join`, destroyed once.
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}

/// One rank's part of tensor parallelism inside its backend.
pub struct TpRank {
    pub shard: Shard,
    /// The full model's vocabulary.
    pub vocab: usize,
    // Buffers before the communicator: all are freed while the context is current.
    /// `[world, rows, vocab_per_rank]` F32: the gathered slices.
    gathered: DeviceBuffer,
    /// `[rows, vocab]` F32: the full logits.
    full_logits: DeviceBuffer,
    /// The one-shot all-reduce for decode-size messages (None: NCCL for all).
    peer: Option<PeerAllReduce>,
    comm: NcclComm,
}

/// What a rank needs to join its group.
#[derive(Clone, Copy)]
pub struct TpSetup {
    pub shard: Shard,
    pub id: NcclId,
}

impl TpRank {
    /// Joins the group (blocks until all ranks have) and sizes the logits buffers for `max_rows`.
    pub fn new(setup: TpSetup, gpu: &Gpu, vocab: usize, max_rows: usize) -> Result<Self> {
        let s = setup.shard;
        let comm = NcclComm::join(setup.id, s.rank, s.world)?;
        let per = s.vocab_per_rank(vocab);
        let peer = if s.world > 1 && PeerAllReduce::enabled() {
            Some(PeerAllReduce::new(gpu, &comm, s.rank, s.world)?)
        } else {
            None
        };
        Ok(Self {
            shard: s,
            vocab,
            gathered: gpu.alloc(s.world * max_rows * per * 4)?,
            full_logits: gpu.alloc(max_rows * vocab * 4)?,
            peer,
            comm,
        })
    }

    /// In-place sum over the ranks: the one-shot peer kernel for decode-size messages, NCCL
    /// otherwise.
    pub fn all_reduce(
        &self,
        kernels: &Kernels,
        ptr: u64,
        count: usize,
        p: Precision,
        stream: cu::CUstream,
    ) -> Result<()> {
        if let Some(peer) = &self.peer {
            if peer.try_all_reduce(kernels, ptr, count, p, stream)? {
                return Ok(());
            }
        }
        self.comm.all_reduce_sum(ptr, count, p, stream)
    }

    pub fn all_reduce_max_f32(&self, ptr: u64, count: usize, stream: cu::CUstream) -> Result<()> {
        self.comm.all_reduce_max_f32(ptr, count, stream)
    }

    /// The peer all-reduce of `rows` BF16 rows of `cols` for a norm that takes it in
    /// ([`PeerAllReduce::norm_call`]); None: all-reduce first.
    pub fn norm_call(&self, rows: usize, cols: usize) -> Option<PeerCall> {
        self.peer.as_ref()?.norm_call(rows, cols)
    }

    /// Closes a step's all-reduces (the peer kernel's epochs live on the device; see
    /// `peer_all_reduce.rs`). Queued on `stream` after the step's last all-reduce.
    pub fn end_step(&self, kernels: &Kernels, stream: cu::CUstream) -> Result<()> {
        match &self.peer {
            Some(peer) => peer.end_step(kernels, stream),
            None => Ok(()),
        }
    }

    /// All-gathers every rank's `[rows, vocab_per_rank]` F32 logits and lays them out as
    /// `[rows, vocab]` (padding columns dropped); returns the full logits buffer.
    pub fn gather_logits(&self, local: u64, rows: usize, gpu: &Gpu) -> Result<&DeviceBuffer> {
        let stream = gpu.cu_stream();
        let per = self.shard.vocab_per_rank(self.vocab);
        if rows * self.vocab * 4 > self.full_logits.bytes {
            bail!(
                "{rows} logits rows exceed the {} sized for",
                self.full_logits.bytes / (self.vocab * 4)
            );
        }
        self.comm
            .all_gather(local, self.gathered.ptr, rows * per, Precision::F32, stream)?;
        for r in 0..self.shard.world {
            let cols = Shard {
                rank: r,
                world: self.shard.world,
            }
            .vocab_range(self.vocab)
            .len();
            if cols == 0 {
                continue;
            }
            let copy = cu::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: self.gathered.ptr + (r * rows * per * 4) as u64,
                srcArray: std::ptr::null_mut(),
                srcPitch: per * 4,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: self.full_logits.ptr + (r * per * 4) as u64,
                dstArray: std::ptr::null_mut(),
                dstPitch: self.vocab * 4,
                WidthInBytes: cols * 4,
                Height: rows,
            };
            // SAFETY: both ranges lie inside the buffers (sizes checked above).
            unsafe { cu::cuMemcpy2DAsync_v2(&copy, stream) }
                .result()
                .map_err(|e| anyhow!("laying out gathered logits: {e:?}"))?;
        }
        Ok(&self.full_logits)
    }

    pub fn full_logits(&self) -> &DeviceBuffer {
        &self.full_logits
    }
}
