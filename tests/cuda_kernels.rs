//! The elementwise, fused and sampling CUDA kernels against naive host references, on fresh random
//! inputs, with outputs poisoned (0xFF bytes: NaN) before each run. Attention kernels are in
//! cuda_attention.rs, matrix products in cuda_gemm.rs. Skips when no GPU is present.

use half::bf16;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tandem::backend::cuda::device::DeviceBuffer;
use tandem::backend::cuda::ops::{Fp8KvScales, Ops, Precision};

mod gpu_kernel_support;

use gpu_kernel_support::{check, env, rand_bf16, Env};

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
    e.ops()
        .embed(out.ptr, dt.ptr, dk.ptr, n, h, 0..vocab)
        .unwrap();
    let got = e.f32s(&out, n * h);
    let want: Vec<f64> = tokens
        .iter()
        .flat_map(|&t| table[t as usize * h..][..h].iter().map(|x| x.to_f64()))
        .collect();
    check("embed", &got, &want, 1e-12);
    // A vocab-parallel rank holding ids 300..700 (rows 0..400 of its table): other ids embed
    // as zeros.
    let slice = 300..700;
    e.ops()
        .embed(out.ptr, dt.ptr, dk.ptr, n, h, slice.clone())
        .unwrap();
    let got = e.f32s(&out, n * h);
    let mut want = vec![0f64; n * h];
    for (row, &t) in want.chunks_mut(h).zip(&tokens) {
        if slice.contains(&(t as usize)) {
            let from = &table[(t as usize - slice.start) * h..][..h];
            row.iter_mut().zip(from).for_each(|(w, x)| *w = x.to_f64());
        }
    }
    check("embed of a vocab slice", &got, &want, 1e-12);
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
    for (t, &p) in pos.iter().enumerate().take(n) {
        for head in 0..nh + nkv {
            let base = t * stride + head * hd;
            for i in 0..hd / 2 {
                let ang = p as f64 * inv[i] as f64;
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
    // Rows held in registers (aligned, and not a multiple of the 8-column vectors), and rows
    // too wide for that (the looping kernel).
    for (n, k) in [(17, 1024), (9, 8193), (3, 70_000)] {
        quantize_case(&e, &mut rng, n, k);
    }
}

fn quantize_case(e: &Env, rng: &mut ChaCha8Rng, n: usize, k: usize) {
    let mut x = rand_bf16(rng, n * k, 3.0);
    x[2 * k + 7] = bf16::from_f32(1000.0); // one outlier row
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

/// rope_kv_write of an unscaled FP8 qkv product (decode) gives the bytes of the product's epilogue
/// followed by rope_kv_write: the rotated q and k heads and both caches, BF16 and FP8 pools.
#[test]
fn rope_kv_write_of_an_unscaled_product_matches_its_epilogue_then_rope_kv_write() {
    let Some((e, mut rng)) = env() else { return };
    let ops = Ops {
        k: &e.kernels,
        stream: e.gpu.cu_stream(),
        act: Precision::Bf16,
    };
    for (n, nh, nkv, hd) in [(1usize, 64, 8, 128), (32, 64, 8, 128), (7, 6, 3, 6)] {
        let (bs, blocks) = (16, n.div_ceil(16) + 3);
        let stride = (nh + 2 * nkv) * hd;
        let acc: Vec<f32> = (0..n * stride)
            .map(|_| rng.random_range(-300.0..300.0))
            .collect();
        let sx: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..0.02)).collect();
        let sw: Vec<f32> = (0..stride)
            .map(|_| rng.random_range(0.0005..0.01))
            .collect();
        let pos: Vec<i32> = (0..n).map(|_| rng.random_range(1..100_000)).collect();
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        // Distinct slots inside the pool.
        let slots: Vec<i32> = (0..n as i32).map(|i| 2 * i).collect();
        let up = |v: &[f32]| e.gpu.upload(v).unwrap();
        let (acc_d, sx_d, sw_d, inv_d) = (up(&acc), up(&sx), up(&sw), up(&inv));
        let (dp, ds) = (e.gpu.upload(&pos).unwrap(), e.gpu.upload(&slots).unwrap());
        for fp8 in [None, Some(Fp8KvScales { k: 0.5, v: 2.0 })] {
            let cache_bytes = blocks * nkv * bs * hd * if fp8.is_some() { 1 } else { 2 };
            let (k1, v1, k2, v2) = (
                e.poisoned(cache_bytes),
                e.poisoned(cache_bytes),
                e.poisoned(cache_bytes),
                e.poisoned(cache_bytes),
            );
            let (q1, q2) = (e.poisoned(n * stride * 2), e.poisoned(n * stride * 2));
            tandem::backend::cuda::fp8_stream::scale_rows_cols(
                &e.kernels,
                n,
                stride,
                acc_d.ptr,
                sx_d.ptr,
                sw_d.ptr,
                q1.ptr,
                e.gpu.cu_stream(),
            )
            .unwrap();
            ops.rope_kv_write(
                q1.ptr, None, k1.ptr, v1.ptr, dp.ptr, inv_d.ptr, ds.ptr, n, nh, nkv, hd, bs, fp8,
            )
            .unwrap();
            ops.rope_kv_write(
                q2.ptr,
                Some([acc_d.ptr, sx_d.ptr, sw_d.ptr]),
                k2.ptr,
                v2.ptr,
                dp.ptr,
                inv_d.ptr,
                ds.ptr,
                n,
                nh,
                nkv,
                hd,
                bs,
                fp8,
            )
            .unwrap();
            let what = format!(
                "rope_kv_write_from {n}x({nh}+{nkv}+{nkv})x{hd} fp8 {}",
                fp8.is_some()
            );
            let bytes =
                |b: &DeviceBuffer, len: usize| -> Vec<u8> { e.gpu.download(b, len).unwrap() };
            let (r1, r2) = (bytes(&q1, n * stride * 2), bytes(&q2, n * stride * 2));
            // q and k heads of each row (v is read from the cache, not written back).
            let qk = (nh + nkv) * hd * 2;
            for t in 0..n {
                let row = t * stride * 2;
                assert_eq!(r1[row..row + qk], r2[row..row + qk], "{what}: row {t}");
            }
            assert_eq!(
                bytes(&k1, cache_bytes),
                bytes(&k2, cache_bytes),
                "{what}: k cache"
            );
            assert_eq!(
                bytes(&v1, cache_bytes),
                bytes(&v2, cache_bytes),
                "{what}: v cache"
            );
        }
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
        // A 70B decode row (64 q + 8 kv heads), a batch, odd head_dim halves, one head group;
        // 300 rows take the prefill shape (a block per row, every head in it).
        for (n, nh, nkv, hd) in [
            (1usize, 64, 8, 128),
            (32, 64, 8, 128),
            (23, 8, 2, 128),
            (7, 6, 3, 6),
            (300, 64, 8, 128),
            (300, 6, 3, 6),
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
                q2.ptr, None, k2.ptr, v2.ptr, dp.ptr, di.ptr, ds.ptr, n, nh, nkv, hd, bs, None,
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
            if act != Precision::Bf16 {
                continue;
            }
            // Into FP8 pools: the same rotated rows, and each written cache element the e4m3 code
            // of the BF16 pool's value over the scale (0xFF, a NaN code, stays where nothing went).
            let scales = Fp8KvScales { k: 0.5, v: 2.0 };
            let q3 = upload(&qkv).unwrap();
            let elems = cache_bytes / 2;
            let (k3, v3) = (e.poisoned(elems), e.poisoned(elems));
            ops.rope_kv_write(
                q3.ptr,
                None,
                k3.ptr,
                v3.ptr,
                dp.ptr,
                di.ptr,
                ds.ptr,
                n,
                nh,
                nkv,
                hd,
                bs,
                Some(scales),
            )
            .unwrap();
            assert_eq!(
                bytes(&q2, qkv_bytes),
                bytes(&q3, qkv_bytes),
                "{what} fp8: qkv"
            );
            for (bf, f8, scale, name) in [(&kb, &k3, scales.k, "k"), (&vb, &v3, scales.v, "v")] {
                let codes = bytes(f8, elems);
                for (i, pair) in bf.chunks(2).enumerate() {
                    let bits = u16::from_le_bytes([pair[0], pair[1]]);
                    let want = if bits == 0xFFFF {
                        0xFF
                    } else {
                        let v = bf16::from_bits(bits).to_f32();
                        float8::F8E4M3::from_f32(v / scale).to_bits()
                    };
                    assert_eq!(codes[i], want, "{what} fp8 {name} cache element {i}");
                }
            }
        }
    }
}

/// The fused norm reading an unscaled FP8 product's accumulator (decode's o_proj / down_proj
/// delta) gives the bytes of the product's epilogue (scale_rows_cols) followed by the fused norm:
/// the same residual, quantized row and scales, at decode row counts and widths that are not a
/// multiple of the 4-column vectors.
#[test]
fn fused_norm_of_an_unscaled_product_matches_its_epilogue_then_the_norm() {
    let Some((e, mut rng)) = env() else { return };
    let ops = Ops {
        k: &e.kernels,
        stream: e.gpu.cu_stream(),
        act: Precision::Bf16,
    };
    for (n, h) in [
        (1, 8192),
        (3, 8192),
        (32, 8192),
        (96, 8192),
        (2, 130),
        (5, 16384),
        (4, 1000),
    ] {
        let res: Vec<f32> = (0..n * h).map(|_| rng.random_range(-2.0..2.0)).collect();
        let acc: Vec<f32> = (0..n * h)
            .map(|_| rng.random_range(-300.0..300.0))
            .collect();
        let sx: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..0.02)).collect();
        let sw: Vec<f32> = (0..h).map(|_| rng.random_range(0.0005..0.01)).collect();
        let w = e.gpu.upload(&rand_bf16(&mut rng, h, 1.5)).unwrap();
        let (acc_d, sw_d) = (e.gpu.upload(&acc).unwrap(), e.gpu.upload(&sw).unwrap());
        let (r1, r2) = (e.gpu.upload(&res).unwrap(), e.gpu.upload(&res).unwrap());
        let (s1, s2) = (e.gpu.upload(&sx).unwrap(), e.gpu.upload(&sx).unwrap());
        // Epilogue into a BF16 delta, then the fused norm.
        let delta = e.poisoned(n * h * 2);
        tandem::backend::cuda::fp8_stream::scale_rows_cols(
            &e.kernels,
            n,
            h,
            acc_d.ptr,
            s1.ptr,
            sw_d.ptr,
            delta.ptr,
            e.gpu.cu_stream(),
        )
        .unwrap();
        let q1 = e.poisoned(n * h);
        ops.add_rmsnorm_fp8(r1.ptr, delta.ptr, w.ptr, q1.ptr, s1.ptr, n, h, 1e-5)
            .unwrap();
        // Folded: the norm scales the accumulator itself.
        let q2 = e.poisoned(n * h);
        ops.add_rmsnorm_fp8_acc(
            r2.ptr, acc_d.ptr, sw_d.ptr, w.ptr, q2.ptr, s2.ptr, n, h, 1e-5,
        )
        .unwrap();
        let what = format!("add_rmsnorm_fp8_acc {n}x{h}");
        let bytes = |b: &DeviceBuffer, len: usize| -> Vec<u8> { e.gpu.download(b, len).unwrap() };
        assert_eq!(
            bytes(&r1, n * h * 4),
            bytes(&r2, n * h * 4),
            "{what}: residual"
        );
        assert_eq!(bytes(&s1, n * 4), bytes(&s2, n * 4), "{what}: scales");
        assert_eq!(bytes(&q1, n * h), bytes(&q2, n * h), "{what}: values");
        let res2 = e.f32s(&r2, n * h);
        assert!(res2 != res, "{what}: the delta was added");
    }
}

