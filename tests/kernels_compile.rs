//! Every CUDA kernel compiles with NVRTC 13.0 for sm_90a, without a GPU.
//!
//! NVRTC comes from the `nvidia-cuda-nvrtc` pip package in the repo's `.venv` (installed by
//! `.ci/run`). The dynamic loader reads LD_LIBRARY_PATH only at process start, so the check runs
//! in a child `tandem kernels --check --fill-cache` with the package's lib folder on the path.

use std::path::{Path, PathBuf};
use std::process::Command;

fn nvrtc_lib_dir() -> Option<PathBuf> {
    let venv_lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let entries = std::fs::read_dir(&venv_lib).ok()?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/cu13/lib"))
        .find(|d| d.join("libnvrtc.so.13").exists())
}

#[test]
fn every_kernel_compiles_for_sm90a() {
    let Some(lib) = nvrtc_lib_dir() else {
        let msg = "NVRTC not found: expected .venv/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13 \
                   (pip install nvidia-cuda-nvrtc==13.0.88 into .venv; .ci/run does)";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("skipping: {msg}");
        return;
    };
    // Through the cache (--fill-cache): a stale cubin of a module goes, other files stay.
    let cache = tempfile::tempdir().unwrap();
    let stale = cache.path().join("elementwise-0123456789abcdef.cubin");
    let tuning = cache.path().join("gemm_tune_choices.txt");
    std::fs::write(&stale, b"old").unwrap();
    std::fs::write(&tuning, b"kept").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["kernels", "--check", "--fill-cache"])
        .env("LD_LIBRARY_PATH", &lib)
        .env("TANDEM_KERNEL_CACHE", cache.path())
        .output()
        .expect("cannot run the tandem binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kernel compile failed:\n{stdout}\n{stderr}"
    );
    for module in ["elementwise", "attention", "sampling"] {
        assert!(
            stdout.contains(&format!("ok {module} (")),
            "module {module} not reported:\n{stdout}"
        );
    }
    let files: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!stale.exists(), "the stale cubin stayed: {files:?}");
    assert!(tuning.exists(), "a file other than a cubin went: {files:?}");
    for module in ["elementwise", "attention", "flash_prefill_wgmma"] {
        let cubins = files
            .iter()
            .filter(|f| f.starts_with(&format!("{module}-")) && f.ends_with(".cubin"))
            .count();
        assert_eq!(cubins, 1, "{module}'s cubins in the cache: {files:?}");
    }
}
