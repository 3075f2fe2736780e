//! The attention kernels (paged CUDA-core attention, tensor-core flash prefill and decode, the
//! split-row combine with and without FP8 quantize) against a naive host reference, on fresh random
//! inputs, with outputs poisoned before each run. Skips when no GPU is present.

use half::bf16;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tandem::backend::cuda::device::DeviceBuffer;
use tandem::backend::cuda::meta::{plan_step, SplitPolicy};
use tandem::backend::cuda::ops::{
    combine_fp8_heads_per_block, combine_fp8_scratch_bytes, flash_decode_supported,
    flash_prefill_wgmma_supported, kv_tensor_maps, AttentionArgs, Fp8KvScales, Ops, Precision,
    PrefillP, PrefillWs, WGMMA_HEAD_DIM,
};
use tandem::backend::{Batch, Emit, SeqChunk};

mod gpu_kernel_support;

use gpu_kernel_support::{check, env, rand_bf16, Env};

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
    /// The same with P and V of prefill blocks as F16 (`TANDEM_FLASH_PREFILL=f16`).
    FlashF16,
    /// Flash and FlashHiLo on the mma.sync kernel only (`TANDEM_FLASH_WGMMA=0`): where head_dim
    /// is 128 the two above run multi-query items on wgmma.
    FlashMmaSync,
    FlashHiLoMmaSync,
    /// The tensor-core kernel (P as BF16 hi + lo, or plain BF16 with `true`) with the given
    /// version of the wgmma prefill kernel (None: every thread loads; else a producer warpgroup).
    FlashWs(Option<PrefillWs>, bool),
    /// The tensor-core kernel for decode-only batches.
    Decode,
    CudaCores,
}

