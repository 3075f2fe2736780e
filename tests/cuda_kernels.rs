//! Each CUDA kernel (and cuBLASLt product) against a naive host reference, on fresh random inputs,
//! with outputs poisoned (0xFF bytes: NaN) before each run. Skips when no GPU is present.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem::backend::cuda::device::{gpu_available, DeviceBuffer, Gpu};
use tandem::backend::cuda::gemm::{Fp8Path, Gemm};
use tandem::backend::cuda::kernels::Kernels;
use tandem::backend::cuda::meta::{plan_step, SplitPolicy};
use tandem::backend::cuda::ops::{
    combine_fp8_heads_per_block, combine_fp8_scratch_bytes, flash_decode_supported, AttentionArgs,
    Ops, Precision,
};
use tandem::backend::{Batch, Emit, SeqChunk};

struct Env {
    gpu: Gpu,
    kernels: Kernels,
}

impl Env {
    fn ops(&self) -> Ops<'_> {
        Ops {
            k: &self.kernels,
            stream: self.gpu.cu_stream(),
            act: Precision::Bf16,
        }
    }
    fn poisoned(&self, bytes: usize) -> DeviceBuffer {
        let b = self.gpu.alloc(bytes).unwrap();
        self.gpu.memset(&b, 0xFF).unwrap();
        b
    }
    fn bf16s(&self, b: &DeviceBuffer, n: usize) -> Vec<f32> {
        let v: Vec<bf16> = self.gpu.download(b, n).unwrap();
        v.iter().map(|x| x.to_f32()).collect()
    }
    fn f32s(&self, b: &DeviceBuffer, n: usize) -> Vec<f32> {
        self.gpu.download(b, n).unwrap()
    }
}

fn env() -> Option<(Env, ChaCha8Rng)> {
    if !gpu_available() {
        eprintln!("skipping: no CUDA GPU on this machine");
        return None;
    }
    let gpu = Gpu::new(0).expect("GPU present but unusable");
    let kernels = Kernels::load().expect("kernels must load");
    let seed: u64 = rand::rng().random();
    eprintln!("input seed {seed}");
    Some((Env { gpu, kernels }, ChaCha8Rng::seed_from_u64(seed)))
}

fn rand_bf16(rng: &mut ChaCha8Rng, n: usize, a: f32) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-a..a)))
        .collect()
}

fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// ‖out − ref‖ / ‖ref‖; infinite when any output is not finite.
fn rel_err(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    if out.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(&o, &r)| (o as f64 - r).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|r| r * r).sum();
    (num / den.max(1e-300)).sqrt()
}

fn check(name: &str, out: &[f32], reference: &[f64], tol: f64) {
    let e = rel_err(out, reference);
    println!("{name}: rel err {e:.2e} (tol {tol:.0e})");
    assert!(e < tol, "{name}: relative error {e} over {tol}");
}

#[test]
fn embed_gathers_rows() {
    let Some((e, mut rng)) = env() else { return };
    let (vocab, h, n) = (1000, 96, 37);
    let table = rand_bf16(&mut rng, vocab * h, 1.0);
    let tokens: Vec<i32> = (0..n).map(|_| rng.random_range(0..vocab as i32)).collect();
    let (dt, dk) = (
        e.gpu.upload(&table).unwrap(),
        e.gpu.upload(&tokens).unwrap(),
    );
    let out = e.poisoned(n * h * 4);
    e.ops().embed(out.ptr, dt.ptr, dk.ptr, n, h).unwrap();
    let got = e.f32s(&out, n * h);
    let want: Vec<f64> = tokens
        .iter()
        .flat_map(|&t| table[t as usize * h..][..h].iter().map(|x| x.to_f64()))
        .collect();
    check("embed", &got, &want, 1e-12);
}

#[test]
fn add_rmsnorm_and_final_rows() {
    let Some((e, mut rng)) = env() else { return };
    let (n, h, eps) = (19, 1000, 1e-5f32);
    let res: Vec<f32> = (0..n * h).map(|_| rng.random_range(-2.0..2.0)).collect();
    let delta = rand_bf16(&mut rng, n * h, 1.0);
    let w = rand_bf16(&mut rng, h, 1.5);
    let (dr, dd, dw) = (
        e.gpu.upload(&res).unwrap(),
        e.gpu.upload(&delta).unwrap(),
        e.gpu.upload(&w).unwrap(),
    );
    let out = e.poisoned(n * h * 2);
    e.ops()
        .add_rmsnorm(dr.ptr, dd.ptr, dw.ptr, out.ptr, n, h, eps)
        .unwrap();
    let summed: Vec<f64> = res
        .iter()
        .zip(&delta)
        .map(|(&r, d)| r as f64 + d.to_f64())
        .collect();
    let norm = |row: &[f64]| -> Vec<f64> {
        let ms = row.iter().map(|x| x * x).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        row.iter()
            .zip(&w)
            .map(|(x, w)| x * inv * w.to_f64())
            .collect()
    };
    let want: Vec<f64> = summed.chunks(h).flat_map(norm).collect();
    check("add_rmsnorm residual", &e.f32s(&dr, n * h), &summed, 1e-6);
    check("add_rmsnorm out", &e.bf16s(&out, n * h), &want, 1e-2);

    // Without delta: plain norm of the (now summed) residual.
    let out2 = e.poisoned(n * h * 2);
    e.ops()
        .add_rmsnorm(dr.ptr, 0, dw.ptr, out2.ptr, n, h, eps)
        .unwrap();
    check("rmsnorm (no delta)", &e.bf16s(&out2, n * h), &want, 1e-2);

    // final_norm_rows on a few rows of (residual + delta), residual left alone.
    let rows: Vec<i32> = vec![3, 0, 18];
    let drows = e.gpu.upload(&rows).unwrap();
    let out3 = e.poisoned(rows.len() * h * 2);
    e.ops()
        .final_norm_rows(
            out3.ptr,
            dr.ptr,
            dd.ptr,
            drows.ptr,
            dw.ptr,
            rows.len(),
            h,
            eps,
        )
        .unwrap();
    let want3: Vec<f64> = rows
        .iter()
        .flat_map(|&r| {
            let row: Vec<f64> = (0..h)
                .map(|i| summed[r as usize * h + i] + delta[r as usize * h + i].to_f64())
                .collect();
            norm(&row)
        })
        .collect();
    check(
        "final_norm_rows",
        &e.bf16s(&out3, rows.len() * h),
        &want3,
        1e-2,
    );
    check(
        "final_norm_rows keeps residual",
        &e.f32s(&dr, n * h),
        &summed,
        1e-6,
    );
}

#[test]
fn rope_rotates_q_and_k_heads() {
    let Some((e, mut rng)) = env() else { return };
    // Pairs spread over several blocks per row; a 70B decode row (64 q + 8 kv heads).
    for (n, nh, nkv, hd) in [(23, 8, 2, 128), (1, 64, 8, 128), (3, 4, 1, 64)] {
        rope_case(&e, &mut rng, n, nh, nkv, hd);
    }
}

fn rope_case(e: &Env, rng: &mut ChaCha8Rng, n: usize, nh: usize, nkv: usize, hd: usize) {
    let stride = (nh + 2 * nkv) * hd;
    let qkv = rand_bf16(rng, n * stride, 1.0);
    let pos: Vec<i32> = (0..n).map(|_| rng.random_range(0..5000)).collect();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let (dq, dp, di) = (
        e.gpu.upload(&qkv).unwrap(),
        e.gpu.upload(&pos).unwrap(),
        e.gpu.upload(&inv).unwrap(),
    );
    e.ops()
        .rope(dq.ptr, dp.ptr, di.ptr, n, stride, nh, nkv, hd)
        .unwrap();
    let mut want: Vec<f64> = qkv.iter().map(|x| x.to_f64()).collect();
    for t in 0..n {
        for head in 0..nh + nkv {
            let base = t * stride + head * hd;
            for i in 0..hd / 2 {
                let ang = pos[t] as f64 * inv[i] as f64;
                let (s, c) = ang.sin_cos();
                let (x0, x1) = (qkv[base + i].to_f64(), qkv[base + i + hd / 2].to_f64());
                want[base + i] = x0 * c - x1 * s;
                want[base + i + hd / 2] = x1 * c + x0 * s;
            }
        }
    }
    check(
        &format!("rope {n}x{nh}+{nkv}x{hd}"),
        &e.bf16s(&dq, n * stride),
        &want,
        1e-2,
    );
}

