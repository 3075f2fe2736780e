//! The CUDA backend (cudarc, loaded at run time, so CPU-only machines build and run without it).
//!
//! `device` (context, stream, cuMemAlloc buffers) · `kernels` (NVRTC + disk cache of
//! `kernels/*.cu`) · `ops` (typed kernel launches) · `gemm` (cuBLASLt FP8/BF16 and the FP8 path choice; `gemm_tune` its autotuning) · `fp8_stream` (decode-size FP8 kernel; `tensor_map` its and the prefill attention's TMA maps) · `weights`
//! (upload or dummy generation on the GPU) · `meta` (a step's packed index arrays) · `backend`
//! (the forward pass and the `Backend` impl; `backend/graphs.rs` its decode-step CUDA graphs) · `shard`, `nccl`, `tp` (tensor parallelism: one thread per
//! GPU, NCCL all-reduces inside the forward) · `peer_all_reduce` (one-shot all-reduce over NVLink
//! for decode-size messages).

pub mod backend;
pub mod device;
pub mod fp8_stream;
pub mod gemm;
pub mod gemm_tune;
pub mod kernels;
pub mod meta;
pub mod nccl;
pub mod ops;
pub mod peer_all_reduce;
pub mod shard;
pub mod tensor_map;
pub mod tp;
pub mod weights;

pub use backend::{num_blocks_for, CudaBackend, CudaOptions, WeightSource};
pub use device::gpu_available;
pub use tp::{TpBackend, TpWeights};
