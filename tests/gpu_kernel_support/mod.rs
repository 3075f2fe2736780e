//! Shared by the GPU kernel tests (cuda_kernels, cuda_attention, cuda_gemm): a GPU with the
//! kernels loaded, seeded random inputs, poisoned outputs, and the relative-error check.
#![allow(dead_code)]

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem::backend::cuda::device::{gpu_available, DeviceBuffer, Gpu};
use tandem::backend::cuda::kernels::Kernels;
use tandem::backend::cuda::ops::{Ops, Precision};

pub struct Env {
    pub gpu: Gpu,
    pub kernels: Kernels,
}

impl Env {
    pub fn ops(&self) -> Ops<'_> {
        Ops {
            k: &self.kernels,
            stream: self.gpu.cu_stream(),
            act: Precision::Bf16,
        }
    }
    pub fn poisoned(&self, bytes: usize) -> DeviceBuffer {
        let b = self.gpu.alloc(bytes).unwrap();
        self.gpu.memset(&b, 0xFF).unwrap();
        b
    }
    pub fn bf16s(&self, b: &DeviceBuffer, n: usize) -> Vec<f32> {
        let v: Vec<bf16> = self.gpu.download(b, n).unwrap();
        v.iter().map(|x| x.to_f32()).collect()
    }
    pub fn f32s(&self, b: &DeviceBuffer, n: usize) -> Vec<f32> {
        self.gpu.download(b, n).unwrap()
    }
}

pub fn env() -> Option<(Env, ChaCha8Rng)> {
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

pub fn rand_bf16(rng: &mut ChaCha8Rng, n: usize, a: f32) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-a..a)))
        .collect()
}

pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// ‖out − ref‖ / ‖ref‖; infinite when any output is not finite.
pub fn rel_err(out: &[f32], reference: &[f64]) -> f64 {
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

pub fn check(name: &str, out: &[f32], reference: &[f64], tol: f64) {
    let e = rel_err(out, reference);
    println!("{name}: rel err {e:.2e} (tol {tol:.0e})");
    assert!(e < tol, "{name}: relative error {e} over {tol}");
}
