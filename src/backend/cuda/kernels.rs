//! Kernel sources (`kernels/*.cu`, embedded in the binary), compiled with NVRTC for `sm_90a` at run
//! time, the cubins cached on disk under `$TANDEM_KERNEL_CACHE` or `~/.cache/tandem/kernels/`
//! (keyed by a hash of source, options and NVRTC version), and loaded as CUDA modules.
//!
//! The sources include no CUDA header (BF16/FP8 conversions are PTX `cvt`), so NVRTC needs no
//! include path: the same compile runs on the GPU machine and in CI without a GPU.

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, sys};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;

const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// (module name, source) of every kernel module.
pub const MODULES: &[(&str, &str)] = &[
    (
        "elementwise",
        concat!(
            include_str!("../../../kernels/peer.cuh"),
            include_str!("../../../kernels/elementwise.cu")
        ),
    ),
    ("attention", include_str!("../../../kernels/attention.cu")),
    (
        "flash_attention",
        concat!(
            include_str!("../../../kernels/flash_common.cuh"),
            include_str!("../../../kernels/flash_attention.cu")
        ),
    ),
    (
        "flash_prefill_wgmma",
        concat!(
            include_str!("../../../kernels/flash_common.cuh"),
            include_str!("../../../kernels/tma.cuh"),
            include_str!("../../../kernels/flash_prefill_wgmma.cu"),
            include_str!("../../../kernels/flash_prefill_ws.cu")
        ),
    ),
    (
        "flash_decode",
        concat!(
            include_str!("../../../kernels/flash_common.cuh"),
            include_str!("../../../kernels/flash_decode.cu"),
            include_str!("../../../kernels/flash_decode_kv8.cu")
        ),
    ),
    ("sampling", include_str!("../../../kernels/sampling.cu")),
    ("kv_copy", include_str!("../../../kernels/kv_copy.cu")),
    (
        "gemm_fp8",
        concat!(
            include_str!("../../../kernels/tma.cuh"),
            include_str!("../../../kernels/gemm_fp8.cu")
        ),
    ),
    (
        "all_reduce",
        concat!(
            include_str!("../../../kernels/peer.cuh"),
            include_str!("../../../kernels/all_reduce.cu")
        ),
    ),
];

/// Kernels instantiated per activation type, as `<name>_bf16` and `<name>_f32`.
const TYPED: &[(&str, &[&str])] = &[
    (
        "elementwise",
        &[
            "add_rmsnorm",
            "final_norm_rows",
            "rope",
            "silu_mul",
            "quantize_fp8",
            "fp8_row_scale",
            "quantize_fp8_scaled",
            "add_rmsnorm_fp8_rows",
            "add_rmsnorm_fp8_k1",
            "add_rmsnorm_fp8_k2",
            "add_rmsnorm_fp8_k4",
            "add_rmsnorm_fp8_k8",
            "silu_mul_fp8_k1",
            "silu_mul_fp8_k2",
            "silu_mul_fp8_k4",
            "silu_mul_fp8_k8",
            "quantize_fp8_k1",
            "quantize_fp8_k2",
            "quantize_fp8_k4",
            "quantize_fp8_k8",
            "silu_split_amax",
            "silu_split_quant",
            "kv_write",
            "rope_kv_write",
        ],
    ),
    (
        "attention",
        &[
            "paged_attention",
            "attention_combine",
            "attention_combine_fp8",
        ],
    ),
    ("all_reduce", &["all_reduce_oneshot"]),
];

