//! `tandem bench-step`: times the CUDA backend's steps directly (no engine, no HTTP) and prints
//! JSON: KV capacity, decode step latency at given batch sizes and context, prefill tokens/s.
//!
//! Decode steps run over a KV pool filled with random values (so a batch of long contexts needs
//! no prefill first); prefill runs whole prompts of `--prompt-len` tokens. With
//! `--tensor-parallel-size N` the model is split over GPUs 0..N (profiles are rank 0's).

use crate::backend::cuda::{CudaBackend, CudaOptions, TpBackend, TpWeights, WeightSource};
use crate::backend::{Backend, Batch, DeviceSampling, Emit, KvCacheDtype, SeqChunk};
use crate::model::config::LlamaConfig;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model directory or a preset name under `models/` (only config.json is read).
    #[arg(long)]
    pub model: String,
    /// Only `dummy` (weights generated on the GPU).
    #[arg(long, default_value = "dummy")]
    pub load_format: String,
    /// Decode batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batch: Vec<usize>,
    /// Context length of every sequence in the decode steps.
    #[arg(long, default_value_t = 3000)]
    pub context: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 3000)]
    pub prompt_len: usize,
    /// Prompts per prefill step.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub prefill_batch: Vec<usize>,
    #[arg(long, default_value_t = 0.95)]
    pub gpu_memory_utilization: f64,
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// GPUs to split the model over (tensor parallelism).
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Also time each decode batch with split-K attention off (`_nosplit` keys).
    #[arg(long)]
    pub compare_no_split: bool,
    /// Also time each decode batch with split-K attention aiming at this many blocks per
    /// multiprocessor instead of 4 (`_split<N>` keys).
    #[arg(long)]
    pub compare_split_blocks_per_sm: Option<usize>,
    /// Also time each decode batch with the split rows merged and FP8-quantized by two kernels
    /// instead of the fused one (`_pair` keys; one GPU only).
    #[arg(long)]
    pub compare_combine_pair: bool,
    /// Launch every kernel one by one (no decode-step CUDA graphs).
    #[arg(long)]
    pub enforce_eager: bool,
    /// KV cache storage: `auto` (BF16) or `fp8` (e4m3).
    #[arg(long, value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,
    /// Also time each decode batch with the other of graphs and eager launches (`_eager` or
    /// `_graphs` keys).
    #[arg(long)]
    pub compare_eager: bool,
    /// Timed repetitions per measurement (after 3 warm-ups); the median is reported.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
}