#[test]
fn silu_mul_matches() {
    let Some((e, mut rng)) = env() else { return };
    let (n, inter) = (13, 700);
    let gu = rand_bf16(&mut rng, n * 2 * inter, 4.0);
    let dg = e.gpu.upload(&gu).unwrap();
    let out = e.poisoned(n * inter * 2);
    e.ops().silu_mul(out.ptr, dg.ptr, n, inter).unwrap();
    let want: Vec<f64> = (0..n * inter)
        .map(|j| {
            let (t, i) = (j / inter, j % inter);
            let g = gu[t * 2 * inter + i].to_f64();
            g / (1.0 + (-g).exp()) * gu[t * 2 * inter + inter + i].to_f64()
        })
        .collect();
    check("silu_mul", &e.bf16s(&out, n * inter), &want, 1e-2);
}

#[test]
fn quantize_fp8_per_token() {
    let Some((e, mut rng)) = env() else { return };
    let (n, k) = (17, 1024);
    let mut x = rand_bf16(&mut rng, n * k, 3.0);
    x[5 * k + 7] = bf16::from_f32(1000.0); // one outlier row
    let dx = e.gpu.upload(&x).unwrap();
    let (q, s) = (e.poisoned(n * k), e.poisoned(n * 4));
    e.ops().quantize_fp8(q.ptr, s.ptr, dx.ptr, n, k).unwrap();
    let qs: Vec<u8> = e.gpu.download(&q, n * k).unwrap();
    let scales = e.f32s(&s, n);
    let want_scales: Vec<f64> = x
        .chunks(k)
        .map(|r| {
            (r.iter().map(|v| v.to_f64().abs()).fold(0.0, f64::max) / 448.0)
                .max(1.0 / (448.0 * 512.0))
        })
        .collect();
    check("fp8 scales", &scales, &want_scales, 1e-6);
    let deq: Vec<f32> = qs
        .iter()
        .enumerate()
        .map(|(i, &b)| float8::F8E4M3::from_bits(b).to_f32() * scales[i / k])
        .collect();
    check(
        "fp8 dequantized vs input",
        &deq,
        &x.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
        4e-2,
    );
    let exact = qs
        .iter()
        .enumerate()
        .filter(|(i, &b)| float8::F8E4M3::from_f32(x[*i].to_f32() / scales[i / k]).to_bits() == b)
        .count();
    println!("fp8 codes equal to host rounding: {exact}/{}", n * k);
    assert!(exact as f64 >= 0.999 * (n * k) as f64);

    // The F32 mode's in-place version gives exactly the dequantized codes.
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let dxf = e.gpu.upload(&xf).unwrap();
    e.ops().fake_quant_fp8_f32(dxf.ptr, n, k).unwrap();
    let fq = e.f32s(&dxf, n * k);
    let same = fq.iter().zip(&deq).filter(|(a, b)| a == b).count();
    println!("fake_quant_fp8_f32 equal to scale * code: {same}/{}", n * k);
    assert!(same as f64 >= 0.999 * (n * k) as f64);
}

#[test]
fn kv_write_fills_only_its_slots() {
    let Some((e, mut rng)) = env() else { return };
    // 16-byte copies (head_dim 64), the scalar path (head_dim 6), a 70B row (8 x 128).
    for (nkv, hd, nh) in [(2, 64, 4), (3, 6, 6), (8, 128, 64)] {
        kv_write_case(&e, &mut rng, nkv, hd, nh);
    }
}

fn kv_write_case(e: &Env, rng: &mut ChaCha8Rng, nkv: usize, hd: usize, nh: usize) {
    let (bs, blocks, n) = (16, 6, 20);
    let stride = (nh + 2 * nkv) * hd;
    let qkv = rand_bf16(rng, n * stride, 1.0);
    let mut slots: Vec<i32> = (0..(blocks * bs) as i32).collect();
    for i in (1..slots.len()).rev() {
        let j = rng.random_range(0..=i);
        slots.swap(i, j);
    }
    slots.truncate(n);
    slots[3] = -1; // padding token: skipped
    let (dq, ds) = (e.gpu.upload(&qkv).unwrap(), e.gpu.upload(&slots).unwrap());
    let cache_elems = blocks * nkv * bs * hd;
    let (kc, vc) = (e.poisoned(cache_elems * 2), e.poisoned(cache_elems * 2));
    e.ops()
        .kv_write(
            kc.ptr,
            vc.ptr,
            dq.ptr,
            ds.ptr,
            n,
            stride,
            nh * hd,
            (nh + nkv) * hd,
            nkv,
            hd,
            bs,
        )
        .unwrap();
    let (k, v): (Vec<u16>, Vec<u16>) = (
        e.gpu.download(&kc, cache_elems).unwrap(),
        e.gpu.download(&vc, cache_elems).unwrap(),
    );
    let mut written = 0;
    for (t, &slot) in slots.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let (b, off) = (slot as usize / bs, slot as usize % bs);
        for h in 0..nkv {
            for d in 0..hd {
                let at = ((b * nkv + h) * bs + off) * hd + d;
                assert_eq!(k[at], qkv[t * stride + nh * hd + h * hd + d].to_bits());
                assert_eq!(
                    v[at],
                    qkv[t * stride + (nh + nkv) * hd + h * hd + d].to_bits()
                );
                written += 1;
            }
        }
    }
    let untouched = k.iter().filter(|&&x| x == 0xFFFF).count();
    assert_eq!(
        untouched,
        cache_elems - written,
        "kv_write wrote outside its slots"
    );
}

/// Host attention for one query: softmax(q·K/√d)·V over keys 0..=pos of a paged sequence.
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f64],
    kc: &[bf16],
    vc: &[bf16],
    table: &[u32],
    pos: usize,
    kvh: usize,
    nkv: usize,
    bs: usize,
    hd: usize,
) -> Vec<f64> {
    let at = |p: usize, d: usize| ((table[p / bs] as usize * nkv + kvh) * bs + p % bs) * hd + d;
    let scores: Vec<f64> = (0..=pos)
        .map(|p| (0..hd).map(|d| q[d] * kc[at(p, d)].to_f64()).sum::<f64>() / (hd as f64).sqrt())
        .collect();
    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
    let z: f64 = w.iter().sum();
    (0..hd)
        .map(|d| (0..=pos).map(|p| w[p] * vc[at(p, d)].to_f64()).sum::<f64>() / z)
        .collect()
}