/// Kernels with one version.
const PLAIN: &[(&str, &[&str])] = &[
    (
        "elementwise",
        &[
            "embed",
            "fake_quant_fp8_f32",
            "fake_quant_fp8_f32_scaled",
            "fill_uniform_bf16",
            "fill_uniform_fp8",
            "fill_uniform_f32",
            "rope_kv_write_kv8_bf16",
            "add_rmsnorm_fp8_acc_k1_bf16",
            "add_rmsnorm_fp8_acc_k2_bf16",
            "add_rmsnorm_fp8_acc_k4_bf16",
            "add_rmsnorm_fp8_acc_k8_bf16",
            "silu_split_amax_acc_bf16",
            "silu_split_quant_acc_bf16",
            "rope_kv_write_acc_bf16",
            "rope_kv_write_acc_kv8_bf16",
            "add_rmsnorm_fp8_peer_k1_bf16",
            "add_rmsnorm_fp8_peer_k2_bf16",
            "add_rmsnorm_fp8_peer_k4_bf16",
            "add_rmsnorm_fp8_peer_k8_bf16",
            "silu_mul_fp8_smem_bf16",
        ],
    ),
    ("sampling", &["sample_tokens", "take_previous_tokens"]),
    ("all_reduce", &["all_reduce_epoch_advance"]),
    ("kv_copy", &["kv_copy_blocks"]),
    ("gemm_fp8", &["scale_rows_cols_bf16"]),
    ("flash_attention", FLASH_ATTENTION),
    ("flash_prefill_wgmma", FLASH_PREFILL_WGMMA),
    ("flash_decode", FLASH_DECODE),
];

/// The tensor-core attention, one kernel per head_dim (see `Ops::flash_attention`; `_hilo`: P as
/// BF16 hi + lo; `_f16p`: P and V as F16; `_kv8`: FP8 KV pools).
pub const FLASH_ATTENTION: &[&str] = &[
    "flash_attention_hd16",
    "flash_attention_hd32",
    "flash_attention_hd48",
    "flash_attention_hd64",
    "flash_attention_hd80",
    "flash_attention_hd96",
    "flash_attention_hd112",
    "flash_attention_hd128",
    "flash_attention_hilo_hd16",
    "flash_attention_hilo_hd32",
    "flash_attention_hilo_hd48",
    "flash_attention_hilo_hd64",
    "flash_attention_hilo_hd80",
    "flash_attention_hilo_hd96",
    "flash_attention_hilo_hd112",
    "flash_attention_hilo_hd128",
    "flash_attention_f16p_hd16",
    "flash_attention_f16p_hd32",
    "flash_attention_f16p_hd48",
    "flash_attention_f16p_hd64",
    "flash_attention_f16p_hd80",
    "flash_attention_f16p_hd96",
    "flash_attention_f16p_hd112",
    "flash_attention_f16p_hd128",
    "flash_attention_hilo_kv8_hd16",
    "flash_attention_hilo_kv8_hd32",
    "flash_attention_hilo_kv8_hd48",
    "flash_attention_hilo_kv8_hd64",
    "flash_attention_hilo_kv8_hd80",
    "flash_attention_hilo_kv8_hd96",
    "flash_attention_hilo_kv8_hd112",
    "flash_attention_hilo_kv8_hd128",
    "flash_attention_single_hd128",
    "flash_attention_single_kv8_hd128",
];

/// The wgmma prefill attention (`Ops::flash_prefill_wgmma`; `_bf16p`: P rounded to BF16;
/// `_kv8`: FP8 pools; `_ws`: with a producer warpgroup, TMA-loaded items only; `_nopp`: without
/// the consumers' ping-pong).
pub const FLASH_PREFILL_WGMMA: &[&str] = &[
    "flash_prefill_wgmma_hd128",
    "flash_prefill_wgmma_bf16p_hd128",
    "flash_prefill_wgmma_kv8_hd128",
    "flash_prefill_ws_hd128",
    "flash_prefill_ws_bf16p_hd128",
    "flash_prefill_ws_kv8_hd128",
    "flash_prefill_ws_nopp_hd128",
    "flash_prefill_ws_nopp_bf16p_hd128",
    "flash_prefill_ws_nopp_kv8_hd128",
];

/// The decode-only tensor-core attention (`Ops::flash_decode`), one kernel per head_dim.
pub const FLASH_DECODE: &[&str] = &[
    "flash_decode_hd16",
    "flash_decode_hd32",
    "flash_decode_hd48",
    "flash_decode_hd64",
    "flash_decode_hd80",
    "flash_decode_hd96",
    "flash_decode_hd112",
    "flash_decode_hd128",
    "flash_decode_kv8_hd16",
    "flash_decode_kv8_hd32",
    "flash_decode_kv8_hd48",
    "flash_decode_kv8_hd64",
    "flash_decode_kv8_hd80",
    "flash_decode_kv8_hd96",
    "flash_decode_kv8_hd112",
    "flash_decode_kv8_hd128",
];

