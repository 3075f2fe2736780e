//! Matrix products through cuBLASLt: `out[M, N] = x[M, K] · w[N, K]ᵀ`, row-major.
//!
//! cuBLASLt is column-major, so the product is computed as `outᵀ = w · xᵀ` with cuBLASLt's A = w
//! (TRANSA = T), B = x: the "TN" layout FP8 requires. FP8 uses per-output-channel weight scales
//! (A_SCALE, length N) and per-token activation scales (B_SCALE, length M) in one call, through
//! the OUTER_VEC_32F scale mode (checked on the H200, see shared/docs/device.md). Plans (descriptor,
//! layouts, algorithm) are made once per shape and reused; the algorithm is the fastest of the
//! heuristic's candidates on this machine for decode-sized products, its first for larger ones
//! (`gemm_tune`).
//!
//! [`Gemm::fp8_linear`] picks the FP8 path by batch size (see [`Fp8Policy`]): the weight-streaming
//! kernel ([`super::fp8_stream`], off by default), cuBLASLt without scales plus a scale epilogue
//! for small M, and the outer-vector cuBLASLt product above.

use super::device::DeviceBuffer;
use super::fp8_stream::{self, StreamScratch, TensorMap};
use super::gemm_tune;
use super::kernels::Kernels;
use anyhow::{anyhow, Result};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::sys::CUstream;
use std::collections::HashMap;
use std::ffi::c_void;

const WORKSPACE_BYTES: usize = 64 << 20;
/// Split-K partial sums of the streaming kernel, and the F32 product of the unscaled path.
const SCRATCH_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmKind {
    /// e4m3 x e4m3 with vector scales; BF16 out (fast accumulation) or F32 out (full accumulation).
    Fp8 { f32_out: bool },
    /// e4m3 x e4m3 without scales, F32 out (fast accumulation); scaled by a separate epilogue.
    Fp8Unscaled,
    /// BF16 x BF16, BF16 or F32 out.
    Bf16 { f32_out: bool },
    /// F32 x F32, F32 out, no TF32 (the reference-precision mode).
    F32,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
    /// Algorithms still to time on first use (autotuning; empty once chosen, or when off).
    untimed: Vec<sys::cublasLtMatmulAlgo_t>,
}

/// Which FP8 path runs which batch size (BF16 out; F32 out always takes the cuBLASLt product with
/// full accumulation, the reference-precision mode).
///
/// Measured on the H200 at the 70B shapes (`tandem bench-gemm`; benchmarks/results/gemm_fp8_h200.json): cuBLASLt without
/// scales plus the epilogue is 1.1-1.7x faster than the outer-vector product for M <= 64 on o_proj,
/// gate_up and down, and within 12% of it on qkv; the outer-vector product wins at M = 128 on
/// three of the four shapes. The streaming kernel ([`fp8_stream`]) is 1.6 us faster than the
/// unscaled path on qkv at M = 1, 0.8-8 us slower on the others, slower from M = 8, and inside the
/// decode step slower on every linear (benchmarks/results/cuda-h200-round11.json), so it is off by
/// default: a path switch by batch size also changes a sequence's numerics with the batch it runs
/// in. `TANDEM_FP8_STREAM_MAX_M` / `TANDEM_FP8_UNSCALED_MAX_M` override the limits, and
/// `TANDEM_FP8_STREAM_MAX_WEIGHT_MB` keeps the streaming kernel to weights of at most that size
/// (experiments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Policy {
    /// The streaming kernel for M up to this...
    pub stream_max_m: usize,
    /// ...and weights of at most this many bytes.
    pub stream_max_weight: usize,
    /// Then cuBLASLt without scales + epilogue for M up to this; outer-vector cuBLASLt above.
    pub unscaled_max_m: usize,
}

impl Default for Fp8Policy {
    fn default() -> Self {
        Self {
            stream_max_m: 0,
            stream_max_weight: usize::MAX,
            // The crossover lies between 64 and 128 (measured at both).
            unscaled_max_m: 96,
        }
    }
}

impl Fp8Policy {
    /// The default with the environment's overrides.
    pub fn from_env() -> Self {
        let var = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let d = Self::default();
        Self {
            stream_max_m: var("TANDEM_FP8_STREAM_MAX_M", d.stream_max_m),
            stream_max_weight: var("TANDEM_FP8_STREAM_MAX_WEIGHT_MB", usize::MAX >> 20) << 20,
            unscaled_max_m: var("TANDEM_FP8_UNSCALED_MAX_M", d.unscaled_max_m),
        }
    }
}