/// The fused silu reading an unscaled gate_up product's accumulator gives the bytes of the
/// product's epilogue followed by the fused silu (the split pair of decode rows), scales included.
#[test]
fn fused_silu_of_an_unscaled_product_matches_its_epilogue_then_the_silu() {
    let Some((e, mut rng)) = env() else { return };
    let ops = Ops {
        k: &e.kernels,
        stream: e.gpu.cu_stream(),
        act: Precision::Bf16,
    };
    for (n, inter) in [(1, 28672), (7, 1001), (32, 28672), (63, 1000)] {
        let cols = 2 * inter;
        let acc: Vec<f32> = (0..n * cols)
            .map(|_| rng.random_range(-400.0..400.0))
            .collect();
        let sx: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..0.02)).collect();
        let sw: Vec<f32> = (0..cols).map(|_| rng.random_range(0.0005..0.01)).collect();
        let (acc_d, sw_d) = (e.gpu.upload(&acc).unwrap(), e.gpu.upload(&sw).unwrap());
        let (s1, s2) = (e.gpu.upload(&sx).unwrap(), e.gpu.upload(&sx).unwrap());
        let scratch = e.poisoned(Ops::fused_silu_scratch_bytes(n, inter));
        let gate_up = e.poisoned(n * cols * 2);
        tandem::backend::cuda::fp8_stream::scale_rows_cols(
            &e.kernels,
            n,
            cols,
            acc_d.ptr,
            s1.ptr,
            sw_d.ptr,
            gate_up.ptr,
            e.gpu.cu_stream(),
        )
        .unwrap();
        let q1 = e.poisoned(n * inter);
        ops.silu_mul_fp8(q1.ptr, s1.ptr, gate_up.ptr, scratch.ptr, n, inter)
            .unwrap();
        let q2 = e.poisoned(n * inter);
        ops.silu_mul_fp8_acc(q2.ptr, s2.ptr, acc_d.ptr, sw_d.ptr, scratch.ptr, n, inter)
            .unwrap();
        let what = format!("silu_mul_fp8_acc {n}x{inter}");
        let bytes = |b: &DeviceBuffer, len: usize| -> Vec<u8> { e.gpu.download(b, len).unwrap() };
        assert_eq!(bytes(&s1, n * 4), bytes(&s2, n * 4), "{what}: scales");
        assert_eq!(
            bytes(&q1, n * inter),
            bytes(&q2, n * inter),
            "{what}: values"
        );
        assert!(
            e.f32s(&s2, n).iter().zip(&sx).all(|(a, b)| a != b),
            "{what}: new scales"
        );
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
