//! Every CUDA kernel compiles with NVRTC 13.0 for sm_90a, without a GPU.
//!
//! NVRTC comes from the `nvidia-cuda-nvrtc` pip package in the repo's `.venv` (installed by
//! `.ci/run`). The dynamic loader reads LD_LIBRARY_PATH only at process start, so the check runs
//! in a child `tandem kernels --check` with the package's lib folder on the path.

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
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["kernels", "--check"])
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
}
