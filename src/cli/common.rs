//! Flags shared by the commands that load a model (vLLM's names where the meaning is the same).

use clap::ValueEnum;

pub use crate::model::LoadFormat;

/// Defined beside the backends (which `backend::factory` builds from it); re-exported for the CLI.
pub use crate::backend::DeviceKind;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model directory, a preset name under `models/`, or a Hugging Face hub id (`org/name`).
    #[arg(long)]
    pub model: String,
    #[arg(long, value_enum, default_value_t = LoadFormat::Safetensors)]
    pub load_format: LoadFormat,
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// Seed for dummy weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}