/// Runs `case` on random inputs against [`ref_attention`]: whole tiles, decode tiles split into
/// key ranges (merged by attention_combine) at the tightest and at the serving split policy, with
/// the tensor-core kernel (P of prefill blocks as plain BF16, as hi + lo and as F16), the CUDA-core one
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
    // The wgmma kernel loads whole tiles by TMA where the block size allows (the BF16 pools'
    // tensor maps, and the FP8 pools' made below; `use_maps` off: cp.async for every tile).
    let pool_rows = c.num_blocks * nkv * bs;
    let maps = (hd == WGMMA_HEAD_DIM && bs % 64 == 0).then(|| {
        e.gpu
            .upload(&kv_tensor_maps(dk.ptr, dv.ptr, pool_rows, false).unwrap())
            .unwrap()
    });
    let use_maps = std::cell::Cell::new(true);
    // (FP8 K pool address, its maps' address), once made.
    let fp8_maps = std::cell::Cell::new((0u64, 0u64));
    // Output rows (as f32) and, per token, whether its tile had more than one query.
    let bf16_pools = (&dk, &dv, None);
    let run_on = |kernel: AttnKernel,
                  q_per_tile: usize,
                  policy: Option<SplitPolicy>,
                  pools: (&DeviceBuffer, &DeviceBuffer, Option<Fp8KvScales>)| {
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
            k_cache: pools.0.ptr,
            v_cache: pools.1.ptr,
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
            single_query_items: plan.single_query_items,
            kv_fp8: pools.2,
            tensor_maps: match &maps {
                Some(m) if use_maps.get() && pools.0.ptr == dk.ptr => m.ptr,
                Some(_) if use_maps.get() && pools.0.ptr == fp8_maps.get().0 => fp8_maps.get().1,
                _ => 0,
            },
        };
        match kernel {
            AttnKernel::Flash => e.ops().flash_attention_p(&args, PrefillP::Bf16).unwrap(),
            AttnKernel::FlashHiLo => e.ops().flash_attention_p(&args, PrefillP::HiLo).unwrap(),
            AttnKernel::FlashF16 => e.ops().flash_attention_p(&args, PrefillP::F16).unwrap(),
            AttnKernel::FlashMmaSync => e
                .ops()
                .flash_attention_mma_sync(&args, PrefillP::Bf16)
                .unwrap(),
            AttnKernel::FlashHiLoMmaSync => e
                .ops()
                .flash_attention_mma_sync(&args, PrefillP::HiLo)
                .unwrap(),
            AttnKernel::FlashWs(ws, bf16_p) => {
                let p = if bf16_p {
                    PrefillP::Bf16
                } else {
                    PrefillP::HiLo
                };
                e.ops().flash_attention_ws(&args, p, ws).unwrap()
            }
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
    let run = |kernel: AttnKernel, q_per_tile: usize, policy: Option<SplitPolicy>| {
        run_on(kernel, q_per_tile, policy, bf16_pools)
    };
    let group = nh / nkv;
    let all_decode = c.seqs.iter().all(|s| s.1 == 1);
    let mut kernels = vec![
        AttnKernel::Flash,
        AttnKernel::FlashHiLo,
        AttnKernel::FlashF16,
        AttnKernel::CudaCores,
    ];
    if flash_prefill_wgmma_supported(hd, PrefillP::HiLo, false) {
        kernels.extend([AttnKernel::FlashMmaSync, AttnKernel::FlashHiLoMmaSync]);
    }
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
    // FP8 pools: the prefill / mixed _kv8 kernel on e4m3 codes gives the BF16 kernel's bits on the
    // dequantized values (code * scale rounded to BF16, which is what it converts each tile to);
    // the decode one (F16 fragments straight from the codes, dims in another order, P as F16
    // hi + lo) agrees with the BF16 decode kernel to rounding.
    let scales = Fp8KvScales { k: 0.25, v: 0.5 };
    let fp8_pool = |x: &[bf16], scale: f32| -> (Vec<u8>, Vec<bf16>) {
        x.iter()
            .map(|v| {
                let code = float8::F8E4M3::from_f32(v.to_f32() / scale);
                (code.to_bits(), bf16::from_f32(code.to_f32() * scale))
            })
            .unzip()
    };
    let ((k8, kdq), (v8, vdq)) = (fp8_pool(&kc, scales.k), fp8_pool(&vc, scales.v));
    let (dk8, dv8) = (e.gpu.upload(&k8).unwrap(), e.gpu.upload(&v8).unwrap());
    let (dkq, dvq) = (e.gpu.upload(&kdq).unwrap(), e.gpu.upload(&vdq).unwrap());
    let maps8 = maps.as_ref().map(|_| {
        e.gpu
            .upload(&kv_tensor_maps(dk8.ptr, dv8.ptr, pool_rows, true).unwrap())
            .unwrap()
    });
    if let Some(m) = &maps8 {
        fp8_maps.set((dk8.ptr, m.ptr));
    }
    // Each kernel on FP8 pools against itself on the dequantized BF16 pools: mma.sync, and where
    // head_dim is 128 also wgmma (FlashHiLo).
    let mut kv8_kernels = vec![AttnKernel::FlashHiLo];
    if flash_prefill_wgmma_supported(hd, PrefillP::HiLo, true) {
        kv8_kernels.push(AttnKernel::FlashHiLoMmaSync);
    }
    if kernels.contains(&AttnKernel::Decode) {
        kv8_kernels.push(AttnKernel::Decode);
    }
    for kernel in kv8_kernels {
        for policy in [None, Some(serving)] {
            let (fp8, _, parts) =
                run_on(kernel, flash_q_per_tile, policy, (&dk8, &dv8, Some(scales)));
            let (deq, _, _) = run_on(kernel, flash_q_per_tile, policy, (&dkq, &dvq, None));
            let what = format!("{kernel:?} on FP8 pools vs dequantized BF16 pools nh={nh} nkv={nkv} hd={hd} bs={bs} parts={parts}");
            // The decode kernel and, where head_dim is 128, wgmma's _kv8 (FlashHiLo there) take
            // the codes as F16 (the scales folded in): rounding apart. mma.sync converts each
            // tile as the host dequantized: the same bits.
            let f16_path = kernel == AttnKernel::Decode
                || (kernel == AttnKernel::FlashHiLo
                    && flash_prefill_wgmma_supported(hd, PrefillP::HiLo, true));
            if f16_path {
                let deq: Vec<f64> = deq.iter().map(|&x| x as f64).collect();
                check(&what, &fp8, &deq, 2e-3);
            } else {
                assert!(
                    fp8.iter()
                        .zip(&deq)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: not bit for bit"
                );
            }
        }
    }
    if all_decode {
        return; // no multi-query tiles to compare below
    }
    if maps.is_some() && flash_prefill_wgmma_supported(hd, PrefillP::HiLo, false) {
        // TMA and cp.async land the same tiles (BF16, or FP8 codes), and the producer-warpgroup
        // versions (TMA only) do the same arithmetic: the same bits.
        let versions = [None, Some(PrefillWs::PingPong), Some(PrefillWs::Free)];
        for (pools, kind) in [(bf16_pools, "BF16"), ((&dk8, &dv8, Some(scales)), "FP8")] {
            let p_kinds: &[bool] = if kind == "BF16" {
                &[false, true]
            } else {
                &[false]
            };
            for &bf16_p in p_kinds {
                use_maps.set(false);
                let (cp_async, _, _) = run_on(
                    AttnKernel::FlashWs(None, bf16_p),
                    flash_q_per_tile,
                    None,
                    pools,
                );
                use_maps.set(true);
                for ws in versions {
                    let kernel = AttnKernel::FlashWs(ws, bf16_p);
                    let (tma, _, _) = run_on(kernel, flash_q_per_tile, None, pools);
                    assert!(
                        tma.iter()
                            .zip(&cp_async)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{kernel:?} on {kind} pools by TMA differs from cp.async loads \
                         (nh={nh} nkv={nkv} bs={bs})"
                    );
                }
            }
        }
    }
    if flash_prefill_wgmma_supported(hd, PrefillP::HiLo, false) {
        // wgmma and mma.sync sum the same products in their own orders: rounding apart.
        for (wgmma, mma_sync) in [
            (AttnKernel::FlashHiLo, AttnKernel::FlashHiLoMmaSync),
            (AttnKernel::Flash, AttnKernel::FlashMmaSync),
        ] {
            let (x, _, _) = run(wgmma, flash_q_per_tile, None);
            let (y, _, _) = run(mma_sync, flash_q_per_tile, None);
            let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            check(
                &format!("{wgmma:?} vs {mma_sync:?} nh={nh} nkv={nkv} bs={bs}"),
                &x,
                &y,
                3e-3,
            );
        }
    }
    // Tensor cores: a token of a multi-query tile gets the same bits whatever else shares its
    // tile (so chunked and whole prefills agree exactly), with either P.
    let mut compared = 0;
    for kernel in [
        AttnKernel::Flash,
        AttnKernel::FlashHiLo,
        AttnKernel::FlashF16,
        AttnKernel::FlashMmaSync,
        AttnKernel::FlashHiLoMmaSync,
    ] {
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