/// One attention shape: heads, head_dim, block size, pool blocks, and the sequences of the batch
/// as (first position of the chunk, chunk length, block table).
struct AttentionCase {
    nh: usize,
    nkv: usize,
    hd: usize,
    bs: usize,
    num_blocks: usize,
    seqs: Vec<(usize, usize, Vec<u32>)>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum AttnKernel {
    /// The tensor-core kernel for prefill chunks (and mixed batches), P of prefill blocks as plain
    /// BF16 (`TANDEM_FLASH_PREFILL=bf16`).
    Flash,
    /// The same with P of prefill blocks as BF16 hi + lo (the default).
    FlashHiLo,
    /// The tensor-core kernel for decode-only batches.
    Decode,
    CudaCores,
}

/// Runs `case` on random inputs against [`ref_attention`]: whole tiles, decode tiles split into
/// key ranges (merged by attention_combine) at the tightest and at the serving split policy, with
/// the tensor-core kernel (P of prefill blocks as plain BF16 and as hi + lo), the CUDA-core one
/// and, for a decode-only batch, the decode kernel (which must also agree closely with the prefill
/// kernel on the same tokens).
fn check_attention(e: &Env, rng: &mut ChaCha8Rng, c: &AttentionCase) {
    let (nh, nkv, hd, bs) = (c.nh, c.nkv, c.hd, c.bs);
    let stride = (nh + 2 * nkv) * hd;
    let cache_elems = c.num_blocks * nkv * bs * hd;
    let kc = rand_bf16(rng, cache_elems, 1.0);
    let vc = rand_bf16(rng, cache_elems, 1.0);
    let batch = Batch {
        seqs: c
            .seqs
            .iter()
            .map(|(start, len, table)| SeqChunk {
                tokens: vec![0; *len],
                start_pos: *start,
                block_table: table.clone(),
                emit: Emit::Nothing,
            })
            .collect(),
    };
    let n = batch.num_tokens();
    // Large enough queries that the softmax is far from uniform.
    let qkv = rand_bf16(rng, n * stride, 2.0);
    let (dk, dv, dq) = (
        e.gpu.upload(&kc).unwrap(),
        e.gpu.upload(&vc).unwrap(),
        e.gpu.upload(&qkv).unwrap(),
    );
    let mut want = Vec::with_capacity(n * nh * hd);
    let mut t = 0;
    for (start, len, table) in &c.seqs {
        for i in 0..*len {
            for h in 0..nh {
                let q: Vec<f64> = (0..hd)
                    .map(|d| qkv[t * stride + h * hd + d].to_f64())
                    .collect();
                want.extend(ref_attention(
                    &q,
                    &kc,
                    &vc,
                    table,
                    start + i,
                    h / (nh / nkv),
                    nkv,
                    bs,
                    hd,
                ));
            }
            t += 1;
        }
    }
    let tight = SplitPolicy {
        target_blocks: 10_000,
        kv_heads: nkv,
        max_parts: 256,
        min_keys: 32,
    };
    let serving = SplitPolicy {
        target_blocks: 4 * 132,
        min_keys: 128,
        ..tight
    };
    // Output rows (as f32) and, per token, whether its tile had more than one query.
    let run = |kernel: AttnKernel, q_per_tile: usize, policy: Option<SplitPolicy>| {
        let plan = plan_step(&batch, bs, c.num_blocks, 1, q_per_tile, policy).unwrap();
        let meta = e.gpu.upload(&plan.packed).unwrap();
        let m = |off: usize| meta.ptr + 4 * off as u64;
        let at = &plan.at;
        let part_ml = e.poisoned(256 * nh * 2 * 4);
        let part_acc = e.poisoned(256 * nh * hd * 4);
        let out = e.poisoned(n * nh * hd * 2);
        let args = AttentionArgs {
            out: out.ptr,
            qkv: dq.ptr,
            k_cache: dk.ptr,
            v_cache: dv.ptr,
            positions: m(at.positions),
            tile_seq: m(at.tile_seq),
            tile_q_start: m(at.tile_q_start),
            tile_q_len: m(at.tile_q_len),
            block_tables: m(at.block_tables),
            block_table_start: m(at.block_table_start),
            tile_kbeg: m(at.tile_kbeg),
            tile_kend: m(at.tile_kend),
            tile_part: m(at.tile_part),
            part_ml: part_ml.ptr,
            part_acc: part_acc.ptr,
            num_tiles: plan.num_tiles,
            row_stride: stride,
            q_heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
            scale: 1.0 / (hd as f32).sqrt(),
            q_per_tile,
            decode_only: plan.all_decode,
        };
        match kernel {
            AttnKernel::Flash => e.ops().flash_attention_p(&args, false).unwrap(),
            AttnKernel::FlashHiLo => e.ops().flash_attention_p(&args, true).unwrap(),
            AttnKernel::Decode => e.ops().flash_decode(&args).unwrap(),
            AttnKernel::CudaCores => e.ops().paged_attention_cuda_cores(&args).unwrap(),
        }
        if plan.num_groups > 0 {
            let (g0, gn, gq) = (m(at.group_part0), m(at.group_nparts), m(at.group_q0));
            e.ops()
                .attention_combine(
                    out.ptr,
                    part_ml.ptr,
                    part_acc.ptr,
                    g0,
                    gn,
                    gq,
                    plan.num_groups,
                    nh,
                    nkv,
                    hd,
                )
                .unwrap();
        }
        let mut multi = vec![false; n];
        for t in 0..plan.num_tiles {
            let (q0, qn) = (
                plan.packed[at.tile_q_start + t] as usize,
                plan.packed[at.tile_q_len + t] as usize,
            );
            multi[q0..q0 + qn].iter_mut().for_each(|x| *x = qn > 1);
        }
        (e.bf16s(&out, n * nh * hd), multi, plan.num_parts)
    };
    let group = nh / nkv;
    let all_decode = c.seqs.iter().all(|s| s.1 == 1);
    let mut kernels = vec![
        AttnKernel::Flash,
        AttnKernel::FlashHiLo,
        AttnKernel::CudaCores,
    ];
    if all_decode && flash_decode_supported(group, hd, Precision::Bf16) {
        kernels.push(AttnKernel::Decode);
    }
    for &kernel in &kernels {
        let precision = match kernel {
            AttnKernel::CudaCores => Precision::F32, // only picks the tile size; data stays BF16
            _ => Precision::Bf16,
        };
        let q_per_tile = Ops::attention_tokens_per_tile(group, hd, precision);
        for policy in [None, Some(tight), Some(serving)] {
            let (out, _, parts) = run(kernel, q_per_tile, policy);
            let what =
                format!("{kernel:?} nh={nh} nkv={nkv} hd={hd} bs={bs} q_per_tile={q_per_tile} parts={parts}");
            check(&what, &out, &want, 1e-2);
        }
    }
    let flash_q_per_tile = Ops::attention_tokens_per_tile(group, hd, Precision::Bf16);
    if kernels.contains(&AttnKernel::Decode) {
        // Decode and prefill kernels on the same tokens: both keep P at F32-like accuracy, so they
        // differ by little more than the final BF16 rounding (FP8 models amplify any more).
        let (prefill, _, _) = run(AttnKernel::Flash, flash_q_per_tile, None);
        let prefill: Vec<f64> = prefill.iter().map(|&x| x as f64).collect();
        for policy in [None, Some(serving)] {
            let (decode, _, parts) = run(AttnKernel::Decode, flash_q_per_tile, policy);
            let what =
                format!("decode vs prefill kernel nh={nh} nkv={nkv} hd={hd} bs={bs} parts={parts}");
            check(&what, &decode, &prefill, 3e-3);
        }
    }
    if all_decode {
        return; // no multi-query tiles to compare below
    }
    // Tensor cores: a token of a multi-query tile gets the same bits whatever else shares its
    // tile (so chunked and whole prefills agree exactly), with either P.
    let mut compared = 0;
    for kernel in [AttnKernel::Flash, AttnKernel::FlashHiLo] {
        let (big, big_multi, _) = run(kernel, flash_q_per_tile, None);
        let (small, small_multi, _) = run(kernel, 2, None);
        let row = nh * hd;
        for t in 0..n {
            if big_multi[t] && small_multi[t] {
                compared += 1;
                let (x, y) = (&big[t * row..(t + 1) * row], &small[t * row..(t + 1) * row]);
                assert!(
                    x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{kernel:?} token {t}: tiles of 2 queries differ from whole tiles (nh={nh} nkv={nkv} hd={hd} bs={bs})"
                );
            }
        }
    }
    assert!(compared > 0, "no token in multi-query tiles both ways");
}

/// Random split-decode partials: `nparts[g]` parts for group g, whose row is `q0[g]`.
struct CombineCase {
    nh: usize,
    hd: usize,
    n: usize,
    part_ml: DeviceBuffer,
    part_acc: DeviceBuffer,
    meta: DeviceBuffer,
    /// Host reference of the merged rows, [n, nh * hd].
    want: Vec<f64>,
}

fn combine_case(
    e: &Env,
    rng: &mut ChaCha8Rng,
    nh: usize,
    hd: usize,
    nparts: &[usize],
) -> CombineCase {
    let n = nparts.len();
    let total: usize = nparts.iter().sum();
    let ml: Vec<f32> = (0..total * nh)
        .flat_map(|_| {
            [
                rng.random_range(-4.0f32..4.0),
                rng.random_range(0.5f32..30.0),
            ]
        })
        .collect();
    let acc: Vec<f32> = (0..total * nh * hd)
        .map(|_| rng.random_range(-20.0f32..20.0))
        .collect();
    // Rows in another order than the groups (the kernel must follow group_q0).
    let q0: Vec<i32> = (0..n as i32).rev().collect();
    let mut part0 = vec![];
    let mut want = vec![0.0f64; n * nh * hd];
    let mut p = 0;
    for (g, &np) in nparts.iter().enumerate() {
        part0.push(p as i32);
        for h in 0..nh {
            let rows: Vec<usize> = (p..p + np).map(|q| q * nh + h).collect();
            let mx = rows
                .iter()
                .map(|&r| ml[2 * r] as f64)
                .fold(f64::MIN, f64::max);
            let w: Vec<f64> = rows
                .iter()
                .map(|&r| (ml[2 * r] as f64 - mx).exp())
                .collect();
            let sum: f64 = rows
                .iter()
                .zip(&w)
                .map(|(&r, w)| ml[2 * r + 1] as f64 * w)
                .sum();
            for d in 0..hd {
                let a: f64 = rows
                    .iter()
                    .zip(&w)
                    .map(|(&r, w)| acc[r * hd + d] as f64 * w)
                    .sum();
                want[q0[g] as usize * nh * hd + h * hd + d] = a / sum;
            }
        }
        p += np;
    }
    let np: Vec<i32> = nparts.iter().map(|&x| x as i32).collect();
    let meta: Vec<i32> = [part0, np, q0].concat();
    CombineCase {
        nh,
        hd,
        n,
        part_ml: e.gpu.upload(&ml).unwrap(),
        part_acc: e.gpu.upload(&acc).unwrap(),
        meta: e.gpu.upload(&meta).unwrap(),
        want,
    }
}

impl CombineCase {
    fn groups_at(&self) -> [u64; 3] {
        let at = |i: usize| self.meta.ptr + 4 * (i * self.n) as u64;
        [at(0), at(1), at(2)]
    }