/// Every kernel name of a module.
pub fn kernel_names(module: &str) -> Vec<String> {
    let mut names = vec![];
    for (m, list) in TYPED {
        if *m == module {
            for n in *list {
                names.push(format!("{n}_bf16"));
                names.push(format!("{n}_f32"));
            }
        }
    }
    for (m, list) in PLAIN {
        if *m == module {
            names.extend(list.iter().map(|n| n.to_string()));
        }
    }
    if module == "gemm_fp8" {
        names.extend(super::fp8_stream::KERNELS.iter().map(|n| n.to_string()));
    }
    names
}

const ARCH: &str = "--gpu-architecture=sm_90a";
const OPTIONS: &[&str] = &[ARCH, "--std=c++17", "-lineinfo", "--fmad=true"];

/// Is NVRTC loadable (libnvrtc.so or libnvrtc.so.13 on the library path)? Never panics.
pub fn nvrtc_available() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { nvrtc_sys::is_culib_present() }
}

pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor).result() }
        .map_err(|e| anyhow!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

fn full_source(src: &str) -> String {
    format!("{COMMON}\n{src}")
}

/// Compiles one module's source to a cubin for sm_90a (no GPU needed).
pub fn compile_cubin(name: &str, src: &str) -> Result<Vec<u8>> {
    if !nvrtc_available() {
        bail!("NVRTC (libnvrtc.so / libnvrtc.so.13) is not on the library path");
    }
    let source = CString::new(full_source(src))?;
    let cname = CString::new(format!("{name}.cu"))?;
    let prog = nvrtc::create_program(&source, Some(&cname))
        .map_err(|e| anyhow!("nvrtcCreateProgram: {e:?}"))?;
    // SAFETY: `prog` is live until destroyed at the end of this function.
    let out = unsafe {
        let compiled = nvrtc::compile_program(prog, OPTIONS);
        let log = nvrtc::get_program_log(prog).unwrap_or_default();
        let log: String = log
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        match compiled {
            Err(e) => Err(anyhow!(
                "kernel module `{name}` failed to compile ({e:?}):\n{log}"
            )),
            Ok(()) => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| anyhow!("nvrtcGetCUBINSize: {e:?}"))?;
                let mut cubin = vec![0u8; size];
                nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _)
                    .result()
                    .map_err(|e| anyhow!("nvrtcGetCUBIN: {e:?}"))?;
                Ok(cubin)
            }
        }
    };
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = nvrtc::destroy_program(prog);
    }
    out
}

/// Where compiled kernels (and other per-machine choices, see `gemm_tune`) are cached.
pub(crate) fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("tandem").join("kernels")
}

/// Where a module's cubin is cached: keyed by its source, the compile options and NVRTC's version.
fn cache_path(name: &str, src: &str) -> Result<PathBuf> {
    let (major, minor) = nvrtc_version()?;
    let key = format!(
        "{}\0{}\0{major}.{minor}",
        full_source(src),
        OPTIONS.join(" ")
    );
    let hash = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
    Ok(cache_dir().join(format!("{name}-{hash:016x}.cubin")))
}

/// The cubin of a module, from the disk cache or freshly compiled (and then cached).
pub fn cubin_cached(name: &str, src: &str) -> Result<Vec<u8>> {
    let path = cache_path(name, src)?;
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            return Ok(bytes);
        }
    }
    let cubin = compile_cubin(name, src)?;
    // A failed cache write only costs a recompile next time.
    if std::fs::create_dir_all(path.parent().unwrap()).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(cubin)
}

/// Compiles every module (the CI check; needs NVRTC, not a GPU). Returns (module, cubin).
pub fn check_all() -> Result<Vec<(&'static str, Vec<u8>)>> {
    MODULES
        .iter()
        .map(|(name, src)| Ok((*name, compile_cubin(name, src)?)))
        .collect()
}

