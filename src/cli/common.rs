//! Flags shared by the commands that load a model (vLLM's names where the meaning is the same).

pub use crate::model::LoadFormat;

use crate::backend::factory::BackendOptions;
use crate::model::LlamaConfig;

/// Defined beside the backends (which `backend::factory` builds from it); re-exported for the CLI.
pub use crate::backend::{DeviceKind, KvCacheDtype};

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

/// Engine limits and switches, with vLLM's flag names.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Longest prompt + generation (default: the model's `max_position_embeddings`).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Token budget of one engine step (decodes + prefill chunks).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Reuse the KV of shared prompt prefixes (on by default; `--enable-prefix-caching=false`).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub enable_prefix_caching: bool,
    /// Split long prompts into chunks under the step budget (on by default;
    /// `--enable-chunked-prefill=false` prefills whole prompts).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub enable_chunked_prefill: bool,
    /// KV pool size in blocks; overrides the size derived from `--gpu-memory-utilization`.
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,
    /// Fraction of GPU memory for weights, activations and the KV pool (of each GPU).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// GPUs one model is split over (tensor parallelism, `--device cuda`): a worker whose first
    /// GPU is `g` uses GPUs `g .. g + N`. N must divide the model's KV heads.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Requests waiting to start beyond which new ones are refused (HTTP 429).
    #[arg(long, default_value_t = 4096)]
    pub max_queue_len: usize,
    /// Seconds a decode worker waits for a remote prefill before prefilling locally.
    #[arg(long, default_value_t = 30.0)]
    pub remote_prefill_timeout: f64,
    /// Schedule the next step while the device computes this one (on by default;
    /// `--async-scheduling=false` waits for each step's tokens first).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub async_scheduling: bool,
    /// Launch every kernel of every step one by one (CUDA): no decode-step CUDA graphs.
    #[arg(long)]
    pub enforce_eager: bool,
    /// KV cache storage: `auto` (the activations' type) or `fp8` (e4m3, CUDA: twice the tokens).
    #[arg(long, value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,
}

/// KV blocks used on the CPU when `--num-kv-blocks` is not given.
pub const DEFAULT_CPU_KV_BLOCKS: usize = 512;

impl EngineArgs {
    /// The engine configuration; `num_kv_blocks` is left as given (see `num_kv_blocks`).
    pub fn engine_config(&self) -> crate::engine::EngineConfig {
        crate::engine::EngineConfig {
            max_model_len: self.max_model_len,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_num_seqs: self.max_num_seqs,
            enable_chunked_prefill: self.enable_chunked_prefill,
            enable_prefix_caching: self.enable_prefix_caching,
            num_kv_blocks: self.num_kv_blocks,
            max_queue_len: self.max_queue_len,
            remote_prefill_timeout: std::time::Duration::from_secs_f64(
                self.remote_prefill_timeout.max(0.0),
            ),
            async_scheduling: self.async_scheduling,
        }
    }

    /// How a backend must be sized for an engine with these flags: without chunked prefill one
    /// step must hold a whole prompt.
    pub fn backend_options(
        &self,
        block_size: usize,
        gpu: usize,
        config: &LlamaConfig,
    ) -> BackendOptions {
        let whole_prompt = self.max_model_len.unwrap_or(config.max_position_embeddings);
        BackendOptions {
            gpu,
            tensor_parallel_size: self.tensor_parallel_size.max(1),
            block_size,
            num_kv_blocks: self.num_kv_blocks,
            gpu_memory_utilization: self.gpu_memory_utilization,
            max_num_batched_tokens: if self.enable_chunked_prefill {
                self.max_num_batched_tokens
            } else {
                self.max_num_batched_tokens.max(whole_prompt)
            },
            max_num_seqs: self.max_num_seqs,
            cpu_default_blocks: DEFAULT_CPU_KV_BLOCKS,
            enforce_eager: self.enforce_eager,
            kv_cache_dtype: self.kv_cache_dtype,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    #[test]
    fn engine_flags_parse_with_vllm_names() {
        let cli = Cli::parse_from([
            "t",
            "--max-num-batched-tokens",
            "512",
            "--enable-prefix-caching=false",
        ]);
        let c = cli.engine.engine_config();
        assert_eq!(c.max_num_batched_tokens, 512);
        assert!(!c.enable_prefix_caching);
        assert!(c.enable_chunked_prefill);
        assert!(c.async_scheduling, "on by default");
        for (flag, on) in [
            ("--async-scheduling", true),
            ("--async-scheduling=false", false),
        ] {
            let cli = Cli::parse_from(["t", flag]);
            assert_eq!(cli.engine.engine_config().async_scheduling, on, "{flag}");
        }
        let cli = Cli::parse_from([
            "t",
            "--enable-prefix-caching",
            "--enable-chunked-prefill",
            "false",
        ]);
        assert!(cli.engine.enable_prefix_caching);
        assert!(!cli.engine.enable_chunked_prefill);
        // Without chunked prefill a step must hold a whole prompt (the model length).
        let config = crate::model::ModelFiles::resolve("tiny-llama")
            .unwrap()
            .config;
        let opts = cli.engine.backend_options(16, 1, &config);
        assert_eq!(
            opts.max_num_batched_tokens,
            config.max_position_embeddings.max(2048)
        );
        assert_eq!(
            (opts.gpu, opts.block_size, opts.num_kv_blocks),
            (1, 16, None)
        );
        assert_eq!(opts.tensor_parallel_size, 1);
        let cli = Cli::parse_from([
            "t",
            "--num-kv-blocks",
            "7",
            "--max-num-batched-tokens",
            "64",
            "--tensor-parallel-size",
            "2",
        ]);
        let opts = cli.engine.backend_options(16, 0, &config);
        assert_eq!(
            (
                opts.num_kv_blocks,
                opts.max_num_batched_tokens,
                opts.tensor_parallel_size
            ),
            (Some(7), 64, 2)
        );
        assert_eq!(opts.kv_cache_dtype, KvCacheDtype::Auto);
        assert!(!opts.enforce_eager);
    }

    #[test]
    fn kv_cache_dtype_and_enforce_eager_parse_as_in_vllm() {
        let config = crate::model::ModelFiles::resolve("tiny-llama")
            .unwrap()
            .config;
        for name in ["fp8", "fp8_e4m3"] {
            let cli = Cli::parse_from(["t", "--kv-cache-dtype", name, "--enforce-eager"]);
            let opts = cli.engine.backend_options(16, 0, &config);
            assert_eq!(opts.kv_cache_dtype, KvCacheDtype::Fp8);
            assert!(opts.enforce_eager);
        }
        assert!(Cli::try_parse_from(["t", "--kv-cache-dtype", "int4"]).is_err());
        // The CPU backend keeps F32 KV: an FP8 pool is refused with a clear error.
        let files = crate::model::ModelFiles::resolve("tiny-llama").unwrap();
        let cli = Cli::parse_from(["t", "--kv-cache-dtype", "fp8"]);
        let opts = cli.engine.backend_options(16, 0, &files.config);
        let err = crate::backend::factory::build_backend(
            DeviceKind::Cpu,
            &files,
            LoadFormat::Dummy,
            0,
            &opts,
        )
        .err()
        .expect("fp8 KV on the CPU is refused");
        assert!(
            err.to_string().contains("--kv-cache-dtype fp8 needs CUDA"),
            "{err}"
        );
    }
}