    /// attention_combine then quantize_fp8: (rows, fp8 codes, scales) as bytes.
    fn pair(&self, e: &Env, ops: &Ops) -> (DeviceBuffer, DeviceBuffer, DeviceBuffer) {
        let cols = self.nh * self.hd;
        let out = e.poisoned(self.n * cols * ops.act.bytes());
        let (q, s) = (e.poisoned(self.n * cols), e.poisoned(self.n * 4));
        let [p0, np, q0] = self.groups_at();
        let (ml, acc) = (self.part_ml.ptr, self.part_acc.ptr);
        ops.attention_combine(out.ptr, ml, acc, p0, np, q0, self.n, self.nh, 1, self.hd)
            .unwrap();
        ops.quantize_fp8(q.ptr, s.ptr, out.ptr, self.n, cols)
            .unwrap();
        (out, q, s)
    }

    fn fused(
        &self,
        e: &Env,
        ops: &Ops,
        counters: &DeviceBuffer,
        heads_per_block: usize,
    ) -> (DeviceBuffer, DeviceBuffer, DeviceBuffer) {
        let cols = self.nh * self.hd;
        let out = e.poisoned(self.n * cols * ops.act.bytes());
        let (q, s) = (e.poisoned(self.n * cols), e.poisoned(self.n * 4));
        let scratch = e.poisoned(combine_fp8_scratch_bytes(self.n, self.nh));
        ops.attention_combine_fp8(
            out.ptr,
            q.ptr,
            s.ptr,
            counters.ptr,
            scratch.ptr,
            self.part_ml.ptr,
            self.part_acc.ptr,
            self.groups_at(),
            self.n,
            self.nh,
            self.hd,
            heads_per_block,
        )
        .unwrap();
        (out, q, s)
    }
}

/// Heads per block of the fused combine, and the shapes that must keep the unfused pair.
#[test]
fn combine_fp8_block_shapes() {
    assert_eq!(combine_fp8_heads_per_block(64, 128), Some(16));
    assert_eq!(combine_fp8_heads_per_block(32, 64), Some(32));
    assert_eq!(combine_fp8_heads_per_block(40, 128), Some(10));
    assert_eq!(combine_fp8_heads_per_block(7, 128), Some(7));
    assert_eq!(combine_fp8_heads_per_block(17, 128), Some(1));
    assert_eq!(combine_fp8_heads_per_block(8, 6), None);
    assert_eq!(combine_fp8_heads_per_block(0, 128), None);
    assert_eq!(combine_fp8_scratch_bytes(3, 64), 3 * 64 * 4);
}

/// The fused attention_combine_fp8 gives exactly the bytes of attention_combine followed by
/// quantize_fp8 (merged rows, FP8 codes, scales), for BF16 and F32 rows, any blocking, and leaves
/// its ticket counters zero; the merged rows match a host merge. Prints the launch times of both
/// at the 70B's decode shapes.
#[test]
fn attention_combine_fp8_matches_pair() {
    let Some((e, mut rng)) = env() else { return };
    let counters = e.gpu.alloc(64 * 4).unwrap();
    e.gpu.memset(&counters, 0).unwrap();
    let bytes = |b: &DeviceBuffer, len: usize| -> Vec<u8> { e.gpu.download(b, len).unwrap() };
    let random_parts = |rng: &mut ChaCha8Rng, n: usize, most: usize| -> Vec<usize> {
        (0..n).map(|_| rng.random_range(1..=most)).collect()
    };
    // The 70B at batch 1 and 32 (serving split), several head shapes, many parts, one part.
    let cases: Vec<(usize, usize, Vec<usize>)> = vec![
        (64, 128, vec![23]),
        (64, 128, vec![2; 32]),
        (32, 64, random_parts(&mut rng, 5, 9)),
        (12, 80, random_parts(&mut rng, 3, 40)),
        (14, 96, vec![70, 1]),
        (6, 4, vec![3, 5]),
    ];
    for act in [Precision::Bf16, Precision::F32] {
        let ops = Ops {
            k: &e.kernels,
            stream: e.gpu.cu_stream(),
            act,
        };
        for (nh, hd, nparts) in &cases {
            let c = combine_case(&e, &mut rng, *nh, *hd, nparts);
            let (cols, a) = (nh * hd, act.bytes());
            let (out1, q1, s1) = c.pair(&e, &ops);
            let merged: Vec<f32> = match act {
                Precision::Bf16 => e.bf16s(&out1, c.n * cols),
                Precision::F32 => e.f32s(&out1, c.n * cols),
            };
            let tol = if act == Precision::Bf16 { 1e-2 } else { 1e-4 };
            check(
                &format!("combine {act:?} nh={nh} hd={hd} parts={nparts:?}"),
                &merged,
                &c.want,
                tol,
            );
            let best = combine_fp8_heads_per_block(*nh, *hd).unwrap();
            let mut blockings: Vec<usize> = (1..=*nh)
                .filter(|h| nh % h == 0 && h * hd / 4 <= 1024)
                .collect();
            blockings.retain(|&h| h == best || h.is_power_of_two() || h == *nh);
            for hpb in blockings {
                let (out2, q2, s2) = c.fused(&e, &ops, &counters, hpb);
                let what = format!(
                    "fused combine {act:?} nh={nh} hd={hd} heads/block={hpb} parts={nparts:?}"
                );
                assert_eq!(
                    bytes(&out1, c.n * cols * a),
                    bytes(&out2, c.n * cols * a),
                    "{what}: rows"
                );
                assert_eq!(bytes(&s1, c.n * 4), bytes(&s2, c.n * 4), "{what}: scales");
                assert_eq!(
                    bytes(&q1, c.n * cols),
                    bytes(&q2, c.n * cols),
                    "{what}: codes"
                );
                let left: Vec<u32> = e.gpu.download(&counters, 64).unwrap();
                assert!(
                    left.iter().all(|&x| x == 0),
                    "{what}: counters left {left:?}"
                );
            }
            println!(
                "fused combine {act:?} nh={nh} hd={hd} parts={nparts:?}: same bytes as the pair"
            );
        }
    }
    // Launch times (not asserted): the pair vs the fused kernel at each blocking.
    let ops = e.ops();
    for nparts in [vec![23], vec![2; 32]] {
        let c = combine_case(&e, &mut rng, 64, 128, &nparts);
        let cols = 64 * 128;
        let (out, q, s) = (
            e.poisoned(c.n * cols * 2),
            e.poisoned(c.n * cols),
            e.poisoned(c.n * 4),
        );
        let scratch = e.poisoned(combine_fp8_scratch_bytes(c.n, 64));
        let [p0, np, q0] = c.groups_at();
        let (ml, acc) = (c.part_ml.ptr, c.part_acc.ptr);
        let time = |f: &dyn Fn()| {
            f();
            e.gpu.sync().unwrap();
            let t = std::time::Instant::now();
            for _ in 0..200 {
                f();
            }
            e.gpu.sync().unwrap();
            t.elapsed().as_secs_f64() * 1e6 / 200.0
        };
        let pair = time(&|| {
            ops.attention_combine(out.ptr, ml, acc, p0, np, q0, c.n, 64, 8, 128)
                .unwrap();
            ops.quantize_fp8(q.ptr, s.ptr, out.ptr, c.n, cols).unwrap();
        });
        let mut line = format!("rows {} x {} parts: pair {pair:.1} us", c.n, nparts[0]);
        for hpb in [1, 2, 4, 8, 16] {
            let t = time(&|| {
                let g = c.groups_at();
                ops.attention_combine_fp8(
                    out.ptr,
                    q.ptr,
                    s.ptr,
                    counters.ptr,
                    scratch.ptr,
                    ml,
                    acc,
                    g,
                    c.n,
                    64,
                    128,
                    hpb,
                )
                .unwrap();
            });
            line += &format!(", fused {hpb} heads/block {t:.1} us");
        }
        println!("{line}");
    }
}

#[test]
fn paged_attention_prefill_chunks_decode_and_shared_prefix() {
    let Some((e, mut rng)) = env() else { return };
    for (nh, nkv, hd) in [
        (8, 1, 128),
        (4, 2, 64),
        (64, 8, 128),
        (6, 2, 16),
        (4, 2, 16),
    ] {
        // seq 0: prefill chunk at 21..61 (earlier chunk in cache); seq 1: decode at 70;
        // seq 2: shares seq 0's first two blocks (prefix cache), chunk at 32..35; seq 3: fresh
        // prompt 0..5; seq 4: decode at 150 (long enough to split).
        let case = AttentionCase {
            nh,
            nkv,
            hd,
            bs: 16,
            num_blocks: 40,
            seqs: vec![
                (21, 40, vec![3, 7, 1, 9]),
                (70, 1, vec![10, 11, 12, 13, 14]),
                (32, 3, vec![3, 7, 20]),
                (0, 5, vec![30]),
                (150, 1, (21..31).collect()),
            ],
        };
        check_attention(&e, &mut rng, &case);
    }
}

/// Block sizes that are not a multiple of the key tile (7), and the serving one (128) at the 70B's
/// shape (64 query heads, 8 kv heads, head_dim 128) with long decodes and multi-tile chunks.
#[test]
fn paged_attention_odd_and_serving_block_sizes() {
    let Some((e, mut rng)) = env() else { return };
    // Block size 7: a chunk 50..190 over 28 blocks, a shared prefix, a decode at 300.
    for (nh, nkv, hd) in [(6, 2, 16), (2, 2, 32), (16, 2, 64)] {
        let case = AttentionCase {
            nh,
            nkv,
            hd,
            bs: 7,
            num_blocks: 110,
            seqs: vec![
                (50, 140, (0..28).collect()),
                (300, 1, (30..73).collect()),
                (14, 9, vec![0, 1, 80, 81]),
                (0, 1, vec![90]),
            ],
        };
        check_attention(&e, &mut rng, &case);
    }
    // Block size 128: a 150-token chunk at 200..350, a decode at 2100, a shared-prefix chunk, a
    // fresh 70-token prompt, and decodes at the edges of a block.
    let case = AttentionCase {
        nh: 64,
        nkv: 8,
        hd: 128,
        bs: 128,
        num_blocks: 40,
        seqs: vec![
            (200, 150, vec![5, 6, 7]),
            (2100, 1, (10..27).collect()),
            (256, 20, vec![5, 6, 30]),
            (0, 70, vec![31]),
            (127, 1, vec![32]),
            (128, 1, vec![33, 34]),
        ],
    };
    check_attention(&e, &mut rng, &case);
}

/// Decode-only batches (the decode kernel): small shapes with odd block sizes and decodes at
/// positions that leave warps without keys (0, 1, 15..17, 63..65), and the 70B's serving shape
/// (64 query heads, 8 kv heads, head_dim 128, block size 128) at batch 1 and 32, context ~3000.
#[test]
fn paged_attention_decode_batches() {
    let Some((e, mut rng)) = env() else { return };
    for (nh, nkv, hd, bs) in [
        (8, 1, 128, 16),
        (4, 2, 64, 7),
        (6, 2, 16, 7),
        (2, 2, 32, 16),
        (8, 8, 48, 3),
        (32, 4, 128, 128),
    ] {
        let positions = [0usize, 1, 15, 16, 17, 63, 64, 65, 300];
        let per_seq = 301usize.div_ceil(bs);
        let case = AttentionCase {
            nh,
            nkv,
            hd,
            bs,
            num_blocks: per_seq * positions.len(),
            seqs: positions
                .iter()
                .enumerate()
                .map(|(s, &p)| {
                    // Blocks of a sequence are scattered (reversed) over the pool.
                    let table = (0..(p + 1).div_ceil(bs))
                        .map(|i| ((positions.len() - 1 - s) * per_seq + i) as u32)
                        .rev()
                        .collect();
                    (p, 1, table)
                })
                .collect(),
        };
        check_attention(&e, &mut rng, &case);
    }
    // 70B serving shape; sequences share blocks of a 64-block pool in scrambled orders.
    for batch in [1usize, 32] {
        let case = AttentionCase {
            nh: 64,
            nkv: 8,
            hd: 128,
            bs: 128,
            num_blocks: 64,
            seqs: (0..batch)
                .map(|s| {
                    let pos = 2999 - (s % 5) * 37;
                    let table = (0..24).map(|i| ((s * 7 + i * 5) % 64) as u32).collect();
                    (pos, 1, table)
                })
                .collect(),
        };
        check_attention(&e, &mut rng, &case);
    }
}

fn host_gemm(x: &[f64], w: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
        }
    }
    out
}