/// Every module's cubin into the cache folder (compiled unless already there), and the cubins
/// of earlier sources of these modules out of it; other files (autotuning choices) stay. With
/// NVRTC 13.0 here the cache serves a GPU machine with the same NVRTC version, which then compiles
/// nothing (scripts/make_dist.sh). Returns (module, cubin).
pub fn fill_cache() -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut out = Vec::with_capacity(MODULES.len());
    for (name, src) in MODULES {
        let cubin = cubin_cached(name, src)?;
        let keep = cache_path(name, src)?;
        let stale = std::fs::read_dir(cache_dir())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p != &keep && is_cubin_of(p, name));
        for path in stale {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
        out.push((*name, cubin));
    }
    Ok(out)
}

/// Whether `path` is named `<module>-<16 hex digits>.cubin`.
fn is_cubin_of(path: &std::path::Path, module: &str) -> bool {
    let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
        return false;
    };
    file.strip_prefix(module)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.strip_suffix(".cubin"))
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Every kernel function, loaded into the current context.
pub struct Kernels {
    modules: Vec<sys::CUmodule>,
    functions: HashMap<String, Kernel>,
}

/// A loaded kernel and whether it may be launched with programmatic dependent launch.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    pub f: sys::CUfunction,
    pub pdl: bool,
}

/// Modules whose every kernel calls `pdl_enter()` (kernels/common.cuh) before it touches activations,
/// so it may start while the previous kernel of its stream still runs. The others (prefill attention,
/// KV copies) launch plainly.
pub const PDL_MODULES: &[&str] = &[
    "elementwise",
    "attention",
    "flash_decode",
    "sampling",
    "gemm_fp8",
    "all_reduce",
];

/// Programmatic dependent launch for the [`PDL_MODULES`] kernels: on unless `TANDEM_PDL=0`.
pub fn pdl_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TANDEM_PDL").map_or(true, |v| v != "0"))
}

/// Kernels that need more than 48 KiB of dynamic shared memory, and how much they may use.
/// Most dynamic shared memory of silu_mul_fp8_smem_bf16 (a row's BF16 products): 3 rows an SM.
pub const SILU_SMEM_MAX_BYTES: usize = 72 * 1024;

/// Shared memory of the wgmma prefill attention: `FW_STAGES` (5) stages of a 64-key K tile and V
/// tile of head_dim 128, BF16, their TMA mbarriers, and 1 KB to align the tiles to the swizzle
/// (flash_prefill_wgmma.cu).
pub const WGMMA_SHARED_BYTES: usize = 5 * 2 * 64 * 128 * 2 + 64 + 1024;

/// Shared memory of the `_ws` kernels (flash_prefill_ws.cu), the larger of BF16 pools' (5 stages
/// of a K and V tile) and FP8 pools' (4 F16 stages and 4 stages of codes, 16 KB each), their
/// mbarriers (at most 24 of 8 bytes) and 1 KB to align the tiles.
pub const WS_SHARED_BYTES: usize = 4 * 2 * 64 * 128 * 2 + 4 * 2 * 64 * 128 + 24 * 8 + 1024;

fn big_shared() -> impl Iterator<Item = (String, i32)> {
    let paged = ["paged_attention_bf16", "paged_attention_f32"].map(|n| (n, 96 * 1024));
    let flash = FLASH_ATTENTION.iter().map(|&n| (n, 112 * 1024));
    let decode = FLASH_DECODE.iter().map(|&n| (n, 96 * 1024));
    let wgmma = FLASH_PREFILL_WGMMA.iter().map(|&n| {
        let bytes = if n.contains("_ws_") {
            WS_SHARED_BYTES
        } else {
            WGMMA_SHARED_BYTES
        };
        (n, bytes as i32)
    });
    let silu = [("silu_mul_fp8_smem_bf16", SILU_SMEM_MAX_BYTES as i32)];
    let stream_gemm = super::fp8_stream::KERNELS
        .iter()
        .map(|&n| (n.to_string(), super::fp8_stream::SHARED_BYTES as i32));
    paged
        .into_iter()
        .chain(flash)
        .chain(decode)
        .chain(wgmma)
        .chain(silu)
        .map(|(n, bytes)| (n.to_string(), bytes))
        .chain(stream_gemm)
}

