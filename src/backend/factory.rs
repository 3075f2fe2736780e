//! Builds the backend a `--device` flag asks for.

use super::cpu::CpuBackend;
use super::{Backend, DeviceKind};
use crate::model::config::LlamaConfig;
use crate::model::weights::LlamaWeights;
use anyhow::{bail, Result};

pub fn create_backend(
    device: DeviceKind,
    config: &LlamaConfig,
    weights: &LlamaWeights,
    block_size: usize,
    num_blocks: usize,
) -> Result<Box<dyn Backend>> {
    match device {
        // No CUDA backend yet, so Auto means the CPU.
        DeviceKind::Auto | DeviceKind::Cpu => Ok(Box::new(CpuBackend::new(
            config, weights, block_size, num_blocks,
        )?)),
        DeviceKind::Cuda => bail!("CUDA backend not available in this build yet"),
    }
}