#[test]
fn cublaslt_fp8_outer_vector_scales() {
    let Some((e, mut rng)) = env() else { return };
    let mut gemm = Gemm::new().unwrap();
    for (m, n, k) in [
        (1, 256, 512),
        (7, 384, 256),
        (64, 512, 1024),
        (300, 256, 512),
    ] {
        let x = rand_bf16(&mut rng, m * k, 2.0);
        let wq: Vec<u8> = (0..n * k)
            .map(|_| float8::F8E4M3::from_f32(rng.random_range(-448.0..448.0)).to_bits())
            .collect();
        let ws: Vec<f32> = (0..n).map(|_| rng.random_range(1e-4..1e-3)).collect();
        let (dx, dw, dws) = (
            e.gpu.upload(&x).unwrap(),
            e.gpu.upload(&wq).unwrap(),
            e.gpu.upload(&ws).unwrap(),
        );
        let (xq, xs) = (e.poisoned(m * k), e.poisoned(m * 4));
        let out = e.poisoned(m * n * 2);
        e.ops().quantize_fp8(xq.ptr, xs.ptr, dx.ptr, m, k).unwrap();
        gemm.fp8(
            m,
            n,
            k,
            xq.ptr,
            xs.ptr,
            dw.ptr,
            dws.ptr,
            out.ptr,
            false,
            e.gpu.cu_stream(),
        )
        .unwrap();
        // Reference from the same quantized operands, so only the product is tested.
        let xqh: Vec<u8> = e.gpu.download(&xq, m * k).unwrap();
        let xsh = e.f32s(&xs, m);
        let xd: Vec<f64> = xqh
            .iter()
            .enumerate()
            .map(|(i, &b)| float8::F8E4M3::from_bits(b).to_f64() * xsh[i / k] as f64)
            .collect();
        let wd: Vec<f64> = wq
            .iter()
            .enumerate()
            .map(|(i, &b)| float8::F8E4M3::from_bits(b).to_f64() * ws[i / k] as f64)
            .collect();
        check(
            &format!("fp8 gemm {m}x{n}x{k}"),
            &e.bf16s(&out, m * n),
            &host_gemm(&xd, &wd, m, n, k),
            1e-2,
        );
        // And against the unquantized input: the FP8 path's total error.
        let xf: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
        check(
            &format!("fp8 linear vs bf16 input {m}x{n}x{k}"),
            &e.bf16s(&out, m * n),
            &host_gemm(&xf, &wd, m, n, k),
            6e-2,
        );
        // F32 output with full accumulation (the reference-precision mode).
        let out32 = e.poisoned(m * n * 4);
        gemm.fp8(
            m,
            n,
            k,
            xq.ptr,
            xs.ptr,
            dw.ptr,
            dws.ptr,
            out32.ptr,
            true,
            e.gpu.cu_stream(),
        )
        .unwrap();
        // Hopper's FP8 tensor cores accumulate with reduced precision (~1e-4 relative).
        check(
            &format!("fp8 gemm f32 out {m}x{n}x{k}"),
            &e.f32s(&out32, m * n),
            &host_gemm(&xd, &wd, m, n, k),
            1e-3,
        );
    }
}