impl Kernels {
    pub fn load() -> Result<Self> {
        let mut modules = Vec::new();
        let mut functions = HashMap::new();
        for (name, src) in MODULES {
            let cubin = cubin_cached(name, src)?;
            // SAFETY: a cubin NVRTC produced; cuModuleLoadData copies it.
            let module = unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) }
                .with_context(|| format!("cannot load kernel module `{name}`"))?;
            modules.push(module);
            let pdl = pdl_enabled() && PDL_MODULES.contains(name);
            for fname in kernel_names(name) {
                // SAFETY: the module is loaded; a missing name is an error, not UB.
                let f =
                    unsafe { result::module::get_function(module, CString::new(fname.as_str())?) }
                        .with_context(|| {
                            format!("kernel `{fname}` not found in module `{name}`")
                        })?;
                functions.insert(fname, Kernel { f, pdl });
            }
        }
        for (fname, bytes) in big_shared() {
            let f = functions[&fname].f;
            // SAFETY: a valid function handle.
            unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )?;
                // All of the unified L1/shared memory as shared, so several blocks fit per SM.
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    100,
                )?;
            }
        }
        Ok(Self { modules, functions })
    }

    pub fn get(&self, name: &str) -> Result<Kernel> {
        self.functions
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("no kernel named `{name}`"))
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        for m in &self.modules {
            // SAFETY: loaded in `load`, unloaded once.
            unsafe {
                let _ = result::module::unload(*m);
            }
        }
    }
}

// Function handles are plain driver handles, valid in their context from any thread.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

/// One kernel argument. Each is passed from a slot of its own (little endian: 4-byte values are
/// read from the low half of the first word).
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U64(u64),
    F32(f32),
    /// A `CUtensorMap` by value (a `const __grid_constant__` parameter).
    TensorMap([u64; 16]),
}