pub(crate) fn config_path(model: &str) -> PathBuf {
    let direct = PathBuf::from(model);
    if direct.join("config.json").exists() {
        return direct.join("config.json");
    }
    let dir = std::env::var_os("TANDEM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"));
    dir.join(model).join("config.json")
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// What bench-step needs beyond [`Backend`], from one GPU or from a tensor-parallel group.
trait Bench: Backend {
    fn fill_kv_random(&mut self, seed: u64) -> Result<()>;
    fn weight_bytes(&self) -> usize;
    fn split_min_keys(&mut self) -> Result<usize>;
    fn set_split_min_keys(&mut self, keys: usize) -> Result<()>;
    fn set_attention_blocks_per_sm(&mut self, blocks: usize) -> Result<()>;
    fn set_profiling(&mut self, on: bool) -> Result<()>;
    fn set_fused_combine(&mut self, _on: bool) -> Result<()> {
        bail!("--compare-combine-pair runs on one GPU only")
    }
    fn take_profile(&mut self) -> Result<Vec<(&'static str, f64, usize)>>;
    fn set_enforce_eager(&mut self, on: bool) -> Result<()>;
}

impl Bench for CudaBackend {
    fn fill_kv_random(&mut self, seed: u64) -> Result<()> {
        CudaBackend::fill_kv_random(self, seed)
    }
    fn weight_bytes(&self) -> usize {
        CudaBackend::weight_bytes(self)
    }
    fn split_min_keys(&mut self) -> Result<usize> {
        Ok(self.options().split_min_keys)
    }
    fn set_split_min_keys(&mut self, keys: usize) -> Result<()> {
        CudaBackend::set_split_min_keys(self, keys);
        Ok(())
    }
    fn set_attention_blocks_per_sm(&mut self, blocks: usize) -> Result<()> {
        CudaBackend::set_attention_blocks_per_sm(self, blocks);
        Ok(())
    }
    fn set_profiling(&mut self, on: bool) -> Result<()> {
        CudaBackend::set_profiling(self, on);
        Ok(())
    }
    fn set_fused_combine(&mut self, on: bool) -> Result<()> {
        CudaBackend::set_fused_combine(self, on);
        Ok(())
    }
    fn set_enforce_eager(&mut self, on: bool) -> Result<()> {
        CudaBackend::set_enforce_eager(self, on);
        Ok(())
    }
    fn take_profile(&mut self) -> Result<Vec<(&'static str, f64, usize)>> {
        Ok(CudaBackend::take_profile(self))
    }
}

impl Bench for TpBackend {
    fn fill_kv_random(&mut self, seed: u64) -> Result<()> {
        TpBackend::fill_kv_random(self, seed)
    }
    fn weight_bytes(&self) -> usize {
        TpBackend::weight_bytes(self)
    }
    fn split_min_keys(&mut self) -> Result<usize> {
        TpBackend::split_min_keys(self)
    }
    fn set_split_min_keys(&mut self, keys: usize) -> Result<()> {
        TpBackend::set_split_min_keys(self, keys)
    }
    fn set_attention_blocks_per_sm(&mut self, blocks: usize) -> Result<()> {
        TpBackend::set_attention_blocks_per_sm(self, blocks)
    }
    fn set_profiling(&mut self, on: bool) -> Result<()> {
        TpBackend::set_profiling(self, on)
    }
    fn set_enforce_eager(&mut self, on: bool) -> Result<()> {
        TpBackend::set_enforce_eager(self, on)
    }
    fn take_profile(&mut self) -> Result<Vec<(&'static str, f64, usize)>> {
        TpBackend::take_profile(self)
    }
}

fn time_steps(b: &mut dyn Bench, batch: &Batch, iters: usize) -> Result<f64> {
    for _ in 0..3 {
        b.step(batch)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        b.step(batch)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median_ms(times))
}

/// One more step with CUDA-event timing of every kernel: {kernel: {ms, launches}}.
fn profile_step(b: &mut dyn Bench, batch: &Batch, what: &str) -> Result<serde_json::Value> {
    b.set_profiling(true)?;
    b.step(batch)?;
    b.set_profiling(false)?;
    let mut map = serde_json::Map::new();
    let mut line = format!("profile {what}:");
    for (label, ms, n) in b.take_profile()? {
        line += &format!(" {label} {ms:.3}ms/{n}");
        map.insert(
            label.to_string(),
            serde_json::json!({ "ms": ms, "launches": n }),
        );
    }
    eprintln!("{line}");
    Ok(serde_json::Value::Object(map))
}

fn greedy() -> Emit {
    Emit::Sample(DeviceSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        uniform: 0.0,
    })
}