/// rope_kv_write gives exactly the bytes of rope followed by kv_write: the roped qkv rows and both
/// caches (BF16 and F32), padding tokens (slot -1) rotated but not written.
#[test]
fn rope_kv_write_matches_rope_then_kv_write() {
    let Some((e, mut rng)) = env() else { return };
    for act in [Precision::Bf16, Precision::F32] {
        let ops = Ops {
            k: &e.kernels,
            stream: e.gpu.cu_stream(),
            act,
        };
        // A 70B decode row (64 q + 8 kv heads), a batch, odd head_dim halves, one pair block.
        for (n, nh, nkv, hd) in [
            (1usize, 64, 8, 128),
            (32, 64, 8, 128),
            (23, 8, 2, 128),
            (7, 6, 3, 6),
        ] {
            let (bs, blocks) = (16, n.div_ceil(16) + 3);
            let stride = (nh + 2 * nkv) * hd;
            let qkv: Vec<f32> = (0..n * stride)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let upload = |v: &[f32]| match act {
                Precision::Bf16 => e
                    .gpu
                    .upload(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
                Precision::F32 => e.gpu.upload(v),
            };
            let pos: Vec<i32> = (0..n).map(|_| rng.random_range(1..100_000)).collect();
            let inv: Vec<f32> = (0..hd / 2)
                .map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / hd as f32))
                .collect();
            let mut slots: Vec<i32> = (0..(blocks * bs) as i32).collect();
            for i in (1..slots.len()).rev() {
                slots.swap(i, rng.random_range(0..=i));
            }
            slots.truncate(n);
            if n > 2 {
                slots[n / 2] = -1;
            }
            let (dp, di, ds) = (
                e.gpu.upload(&pos).unwrap(),
                e.gpu.upload(&inv).unwrap(),
                e.gpu.upload(&slots).unwrap(),
            );
            let (q1, q2) = (upload(&qkv).unwrap(), upload(&qkv).unwrap());
            let cache_bytes = blocks * nkv * bs * hd * act.bytes();
            let (k1, v1, k2, v2) = (
                e.poisoned(cache_bytes),
                e.poisoned(cache_bytes),
                e.poisoned(cache_bytes),
                e.poisoned(cache_bytes),
            );
            ops.rope(q1.ptr, dp.ptr, di.ptr, n, stride, nh, nkv, hd)
                .unwrap();
            ops.kv_write(
                k1.ptr,
                v1.ptr,
                q1.ptr,
                ds.ptr,
                n,
                stride,
                nh * hd,
                (nh + nkv) * hd,
                nkv,
                hd,
                bs,
            )
            .unwrap();
            ops.rope_kv_write(
                q2.ptr, k2.ptr, v2.ptr, dp.ptr, di.ptr, ds.ptr, n, nh, nkv, hd, bs,
            )
            .unwrap();
            let what = format!("rope_kv_write {act:?} {n}x({nh}+{nkv}+{nkv})x{hd}");
            let bytes =
                |b: &DeviceBuffer, len: usize| -> Vec<u8> { e.gpu.download(b, len).unwrap() };
            let qkv_bytes = n * stride * act.bytes();
            assert_eq!(bytes(&q1, qkv_bytes), bytes(&q2, qkv_bytes), "{what}: qkv");
            assert_ne!(
                bytes(&q2, qkv_bytes),
                bytes(&upload(&qkv).unwrap(), qkv_bytes),
                "{what}: nothing rotated"
            );
            let (kb, vb) = (bytes(&k2, cache_bytes), bytes(&v2, cache_bytes));
            assert_eq!(bytes(&k1, cache_bytes), kb, "{what}: k cache");
            assert_eq!(bytes(&v1, cache_bytes), vb, "{what}: v cache");
            let written = slots.iter().filter(|&&s| s >= 0).count() * nkv * hd * act.bytes();
            for cache in [&kb, &vb] {
                let poison = cache.iter().filter(|&&b| b == 0xFF).count();
                assert!(
                    poison + written >= cache_bytes && poison < cache_bytes,
                    "{what}: {poison} poisoned bytes of {cache_bytes}, {written} written"
                );
            }
        }
    }
}

