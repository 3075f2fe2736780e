//! The matrix products (cuBLASLt FP8 with outer-vector scales, unscaled FP8 + scale epilogue, the
//! FP8 weight-streaming kernel, BF16) against a naive host product. Skips when no GPU is present.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tandem::backend::cuda::device::DeviceBuffer;
use tandem::backend::cuda::gemm::{Fp8Path, Gemm};

mod gpu_kernel_support;

use gpu_kernel_support::{check, env, rand_bf16, to_f32, Env};

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
fn fp8_streaming_gemm_matches_host_and_is_batch_invariant() {
    let Some((e, mut rng)) = env() else { return };
    let mut gemm = Gemm::new().unwrap();
    // N not a multiple of 16 or of the 64-row tile, K not a multiple of the 512-byte chunk nor of
    // the 128-byte box (the TMA boxes past K and N read zeros), fewer chunks than SMs (a tile
    // split over several CTAs), the o_proj shape (tiles split at CTA boundaries), M across 1..64
    // token tiles and past 64 (two launches).
    for (m, n, k) in [
        (1, 64, 256),
        (1, 200, 4096),
        (2, 100, 528),
        (5, 1000, 16),
        (8, 256, 2048),
        (13, 130, 1040),
        (33, 64, 2048),
        (64, 192, 1024),
        (70, 80, 512),
        (3, 8192, 8192),
    ] {
        let c = fp8_case(&e, &mut rng, m, n, k);
        // Twice: the reduction counters must be back at zero after each launch.
        let mut rounds = vec![];
        for round in 0..2 {
            let got = run_fp8_path(&e, &mut gemm, &c, Fp8Path::Stream, m, n, k, false);
            check(
                &format!("stream bf16 {m}x{n}x{k} round {round}"),
                &got,
                &c.want,
                1e-2,
            );
            rounds.push(got);
        }
        assert_eq!(
            rounds[0], rounds[1],
            "stream {m}x{n}x{k}: two launches differ"
        );
        let got = run_fp8_path(&e, &mut gemm, &c, Fp8Path::Stream, m, n, k, true);
        check(&format!("stream f32 {m}x{n}x{k}"), &got, &c.want, 1e-3);
        // A token's bits do not depend on the batch: the first token alone gives the same row.
        if m > 1 {
            let alone = run_fp8_path(&e, &mut gemm, &c, Fp8Path::Stream, 1, n, k, true);
            assert_eq!(
                alone[..],
                got[..n],
                "stream {m}x{n}x{k}: token 0 alone differs"
            );
        }
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