pub fn run(args: Args) -> Result<()> {
    if args.load_format != "dummy" {
        bail!("bench-step supports only --load-format dummy");
    }
    let path = config_path(&args.model);
    let config = LlamaConfig::from_file(&path).with_context(|| format!("model {}", args.model))?;
    let bs = args.block_size;
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let t0 = Instant::now();
    let opts = CudaOptions {
        block_size: bs,
        gpu_memory_utilization: args.gpu_memory_utilization,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_num_seqs: max_batch.max(256),
        enforce_eager: args.enforce_eager,
        kv_cache_dtype: args.kv_cache_dtype,
        ..Default::default()
    };
    let tp = args.tensor_parallel_size.max(1);
    let mut b: Box<dyn Bench> = if tp > 1 {
        Box::new(TpBackend::new(
            &config,
            TpWeights::Dummy { seed: 0 },
            opts,
            tp,
        )?)
    } else {
        Box::new(CudaBackend::new(
            &config,
            WeightSource::Dummy { seed: 0 },
            opts,
        )?)
    };
    let b = b.as_mut();
    let load_s = t0.elapsed().as_secs_f64();
    let num_blocks = b.num_kv_blocks();
    b.fill_kv_random(1)?;
    let mut results = serde_json::Map::new();
    results.insert("model".into(), args.model.clone().into());
    results.insert("load_seconds".into(), load_s.into());
    results.insert(
        "weight_gib".into(),
        (b.weight_bytes() as f64 / (1u64 << 30) as f64).into(),
    );
    results.insert("tensor_parallel_size".into(), tp.into());
    results.insert("kv_blocks".into(), num_blocks.into());
    results.insert("kv_capacity_tokens".into(), (num_blocks * bs).into());
    results.insert(
        "kv_cache_dtype".into(),
        format!("{:?}", args.kv_cache_dtype).to_lowercase().into(),
    );
    results.insert(
        "gpu_memory_utilization".into(),
        args.gpu_memory_utilization.into(),
    );

    let per_seq = (args.context + 1).div_ceil(bs);
    for &batch_size in &args.batch {
        if batch_size * per_seq > num_blocks {
            bail!(
                "batch {batch_size} at context {} needs {} KV blocks; the pool has {num_blocks}",
                args.context,
                batch_size * per_seq
            );
        }
        let seqs = (0..batch_size)
            .map(|s| SeqChunk {
                tokens: vec![(s as u32 * 7919 + 13) % config.vocab_size as u32],
                start_pos: args.context,
                block_table: ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect(),
                emit: greedy(),
            })
            .collect();
        let batch = Batch { seqs };
        let ms = time_steps(b, &batch, args.iters)?;
        eprintln!(
            "decode batch {batch_size} context {}: {ms:.3} ms/step",
            args.context
        );
        let key = format!("decode_step_ms_batch{batch_size}_ctx{}", args.context);
        results.insert(format!("profile_{key}"), profile_step(b, &batch, &key)?);
        if args.compare_no_split {
            let default_keys = b.split_min_keys()?;
            b.set_split_min_keys(usize::MAX / 2)?;
            let plain = time_steps(b, &batch, args.iters)?;
            eprintln!("  without split-K attention: {plain:.3} ms/step");
            let plain_key = format!("{key}_nosplit");
            results.insert(
                format!("profile_{plain_key}"),
                profile_step(b, &batch, &plain_key)?,
            );
            results.insert(plain_key, plain.into());
            b.set_split_min_keys(default_keys)?;
        }
        if let Some(per_sm) = args.compare_split_blocks_per_sm {
            b.set_attention_blocks_per_sm(per_sm)?;
            let other = time_steps(b, &batch, args.iters)?;
            eprintln!("  split-K aiming at {per_sm} blocks per SM: {other:.3} ms/step");
            let other_key = format!("{key}_split{per_sm}");
            results.insert(
                format!("profile_{other_key}"),
                profile_step(b, &batch, &other_key)?,
            );
            results.insert(other_key, other.into());
            b.set_attention_blocks_per_sm(4)?;
        }
        if args.compare_combine_pair {
            b.set_fused_combine(false)?;
            let pair = time_steps(b, &batch, args.iters)?;
            eprintln!("  split rows merged and quantized by two kernels: {pair:.3} ms/step");
            let pair_key = format!("{key}_pair");
            results.insert(
                format!("profile_{pair_key}"),
                profile_step(b, &batch, &pair_key)?,
            );
            results.insert(pair_key, pair.into());
            b.set_fused_combine(true)?;
        }
        if args.compare_eager {
            b.set_enforce_eager(!args.enforce_eager)?;
            let other = time_steps(b, &batch, args.iters)?;
            let what = if args.enforce_eager {
                "graphs"
            } else {
                "eager"
            };
            eprintln!("  {what}: {other:.3} ms/step");
            results.insert(format!("{key}_{what}"), other.into());
            b.set_enforce_eager(args.enforce_eager)?;
        }
        results.insert(key, ms.into());
    }

    let per_prompt = args.prompt_len.div_ceil(bs);
    for &prompts in &args.prefill_batch {
        if prompts * args.prompt_len > args.max_num_batched_tokens
            || prompts * per_prompt > num_blocks
        {
            eprintln!("skipping prefill of {prompts} prompts: over the token or block budget");
            continue;
        }
        let seqs = (0..prompts)
            .map(|s| SeqChunk {
                tokens: (0..args.prompt_len as u32)
                    .map(|i| (i * 31 + s as u32 * 17 + 5) % config.vocab_size as u32)
                    .collect(),
                start_pos: 0,
                block_table: ((s * per_prompt) as u32..((s + 1) * per_prompt) as u32).collect(),
                emit: greedy(),
            })
            .collect();
        let batch = Batch { seqs };
        let ms = time_steps(b, &batch, args.iters.min(10))?;
        let tps = (prompts * args.prompt_len) as f64 / (ms / 1e3);
        let key = format!("prefill_{prompts}x{}", args.prompt_len);
        results.insert(format!("profile_{key}"), profile_step(b, &batch, &key)?);
        eprintln!(
            "prefill {prompts} x {} tokens: {ms:.1} ms/step, {tps:.0} tokens/s",
            args.prompt_len
        );
        results.insert(
            format!("prefill_ms_{prompts}x{}", args.prompt_len),
            ms.into(),
        );
        results.insert(
            format!("prefill_tokens_per_s_{prompts}x{}", args.prompt_len),
            tps.into(),
        );
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::Value::Object(results))?
    );
    Ok(())
}