/// The fused norm/silu + quantize kernels give exactly the bytes of the unfused kernel followed by
/// quantize_fp8 (BF16 and F32 activations), and the same residual.
#[test]
fn fused_norm_and_silu_quantize_match_unfused() {
    let Some((e, mut rng)) = env() else { return };
    for act in [Precision::Bf16, Precision::F32] {
        let ops = Ops {
            k: &e.kernels,
            stream: e.gpu.cu_stream(),
            act,
        };
        let a = act.bytes();
        // Each block shape: decode rows (up to 32 warps, 1-8 chunks per warp), many rows (8-warp
        // blocks, or wider rows), widths not a multiple of the 4- or 8-column vectors, the widest
        // fused rows, and the first layer's norm without delta.
        let norm_cases = [
            (1, 8192, true),
            (1, 8192, false),
            (6, 1000, true),
            (2, 130, true),
            (3, 16384, true),
            (2, 32768, true),
            (32, 8192, true),
            (255, 8192, true),
            (300, 1001, true),
            (300, 16384, true),
            (3000, 8192, true),
            (3000, 8192, false),
        ];
        for (n, h, with_delta) in norm_cases {
            let res: Vec<f32> = (0..n * h).map(|_| rng.random_range(-2.0..2.0)).collect();
            let delta: Vec<f32> = (0..n * h).map(|_| rng.random_range(-1.0..1.0)).collect();
            let delta_dev = match act {
                Precision::Bf16 => e
                    .gpu
                    .upload(&delta.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()),
                Precision::F32 => e.gpu.upload(&delta),
            }
            .unwrap();
            let w = rand_bf16(&mut rng, h, 1.5);
            let dw = e.gpu.upload(&w).unwrap();
            let (r1, r2) = (e.gpu.upload(&res).unwrap(), e.gpu.upload(&res).unwrap());
            let d = if with_delta { delta_dev.ptr } else { 0 };
            // Unfused: norm to xn, then quantize.
            let xn = e.poisoned(n * h * a);
            let (q1, s1) = (e.poisoned(n * h), e.poisoned(n * 4));
            ops.add_rmsnorm(r1.ptr, d, dw.ptr, xn.ptr, n, h, 1e-5)
                .unwrap();
            ops.quantize_fp8(q1.ptr, s1.ptr, xn.ptr, n, h).unwrap();
            let (q2, s2) = (e.poisoned(n * h), e.poisoned(n * 4));
            ops.add_rmsnorm_fp8(r2.ptr, d, dw.ptr, q2.ptr, s2.ptr, n, h, 1e-5)
                .unwrap();
            let what = format!("add_rmsnorm_fp8 {act:?} {n}x{h} delta {with_delta}");
            let bytes =
                |b: &DeviceBuffer, len: usize| -> Vec<u8> { e.gpu.download(b, len).unwrap() };
            assert_eq!(
                bytes(&r1, n * h * 4),
                bytes(&r2, n * h * 4),
                "{what}: residual"
            );
            assert_eq!(bytes(&s1, n * 4), bytes(&s2, n * 4), "{what}: scales");
            assert_eq!(bytes(&q1, n * h), bytes(&q2, n * h), "{what}: values");
            assert!(e.f32s(&s2, n).iter().all(|s| s.is_finite() && *s > 0.0));
        }
        // Split rows (fewer than SILU_SPLIT_BELOW_ROWS: 70B decode rows, odd widths) and a block
        // per row (70B prefill rows: 896 threads x 4 groups; each group count per thread; widths
        // not a multiple of the 8-column groups; the widest fused row).
        for (n, inter) in [
            (1, 28672),
            (5, 1000),
            (3, 12000),
            (2, 32768),
            (7, 1001),
            (32, 28672),
            (63, 28672),
            (64, 1000),
            (64, 1001),
            (70, 12000),
            (100, 32768),
            (300, 28672),
            (3000, 4096),
            (64, 65536),
        ] {
            let gu: Vec<f32> = (0..n * 2 * inter)
                .map(|_| rng.random_range(-4.0..4.0))
                .collect();
            let gu_dev = match act {
                Precision::Bf16 => e
                    .gpu
                    .upload(&gu.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()),
                Precision::F32 => e.gpu.upload(&gu),
            }
            .unwrap();
            let actbuf = e.poisoned(n * inter * a);
            let (q1, s1) = (e.poisoned(n * inter), e.poisoned(n * 4));
            ops.silu_mul(actbuf.ptr, gu_dev.ptr, n, inter).unwrap();
            ops.quantize_fp8(q1.ptr, s1.ptr, actbuf.ptr, n, inter)
                .unwrap();
            let (q2, s2) = (e.poisoned(n * inter), e.poisoned(n * 4));
            let scratch = e.poisoned(Ops::fused_silu_scratch_bytes(n, inter));
            ops.silu_mul_fp8(q2.ptr, s2.ptr, gu_dev.ptr, scratch.ptr, n, inter)
                .unwrap();
            let what = format!("silu_mul_fp8 {act:?} {n}x{inter}");
            let bytes =
                |b: &DeviceBuffer, len: usize| -> Vec<u8> { e.gpu.download(b, len).unwrap() };
            assert_eq!(bytes(&s1, n * 4), bytes(&s2, n * 4), "{what}: scales");
            assert_eq!(
                bytes(&q1, n * inter),
                bytes(&q2, n * inter),
                "{what}: values"
            );
        }
    }
}

/// Random e4m3 weights (bytes), per-channel scales, and quantized activations with their
/// per-token scales, plus the host reference of the scaled product from exactly those operands.
struct Fp8Case {
    xq: DeviceBuffer,
    xs: DeviceBuffer,
    w: DeviceBuffer,
    ws: DeviceBuffer,
    want: Vec<f64>,
}

fn fp8_case(e: &Env, rng: &mut ChaCha8Rng, m: usize, n: usize, k: usize) -> Fp8Case {
    let e4m3 = |v: f32| float8::F8E4M3::from_f32(v).to_bits();
    let wq: Vec<u8> = (0..n * k)
        .map(|_| e4m3(rng.random_range(-448.0..448.0)))
        .collect();
    let ws: Vec<f32> = (0..n).map(|_| rng.random_range(1e-4..1e-3)).collect();
    let xq: Vec<u8> = (0..m * k)
        .map(|_| e4m3(rng.random_range(-448.0..448.0)))
        .collect();
    let xs: Vec<f32> = (0..m).map(|_| rng.random_range(1e-3..1e-2)).collect();
    let deq = |q: &[u8], s: &[f32]| -> Vec<f64> {
        q.iter()
            .enumerate()
            .map(|(i, &b)| float8::F8E4M3::from_bits(b).to_f64() * s[i / k] as f64)
            .collect()
    };
    let want = host_gemm(&deq(&xq, &xs), &deq(&wq, &ws), m, n, k);
    Fp8Case {
        xq: e.gpu.upload(&xq).unwrap(),
        xs: e.gpu.upload(&xs).unwrap(),
        w: e.gpu.upload(&wq).unwrap(),
        ws: e.gpu.upload(&ws).unwrap(),
        want,
    }
}

/// Runs one FP8 path into a poisoned buffer with a guard tail; checks the guard stays untouched.
#[allow(clippy::too_many_arguments)]
fn run_fp8_path(
    e: &Env,
    gemm: &mut Gemm,
    c: &Fp8Case,
    path: Fp8Path,
    m: usize,
    n: usize,
    k: usize,
    f32_out: bool,
) -> Vec<f32> {
    let (bytes, guard) = (if f32_out { 4 } else { 2 }, 256);
    let out = e.poisoned(m * n * bytes + guard);
    gemm.fp8_by(
        path,
        &e.kernels,
        m,
        n,
        k,
        c.xq.ptr,
        c.xs.ptr,
        c.w.ptr,
        c.ws.ptr,
        out.ptr,
        f32_out,
        e.gpu.cu_stream(),
    )
    .unwrap();
    let all: Vec<u8> = e.gpu.download(&out, m * n * bytes + guard).unwrap();
    assert!(
        all[m * n * bytes..].iter().all(|&b| b == 0xFF),
        "{path:?} M={m} N={n} K={k} wrote past its output"
    );
    if f32_out {
        e.f32s(&out, m * n)
    } else {
        e.bf16s(&out, m * n)
    }
}

#[test]
fn fp8_streaming_gemm_matches_host() {
    let Some((e, mut rng)) = env() else { return };
    let mut gemm = Gemm::new().unwrap();
    // (M, N, K, splits): N not a multiple of 16 or of the 64-row block, K not a multiple of the
    // 256-byte step, M across 1..64 token tiles and past 64 (chunked), split-K on and off.
    for (m, n, k, splits) in [
        (1, 64, 256, 1),
        (1, 200, 4096, 4),
        (2, 100, 528, 2),
        (5, 1000, 16, 1),
        (8, 256, 2048, 3),
        (13, 130, 1040, 2),
        (24, 72, 1536, 6),
        (33, 64, 2048, 2),
        (64, 192, 1024, 1),
        (70, 80, 512, 2),
    ] {
        let c = fp8_case(&e, &mut rng, m, n, k);
        let path = Fp8Path::Stream { splits };
        // Twice: the split-K counters must be back at zero after each launch.
        for round in 0..2 {
            let got = run_fp8_path(&e, &mut gemm, &c, path, m, n, k, false);
            check(
                &format!("stream bf16 {m}x{n}x{k} splits {splits} round {round}"),
                &got,
                &c.want,
                1e-2,
            );
        }
        let got = run_fp8_path(&e, &mut gemm, &c, path, m, n, k, true);
        check(
            &format!("stream f32 {m}x{n}x{k} splits {splits}"),
            &got,
            &c.want,
            1e-3,
        );
        // The path the policy picks for this shape gives the same product (cuBLASLt's paths need
        // 16-aligned N).
        let auto = gemm.fp8_path(m, n, k, false);
        if !matches!(auto, Fp8Path::Stream { .. }) && n % 16 != 0 {
            continue;
        }
        let got = run_fp8_path(&e, &mut gemm, &c, auto, m, n, k, false);
        check(&format!("{auto:?} bf16 {m}x{n}x{k}"), &got, &c.want, 1e-2);
    }
}