/// Launches `kernel` on `stream`, checking the launch's return code.
// CUDA handles are opaque to Rust: the driver checks them, nothing here dereferences them.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn launch(
    kernel: Kernel,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    stream: sys::CUstream,
    args: &[Arg],
) -> Result<()> {
    let word = |w: u64| {
        let mut slot = [0u64; 16];
        slot[0] = w;
        slot
    };
    let mut slots: Vec<[u64; 16]> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(p) | Arg::U64(p) => word(p),
            Arg::I32(v) => word(v as u32 as u64),
            Arg::F32(v) => word(v.to_bits() as u64),
            Arg::TensorMap(map) => map,
        })
        .collect();
    let mut params: Vec<*mut c_void> = slots
        .iter_mut()
        .map(|s| s.as_mut_ptr() as *mut c_void)
        .collect();
    if !kernel.pdl {
        // SAFETY: the kernel's parameter list matches `args` (the ops wrappers are the only callers);
        // the driver copies the parameter values at launch.
        return unsafe {
            result::launch_kernel(kernel.f, grid, block, shared_bytes, stream, &mut params)
        }
        .map_err(|e| anyhow!("kernel launch failed: {e}"));
    }
    // SAFETY: an all-zero attribute is a valid C value; id and value are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: shared_bytes,
        hStream: stream,
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: as above; `config` and `attr` outlive the call, which copies them.
    unsafe {
        sys::cuLaunchKernelEx(&config, kernel.f, params.as_mut_ptr(), std::ptr::null_mut()).result()
    }
    .map_err(|e| anyhow!("kernel launch (programmatic serialization) failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed kernel is defined in its module's source (directly or by an instantiation macro).
    #[test]
    fn listed_kernels_exist_in_sources() {
        for (module, src) in MODULES {
            for name in kernel_names(module) {
                let base = name.trim_end_matches("_bf16").trim_end_matches("_f32");
                let direct = src.contains(&format!(" {name}("));
                // GEMM_FP8_STREAM(MT, type, suffix) instantiations.
                let stream_macro = name.strip_prefix("gemm_fp8_stream_t").is_some_and(|rest| {
                    let (mt, suffix) = rest.split_once('_').unwrap();
                    src.contains(&format!("GEMM_FP8_STREAM({mt}, "))
                        && src.contains(&format!(", {suffix})"))
                });
                let templated = src.contains(&format!(" {base}_##SUFFIX("));
                // <name>_k##K##_##SUFFIX instantiated per K by FUSED_*_K(A, SUFFIX, K) macros.
                let per_k = base.rsplit_once("_k").is_some_and(|(prefix, k)| {
                    k.parse::<u32>().is_ok()
                        && src.contains(&format!(" {prefix}_k##K##_##SUFFIX("))
                        && src.contains(&format!("_K(A, SUFFIX, {k})"))
                });
                // <name>_k##K##_bf16 instantiated per K by FUSED_*_{ACC,PEER}_K(K) macros.
                let per_k_bf16 = base.rsplit_once("_k").is_some_and(|(prefix, k)| {
                    let macro_call = format!("_K({k})\n");
                    k.parse::<u32>().is_ok()
                        && src.contains(&format!(" {prefix}_k##K##_bf16("))
                        && src.contains(&macro_call)
                });
                // flash_prefill_ws_<rest> instantiated by WS_KERNEL(<rest>, ..).
                let ws_macro = name
                    .strip_prefix("flash_prefill_ws_")
                    .is_some_and(|rest| src.contains(&format!("WS_KERNEL({rest}, ")));
                assert!(
                    direct || templated || stream_macro || per_k || per_k_bf16 || ws_macro,
                    "{name} not found in {module}.cu"
                );
            }
        }
        assert!(kernel_names("attention").contains(&"paged_attention_f32".to_string()));
    }

    /// Every kernel a source names outright (`extern "C" __global__ [bounds] void name(`) is listed,
    /// so `Kernels::load` fetches it.
    #[test]
    fn every_named_kernel_in_the_sources_is_listed() {
        for (module, src) in MODULES {
            let listed = kernel_names(module);
            for (at, _) in src.match_indices("extern \"C\" __global__") {
                // Past `void` and attributes such as `__launch_bounds__(..)`: the name.
                let mut rest = src[at + "extern \"C\" __global__".len()..].trim_start();
                loop {
                    if let Some(after) = rest.strip_prefix("void") {
                        rest = after.trim_start();
                    } else if rest.starts_with("__") && rest.find('(') < rest.find(' ') {
                        rest = rest[rest.find(')').unwrap() + 1..].trim_start();
                    } else {
                        break;
                    }
                }
                let name = &rest[..rest.find('(').unwrap()];
                if name.contains("##") {
                    continue; // macro instantiations: checked the other way round above
                }
                assert!(
                    listed.iter().any(|l| l == name),
                    "{name} in {module}.cu is not listed in kernels.rs"
                );
            }
        }
    }

    /// A kernel launched with programmatic serialization must wait for the previous kernel before it
    /// touches activations: every kernel of a PDL module starts with `pdl_enter()`, except the
    /// streaming GEMM's wrappers, whose template has its producer load the first weights before
    /// calling it, and its consumers call it before reading anything.
    #[test]
    fn every_kernel_of_a_pdl_module_waits_for_its_predecessor() {
        for (module, src) in MODULES.iter().filter(|(m, _)| PDL_MODULES.contains(m)) {
            let mut kernels = 0;
            for (at, _) in src.match_indices("__global__") {
                let body = &src[at + src[at..].find('{').unwrap() + 1..];
                let first = body.trim_start_matches([' ', '\\', '\n']);
                assert!(
                    first.starts_with("pdl_enter();") || first.starts_with("gemm_fp8_stream_t<"),
                    "a kernel of {module}.cu does not start with pdl_enter(): {}",
                    &src[at..at + 120]
                );
                kernels += 1;
            }
            assert!(kernels > 0, "{module}.cu has no kernels");
        }
        let gemm = MODULES.iter().find(|(m, _)| *m == "gemm_fp8").unwrap().1;
        let template = &gemm[gemm.find("__device__ void gemm_fp8_stream_t(").unwrap()..];
        let producer = &template[template.find("if (warp == TG_CONSUMERS)").unwrap()..];
        let producer = &producer[..producer.find("return;").unwrap()];
        let waits = producer.find("pdl_enter();").unwrap();
        assert!(producer[..waits].contains("load_w(i)") && producer[waits..].contains("load_x(i)"));
        let consumers = &template[template.find("return;").unwrap()..];
        assert!(consumers.find("pdl_enter();").unwrap() < consumers.find("mbar_wait").unwrap());
    }
}
