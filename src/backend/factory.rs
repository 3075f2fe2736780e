//! Builds the backend a `--device` flag asks for.

use super::cpu::CpuBackend;
use super::cuda::{gpu_available, CudaBackend, CudaOptions, TpBackend, TpWeights, WeightSource};
use super::{Backend, DeviceKind, KvCacheDtype};
use crate::model::config::LlamaConfig;
use crate::model::weights::LlamaWeights;
use crate::model::{load_weights, LoadFormat, ModelFiles};
use anyhow::{bail, Result};

/// `Auto` is CUDA when a GPU is found, else the CPU.
pub fn resolve_device(device: DeviceKind) -> DeviceKind {
    match device {
        DeviceKind::Auto if gpu_available() => DeviceKind::Cuda,
        DeviceKind::Auto => DeviceKind::Cpu,
        d => d,
    }
}

/// A backend from host weights with a KV pool of `num_blocks` blocks.
pub fn create_backend(
    device: DeviceKind,
    config: &LlamaConfig,
    weights: &LlamaWeights,
    block_size: usize,
    num_blocks: usize,
) -> Result<Box<dyn Backend>> {
    match resolve_device(device) {
        DeviceKind::Cuda => {
            let opts = CudaOptions {
                block_size,
                num_blocks: Some(num_blocks),
                ..Default::default()
            };
            Ok(Box::new(CudaBackend::new(
                config,
                WeightSource::Host(weights),
                opts,
            )?))
        }
        _ => Ok(Box::new(CpuBackend::new(
            config, weights, block_size, num_blocks,
        )?)),
    }
}

/// What a backend is sized for (vLLM's flag names).
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// CUDA device ordinal (ignored on the CPU); the first of `tensor_parallel_size` GPUs.
    pub gpu: usize,
    /// GPUs one model is split over (tensor parallelism, CUDA only).
    pub tensor_parallel_size: usize,
    pub block_size: usize,
    /// KV pool size; when `None`, CUDA sizes it from `gpu_memory_utilization` and the CPU
    /// uses `cpu_default_blocks`.
    pub num_kv_blocks: Option<usize>,
    pub gpu_memory_utilization: f64,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub cpu_default_blocks: usize,
    /// CUDA: no decode-step CUDA graphs (vLLM's `--enforce-eager`).
    pub enforce_eager: bool,
    pub kv_cache_dtype: KvCacheDtype,
}

/// Loads a model onto the device: host weights for the CPU and real checkpoints; dummy weights
/// for CUDA are generated on the GPU (a 70B model never touches host memory).
pub fn build_backend(
    device: DeviceKind,
    files: &ModelFiles,
    format: LoadFormat,
    seed: u64,
    opts: &BackendOptions,
) -> Result<Box<dyn Backend>> {
    let tp = opts.tensor_parallel_size.max(1);
    match resolve_device(device) {
        DeviceKind::Cuda if tp > 1 => {
            let cuda = cuda_options(opts);
            let backend = match format {
                LoadFormat::Dummy => {
                    TpBackend::new(&files.config, TpWeights::Dummy { seed }, cuda, tp)?
                }
                LoadFormat::Safetensors => {
                    let weights = load_weights(files, format, seed)?;
                    TpBackend::new(&files.config, TpWeights::Host(&weights), cuda, tp)?
                }
            };
            Ok(Box::new(backend))
        }
        DeviceKind::Cuda => {
            let cuda = cuda_options(opts);
            let backend = match format {
                LoadFormat::Dummy => {
                    CudaBackend::new(&files.config, WeightSource::Dummy { seed }, cuda)?
                }
                LoadFormat::Safetensors => {
                    let weights = load_weights(files, format, seed)?;
                    CudaBackend::new(&files.config, WeightSource::Host(&weights), cuda)?
                }
            };
            Ok(Box::new(backend))
        }
        _ if opts.kv_cache_dtype == KvCacheDtype::Fp8 => {
            bail!("--kv-cache-dtype fp8 needs CUDA (--device cuda); the CPU backend keeps F32 KV")
        }
        _ if tp > 1 => bail!(
            "--tensor-parallel-size {tp} needs CUDA GPUs (--device cuda); the CPU backend runs one model on one device"
        ),
        _ => {
            let weights = load_weights(files, format, seed)?;
            let blocks = opts.num_kv_blocks.unwrap_or(opts.cpu_default_blocks);
            Ok(Box::new(CpuBackend::new(
                &files.config,
                &weights,
                opts.block_size,
                blocks,
            )?))
        }
    }
}

fn cuda_options(opts: &BackendOptions) -> CudaOptions {
    CudaOptions {
        device: opts.gpu,
        block_size: opts.block_size,
        num_blocks: opts.num_kv_blocks,
        gpu_memory_utilization: opts.gpu_memory_utilization,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        max_num_seqs: opts.max_num_seqs,
        enforce_eager: opts.enforce_eager,
        kv_cache_dtype: opts.kv_cache_dtype,
        ..Default::default()
    }
}