/// An FP8 product path (for benchmarks that time each one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Path {
    /// The weight-streaming kernel (one CTA per SM, the weight chunks split evenly between them).
    Stream,
    /// cuBLASLt without scales, F32 staged, then the scale epilogue.
    Unscaled,
    /// cuBLASLt with outer-vector scales.
    OuterVector,
}

pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceBuffer,
    scratch: StreamScratch,
    plans: HashMap<(GemmKind, usize, usize, usize), Plan>,
    /// Autotuned algorithm choices of this machine (see `gemm_tune`).
    tuned: Option<gemm_tune::TuneCache>,
    pub fp8_policy: Fp8Policy,
    /// Tensor maps of the weights the streaming kernel has read, by (address, n, k): encoded on
    /// the host at first use, passed by value after.
    weight_maps: HashMap<(u64, usize, usize), TensorMap>,
    /// SMs of the current GPU (the streaming kernel runs a CTA on each).
    sms: usize,
}

fn err(what: &str) -> impl Fn(lt::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
}

unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    lt::set_matmul_desc_attribute(
        desc,
        attr,
        v as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
    .map_err(|e| anyhow!("cuBLASLt set {attr:?}: {e:?}"))
}

impl Gemm {
    pub fn new() -> Result<Self> {
        // SAFETY: probing the shared library only.
        if !unsafe { sys::is_culib_present() } {
            anyhow::bail!(
                "cuBLASLt (libcublasLt.so / libcublasLt.so.13) is not on the library path"
            );
        }
        let handle = lt::create_handle().map_err(err("create"))?;
        let mut dev = 0;
        // SAFETY: out-parameters of plain queries of the current context's device.
        let sms = unsafe {
            cudarc::driver::sys::cuCtxGetDevice(&mut dev).result()?;
            cudarc::driver::result::device::get_attribute(
                dev,
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )?
        } as usize;
        Ok(Self {
            handle,
            workspace: DeviceBuffer::new(WORKSPACE_BYTES)?,
            scratch: StreamScratch::new(SCRATCH_BYTES)?,
            plans: HashMap::new(),
            tuned: gemm_tune::enabled().then(gemm_tune::TuneCache::for_current_gpu),
            fp8_policy: Fp8Policy::from_env(),
            weight_maps: HashMap::new(),
            sms,
        })
    }

    fn plan(&mut self, kind: GemmKind, m: usize, n: usize, k: usize) -> Result<&Plan> {
        let key = (kind, m, n, k);
        if !self.plans.contains_key(&key) {
            let plan = self.make_plan(kind, m, n, k)?;
            self.plans.insert(key, plan);
        }
        Ok(&self.plans[&key])
    }

