//! `tandem bench-gemm`: times every FP8 product path on a model's linear shapes (qkv, o, gate_up,
//! down) at decode and small-prefill batch sizes, and prints JSON: per (shape, M, path) the time,
//! weight bandwidth (weight bytes / time) and TFLOP/s, plus the path the policy picks.
//!
//! Weights are random e4m3 in enough copies (rotated) that every launch reads them from HBM, not
//! from the 50 MB L2.

use crate::backend::cuda::device::{DeviceBuffer, Gpu};
use crate::backend::cuda::gemm::{Fp8Path, Gemm};
use crate::backend::cuda::kernels::Kernels;
use crate::backend::cuda::ops::{Ops, Precision};
use crate::backend::cuda::shard::Shard;
use crate::model::config::LlamaConfig;
use anyhow::{Context, Result};
use cudarc::driver::{result, sys};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model directory or a preset name under `models/` (only config.json is read).
    #[arg(long, default_value = "llama-3.3-70b-fp8-dynamic")]
    pub model: String,
    /// Token counts (M) to time.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128")]
    pub m: Vec<usize>,
    /// Timed launches per measurement (after 3 warm-ups).
    #[arg(long, default_value_t = 30)]
    pub iters: usize,
    /// Time one tensor-parallel rank's shapes (the linears cut `world` ways).
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,
}

/// Weight bytes streamed per shape across rotated copies, so that L2 (50 MB) cannot hold them.
const ROTATE_BYTES: usize = 256 << 20;

struct Shape {
    name: &'static str,
    n: usize,
    k: usize,
}

fn shapes(c: &LlamaConfig) -> Vec<Shape> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    vec![
        Shape {
            name: "qkv",
            n: c.q_size() + 2 * c.kv_size(),
            k: h,
        },
        Shape {
            name: "o",
            n: h,
            k: c.q_size(),
        },
        Shape {
            name: "gate_up",
            n: 2 * i,
            k: h,
        },
        Shape {
            name: "down",
            n: h,
            k: i,
        },
    ]
}

/// Mean ms per launch of `f` over `iters` back-to-back launches, timed with CUDA events.
fn time_ms(gpu: &Gpu, iters: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    for i in 0..3 {
        f(i)?;
    }
    let stream = gpu.cu_stream();
    let start = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)?;
    let end = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)?;
    // SAFETY: live events and stream; destroyed below.
    let ms = unsafe {
        result::event::record(start, stream)?;
        for i in 0..iters {
            f(i)?;
        }
        result::event::record(end, stream)?;
        gpu.sync()?;
        let ms = result::event::elapsed(start, end)? as f64;
        let _ = result::event::destroy(start);
        let _ = result::event::destroy(end);
        ms
    };
    Ok(ms / iters as f64)
}

pub fn run(args: Args) -> Result<()> {
    let path = super::bench_step::config_path(&args.model);
    let full = LlamaConfig::from_file(&path).with_context(|| format!("model {}", args.model))?;
    let config = Shard {
        rank: 0,
        world: args.tensor_parallel_size,
    }
    .local_config(&full)?;
    let gpu = Gpu::new(0)?;
    let kernels = Kernels::load().context("loading the CUDA kernels")?;
    let mut gemm = Gemm::new()?;
    let ops = Ops {
        k: &kernels,
        stream: gpu.cu_stream(),
        act: Precision::Bf16,
    };
    let max_m = args.m.iter().copied().max().unwrap_or(1);
    let mut rows = vec![];
    for s in shapes(&config) {
        let bytes = s.n * s.k;
        let copies = ROTATE_BYTES.div_ceil(bytes).max(2);
        let weights: Vec<DeviceBuffer> = (0..copies)
            .map(|_| gpu.alloc(bytes))
            .collect::<Result<_>>()?;
        for (c, w) in weights.iter().enumerate() {
            ops.fill_fp8(w.ptr, bytes, 7 + c as u64, -448.0, 448.0)?;
        }
        let w_scale = gpu.alloc(s.n * 4)?;
        ops.fill_f32(w_scale.ptr, s.n, 3, 1e-4, 1e-3)?;
        let (xq, xs) = (gpu.alloc(max_m * s.k)?, gpu.alloc(max_m * 4)?);
        ops.fill_fp8(xq.ptr, max_m * s.k, 5, -448.0, 448.0)?;
        ops.fill_f32(xs.ptr, max_m, 6, 1e-3, 1e-2)?;
        let out = gpu.alloc(max_m * s.n * 2)?;
        gpu.sync()?;
        for &m in &args.m {
            let auto = gemm.fp8_path(m, s.n, s.k, false);
            let paths = [Fp8Path::OuterVector, Fp8Path::Unscaled, Fp8Path::Stream];
            let mut best: Option<(f64, String)> = None;
            for path in paths {
                let timed = time_ms(&gpu, args.iters, |i| {
                    let w = &weights[i % copies];
                    gemm.fp8_by(
                        path,
                        &kernels,
                        m,
                        s.n,
                        s.k,
                        xq.ptr,
                        xs.ptr,
                        w.ptr,
                        w_scale.ptr,
                        out.ptr,
                        false,
                        gpu.cu_stream(),
                    )
                });
                let ms = match timed {
                    Ok(ms) => ms,
                    Err(e) => {
                        eprintln!("{} M={m} {path:?}: skipped ({e:#})", s.name);
                        gpu.sync()?;
                        continue;
                    }
                };
                let gbps = bytes as f64 / (ms * 1e-3) / 1e9;
                let tflops = 2.0 * (m * bytes) as f64 / (ms * 1e-3) / 1e12;
                let label = format!("{path:?}");
                eprintln!(
                    "{:8} M={m:4} {label:26} {:8.1} us {gbps:7.0} GB/s {tflops:6.1} TFLOP/s{}",
                    s.name,
                    ms * 1e3,
                    if path == auto { "  (policy)" } else { "" }
                );
                if best.as_ref().is_none_or(|(b, _)| ms < *b) {
                    best = Some((ms, label.clone()));
                }
                rows.push(serde_json::json!({
                    "shape": s.name, "n": s.n, "k": s.k, "m": m, "path": label,
                    "policy": path == auto, "us": ms * 1e3, "weight_gbps": gbps, "tflops": tflops,
                }));
            }
            if let Some((ms, label)) = best {
                eprintln!(
                    "{:8} M={m:4} best {label} {:.1} us; policy {auto:?}",
                    s.name,
                    ms * 1e3
                );
            }
        }
    }
    let policy = gemm.fp8_policy;
    println!(
        "{}",
        serde_json::json!({
            "model": args.model,
            "tensor_parallel_size": args.tensor_parallel_size,
            "policy": {
                "stream_max_m": policy.stream_max_m,
                "unscaled_max_m": policy.unscaled_max_m,
                "stream_max_weight": policy.stream_max_weight,
            },
            "results": rows,
        })
    );
    Ok(())
}