#[test]
fn fp8_unscaled_cublaslt_with_scale_epilogue() {
    let Some((e, mut rng)) = env() else { return };
    let mut gemm = Gemm::new().unwrap();
    for (m, n, k) in [
        (1, 256, 512),
        (7, 384, 256),
        (64, 512, 1024),
        (200, 1040, 512),
    ] {
        let c = fp8_case(&e, &mut rng, m, n, k);
        let got = run_fp8_path(&e, &mut gemm, &c, Fp8Path::Unscaled, m, n, k, false);
        check(
            &format!("unscaled+epilogue {m}x{n}x{k}"),
            &got,
            &c.want,
            1e-2,
        );
    }
}

#[test]
fn cublaslt_bf16_gemm_bf16_and_f32_out() {
    let Some((e, mut rng)) = env() else { return };
    let mut gemm = Gemm::new().unwrap();
    for (m, n, k) in [(1, 1000, 256), (5, 320, 128), (129, 256, 512)] {
        let x = rand_bf16(&mut rng, m * k, 1.0);
        let w = rand_bf16(&mut rng, n * k, 1.0);
        let (dx, dw) = (e.gpu.upload(&x).unwrap(), e.gpu.upload(&w).unwrap());
        let want = host_gemm(
            &to_f32(&x).iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &to_f32(&w).iter().map(|&v| v as f64).collect::<Vec<_>>(),
            m,
            n,
            k,
        );
        let out = e.poisoned(m * n * 2);
        gemm.bf16(m, n, k, dx.ptr, dw.ptr, out.ptr, false, e.gpu.cu_stream())
            .unwrap();
        check(
            &format!("bf16 gemm {m}x{n}x{k}"),
            &e.bf16s(&out, m * n),
            &want,
            1e-2,
        );
        let out32 = e.poisoned(m * n * 4);
        gemm.bf16(m, n, k, dx.ptr, dw.ptr, out32.ptr, true, e.gpu.cu_stream())
            .unwrap();
        check(
            &format!("bf16 gemm f32 out {m}x{n}x{k}"),
            &e.f32s(&out32, m * n),
            &want,
            1e-4,
        );
        // F32 x F32 (no TF32): exact inputs, so only summation order differs.
        let (x32, w32): (Vec<f32>, Vec<f32>) = (to_f32(&x), to_f32(&w));
        let (dx32, dw32) = (e.gpu.upload(&x32).unwrap(), e.gpu.upload(&w32).unwrap());
        let o = e.poisoned(m * n * 4);
        gemm.f32(m, n, k, dx32.ptr, dw32.ptr, o.ptr, e.gpu.cu_stream())
            .unwrap();
        check(
            &format!("f32 gemm {m}x{n}x{k}"),
            &e.f32s(&o, m * n),
            &want,
            1e-6,
        );
    }
}

/// Host version of the device sampler's rule (see kernels/sampling.cu).
fn ref_sample(x: &[f32], temp: f32, top_k: usize, top_p: f32, u: f32) -> usize {
    let mx = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if temp <= 0.0 {
        return x.iter().position(|&v| v == mx).unwrap();
    }
    let w: Vec<f64> = x
        .iter()
        .map(|&v| ((v - mx) as f64 / temp as f64).exp())
        .collect();
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| w[b].partial_cmp(&w[a]).unwrap().then(a.cmp(&b)));
    let mut keep = x.len();
    if top_k > 0 && top_k < x.len() {
        let kth = w[order[top_k - 1]];
        keep = order.iter().take_while(|&&i| w[i] >= kth).count();
    }
    if top_p < 1.0 {
        let total: f64 = order[..keep].iter().map(|&i| w[i]).sum();
        let mut cum = 0.0;
        for (j, &i) in order[..keep].iter().enumerate() {
            cum += w[i];
            if cum >= top_p as f64 * total {
                let last = w[i];
                keep = j
                    + 1
                    + order[j + 1..keep]
                        .iter()
                        .take_while(|&&i2| w[i2] == last)
                        .count();
                break;
            }
        }
    }
    let z: f64 = order[..keep].iter().map(|&i| w[i]).sum();
    let target = u as f64 * z;
    let mut cum = 0.0;
    for &i in &order[..keep] {
        cum += w[i];
        if cum > target {
            return i;
        }
    }
    order[keep - 1]
}

#[test]
fn sampling_greedy_top_k_top_p() {
    let Some((e, mut rng)) = env() else { return };
    let vocab = 5000;
    let cases: Vec<(f32, usize, f32)> = vec![
        (0.0, 0, 1.0),
        (1.0, 0, 1.0),
        (0.7, 50, 1.0),
        (1.0, 0, 0.9),
        (0.8, 20, 0.5),
        (1.3, 1, 1.0),
        (0.0, 10, 0.5),
        (2.0, 4000, 0.99),
    ];
    let rows = cases.len() * 8;
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|_| rng.random_range(-6.0f32..6.0))
        .collect();
    let mut params = vec![];
    let mut want = vec![];
    for r in 0..rows {
        let (t, k, p) = cases[r % cases.len()];
        let u: f32 = rng.random_range(0.0..1.0);
        params.extend([t, k as f32, p, u]);
        want.push(ref_sample(&logits[r * vocab..][..vocab], t, k, p, u) as i32);
    }
    let (dl, dp) = (
        e.gpu.upload(&logits).unwrap(),
        e.gpu.upload(&params).unwrap(),
    );
    let out = e.poisoned(rows * 4);
    e.ops()
        .sample_tokens(out.ptr, dl.ptr, dp.ptr, rows, vocab)
        .unwrap();
    let got: Vec<i32> = e.gpu.download(&out, rows).unwrap();
    for r in 0..rows {
        assert_eq!(
            got[r],
            want[r],
            "row {r}, case {:?}, u {}",
            cases[r % cases.len()],
            params[4 * r + 3]
        );
    }
    println!("sampling: {rows} rows equal to the host rule");
}

#[test]
fn random_fill_makes_valid_weights() {
    let Some((e, _)) = env() else { return };
    let n = 1 << 20;
    let (w, s, b) = (e.poisoned(n), e.poisoned(n * 4), e.poisoned(n * 2));
    e.ops().fill_fp8(w.ptr, n, 7, -448.0, 448.0).unwrap();
    e.ops().fill_f32(s.ptr, n, 8, 0.5, 1.5).unwrap();
    e.ops().fill_bf16(b.ptr, n, 9, -0.1, 0.1).unwrap();
    let wq: Vec<u8> = e.gpu.download(&w, n).unwrap();
    let vals: Vec<f32> = wq
        .iter()
        .map(|&x| float8::F8E4M3::from_bits(x).to_f32())
        .collect();
    assert!(vals.iter().all(|v| v.is_finite() && v.abs() <= 448.0));
    let mean_abs = vals.iter().map(|v| v.abs() as f64).sum::<f64>() / n as f64;
    assert!(
        (mean_abs - 224.0).abs() < 10.0,
        "e4m3 fill mean |w| {mean_abs}"
    );
    assert!(e.f32s(&s, n).iter().all(|&v| (0.5..1.5).contains(&v)));
    let bv = e.bf16s(&b, n);
    assert!(bv.iter().all(|v| v.abs() <= 0.1001));
    let distinct: std::collections::HashSet<u32> = bv.iter().map(|v| v.to_bits()).collect();
    assert!(distinct.len() > 1000);
}