    fn make_plan(&self, kind: GemmKind, m: usize, n: usize, k: usize) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        use sys::cudaDataType as T;
        let (in_t, out_t) = match kind {
            GemmKind::Fp8 { f32_out: false } => (T::CUDA_R_8F_E4M3, T::CUDA_R_16BF),
            GemmKind::Fp8 { f32_out: true } | GemmKind::Fp8Unscaled => {
                (T::CUDA_R_8F_E4M3, T::CUDA_R_32F)
            }
            GemmKind::Bf16 { f32_out: false } => (T::CUDA_R_16BF, T::CUDA_R_16BF),
            GemmKind::Bf16 { f32_out: true } => (T::CUDA_R_16BF, T::CUDA_R_32F),
            GemmKind::F32 => (T::CUDA_R_32F, T::CUDA_R_32F),
        };
        let desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, T::CUDA_R_32F)
                .map_err(err("matmul desc"))?;
        // SAFETY: `desc` and the layouts are live; attribute values have the documented types.
        unsafe {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?; // CUBLAS_OP_T
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?; // CUBLAS_OP_N
            if let GemmKind::Fp8 { f32_out } = kind {
                let outer =
                    sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
                        as i32;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
                let fast_accum = if f32_out { 0i8 } else { 1i8 };
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast_accum)?;
                // Scale pointers must be set before the heuristic; real ones are set per call.
                let dummy = self.workspace.ptr;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &dummy)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &dummy)?;
            }
            if kind == GemmKind::Fp8Unscaled {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
            }
            let a = lt::create_matrix_layout(in_t, k as u64, n as u64, k as i64)
                .map_err(err("layout A"))?;
            let b = lt::create_matrix_layout(in_t, k as u64, m as u64, k as i64)
                .map_err(err("layout B"))?;
            let d = lt::create_matrix_layout(out_t, n as u64, m as u64, n as i64)
                .map_err(err("layout D"))?;
            let pref = lt::create_matmul_pref().map_err(err("preference"))?;
            let ws = WORKSPACE_BYTES;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .map_err(err("preference workspace"))?;
            let count = if self.tuned.is_some() && m <= gemm_tune::max_m() {
                gemm_tune::MAX_CANDIDATES
            } else {
                1
            };
            let algos = gemm_tune::candidates(self.handle, desc, [a, b, d], pref, count);
            let _ = lt::destroy_matmul_pref(pref);
            let algos = algos.map_err(|e| {
                anyhow!("cuBLASLt has no algorithm for {kind:?} M={m} N={n} K={k}: {e}")
            })?;
            Ok(Plan {
                desc,
                layouts: [a, b, d],
                algo: algos[0],
                untimed: if algos.len() > 1 { algos } else { vec![] },
            })
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        kind: GemmKind,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        w: u64,
        out: u64,
        stream: CUstream,
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let ws = (self.workspace.ptr, WORKSPACE_BYTES);
        let handle = self.handle;
        self.plan(kind, m, n, k)?;
        let plan = self
            .plans
            .get_mut(&(kind, m, n, k))
            .expect("plan made above");
        let matmul = |algo: &sys::cublasLtMatmulAlgo_t| {
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: pointers are device buffers sized by the callers for these shapes.
            unsafe {
                lt::matmul(
                    handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    w as *const c_void,
                    plan.layouts[0],
                    x as *const c_void,
                    plan.layouts[1],
                    out as *const c_void,
                    plan.layouts[2],
                    out as *mut c_void,
                    plan.layouts[2],
                    algo,
                    ws.0 as *mut c_void,
                    ws.1,
                    stream as sys::cudaStream_t,
                )
            }
            .map_err(|e| anyhow!("cuBLASLt matmul {kind:?} M={m} N={n} K={k}: {e:?}"))
        };
        if !plan.untimed.is_empty() && !gemm_tune::capturing(stream)? {
            // This machine's earlier choice, or a timing on the real operands (the call below then
            // writes the result). Not while a graph is captured: the heuristic's choice until an
            // eager use.
            let algos = std::mem::take(&mut plan.untimed);
            let shape = format!("{kind:?} {m}x{n}x{k}");
            let cache = self.tuned.as_mut().expect("candidates only when tuning");
            let best = match cache.get(&shape).filter(|&r| r < algos.len()) {
                Some(rank) => rank,
                None => {
                    let rank = gemm_tune::fastest(stream, algos.len(), |i| matmul(&algos[i]))?;
                    cache.put(&shape, rank);
                    rank
                }
            };
            plan.algo = algos[best];
        }
        matmul(&plan.algo)
    }

    /// `out[M,N] = (x[M,K] · x_scale[M]) · (w[N,K] · w_scale[N])ᵀ`, e4m3 inputs, F32 or BF16 out.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8(
        &mut self,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        x_scale: u64,
        w: u64,
        w_scale: u64,
        out: u64,
        f32_out: bool,
        stream: CUstream,
    ) -> Result<()> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        if m == 0 {
            return Ok(());
        }
        let kind = GemmKind::Fp8 { f32_out };
        let desc = self.plan(kind, m, n, k)?.desc;
        // SAFETY: live descriptor; pointer-typed attributes.
        unsafe {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale)?;
        }
        self.run(kind, m, n, k, x, w, out, stream)
    }

    /// The FP8 linear `out = (x · x_scale) · (w · w_scale)ᵀ` by the path [`Self::fp8_path`] picks.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_linear(
        &mut self,
        kernels: &Kernels,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        x_scale: u64,
        w: u64,
        w_scale: u64,
        out: u64,
        f32_out: bool,
        stream: CUstream,
    ) -> Result<()> {
        let path = self.fp8_path(m, n, k, f32_out);
        self.fp8_by(
            path, kernels, m, n, k, x, x_scale, w, w_scale, out, f32_out, stream,
        )
    }

    /// When [`Self::fp8_linear`] would take the unscaled path: only its product, into the F32
    /// accumulator returned (scratch, valid until the next product), for a consumer that applies
    /// the epilogue `acc[m, n] * x_scale[m] * w_scale[n]` itself. `None`, launching nothing,
    /// otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_unscaled_product(
        &mut self,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        w: u64,
        stream: CUstream,
    ) -> Result<Option<u64>> {
        if m == 0 || self.fp8_path(m, n, k, false) != Fp8Path::Unscaled {
            return Ok(None);
        }
        let acc = self.scratch.partial.ptr;
        self.run(GemmKind::Fp8Unscaled, m, n, k, x, w, acc, stream)?;
        Ok(Some(acc))
    }

    /// The path of an FP8 product under [`Self::fp8_policy`].
    pub fn fp8_path(&self, m: usize, n: usize, k: usize, f32_out: bool) -> Fp8Path {
        let p = self.fp8_policy;
        if f32_out {
            Fp8Path::OuterVector
        } else if m <= p.stream_max_m
            && n * k <= p.stream_max_weight
            && fp8_stream::supports(n, k)
            && fp8_stream::partial_bytes(self.sms) <= self.scratch.partial.bytes
        {
            Fp8Path::Stream
        } else if m <= p.unscaled_max_m
            && n.is_multiple_of(16)
            && k.is_multiple_of(16)
            && m * n * 4 <= self.scratch.partial.bytes
        {
            Fp8Path::Unscaled
        } else {
            Fp8Path::OuterVector
        }
    }

    /// The FP8 linear by a given path (benchmarks compare them; [`Self::fp8_linear`] chooses).
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_by(
        &mut self,
        path: Fp8Path,
        kernels: &Kernels,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        x_scale: u64,
        w: u64,
        w_scale: u64,
        out: u64,
        f32_out: bool,
        stream: CUstream,
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        match path {
            Fp8Path::Stream => {
                let map = match self.weight_maps.get(&(w, n, k)) {
                    Some(map) => *map,
                    None => {
                        let map = fp8_stream::weight_map(w, n, k)?;
                        self.weight_maps.insert((w, n, k), map);
                        map
                    }
                };
                fp8_stream::run(
                    kernels,
                    &self.scratch,
                    self.sms,
                    &map,
                    m,
                    n,
                    k,
                    x,
                    x_scale,
                    w_scale,
                    out,
                    f32_out,
                    stream,
                )
            }
            Fp8Path::Unscaled => {
                anyhow::ensure!(
                    !f32_out && m * n * 4 <= self.scratch.partial.bytes,
                    "unscaled FP8 path: BF16 out and M*N*4 <= {} bytes only",
                    self.scratch.partial.bytes
                );
                let acc = self.scratch.partial.ptr;
                self.run(GemmKind::Fp8Unscaled, m, n, k, x, w, acc, stream)?;
                fp8_stream::scale_rows_cols(kernels, m, n, acc, x_scale, w_scale, out, stream)
            }
            Fp8Path::OuterVector => self.fp8(m, n, k, x, x_scale, w, w_scale, out, f32_out, stream),
        }
    }

    /// `out[M,N] = x[M,K] · w[N,K]ᵀ`, BF16 inputs; F32 out when `f32_out`, else BF16.
    #[allow(clippy::too_many_arguments)]
    pub fn bf16(
        &mut self,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        w: u64,
        out: u64,
        f32_out: bool,
        stream: CUstream,
    ) -> Result<()> {
        self.run(GemmKind::Bf16 { f32_out }, m, n, k, x, w, out, stream)
    }

    /// `out[M,N] = x[M,K] · w[N,K]ᵀ` in F32 (no TF32).
    #[allow(clippy::too_many_arguments)]
    pub fn f32(
        &mut self,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        w: u64,
        out: u64,
        stream: CUstream,
    ) -> Result<()> {
        self.run(GemmKind::F32, m, n, k, x, w, out, stream)
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: each object was created once by this struct.
        unsafe {
            for plan in self.plans.values() {
                for l in plan.layouts {
                    let _ = lt::destroy_matrix_layout(l);
                }
                let _ = lt::destroy_matmul_desc(plan.desc);
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

unsafe impl Send for Gemm {}
