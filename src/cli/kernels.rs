//! `tandem kernels --check`: compiles every CUDA kernel module with NVRTC for sm_90a (no GPU
//! needed). CI runs it through tests/kernels_compile.rs with NVRTC from the pip package.

use crate::backend::cuda::kernels;
use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Compile every module and report its cubin size (exit code 1 on any failure).
    #[arg(long)]
    pub check: bool,
    /// Also write each module's cubin into this folder (for cuobjdump / nvdisasm).
    #[arg(long)]
    pub dump: Option<std::path::PathBuf>,
    /// Compile through the kernel cache (`$TANDEM_KERNEL_CACHE`): modules already there are not
    /// compiled again, the cubins of their earlier sources are removed. A cache filled here goes
    /// to the GPU machine with the dist (scripts/make_dist.sh).
    #[arg(long)]
    pub fill_cache: bool,
}

pub fn run(args: Args) -> Result<()> {
    if !args.check {
        bail!("nothing to do: pass --check");
    }
    if !kernels::nvrtc_available() {
        bail!("NVRTC not found: put the folder holding libnvrtc.so.13 on LD_LIBRARY_PATH");
    }
    let (major, minor) = kernels::nvrtc_version()?;
    println!("nvrtc {major}.{minor}");
    if let Some(dir) = &args.dump {
        std::fs::create_dir_all(dir)?;
    }
    let cubins = if args.fill_cache {
        kernels::fill_cache()?
    } else {
        kernels::check_all()?
    };
    for (name, cubin) in cubins {
        println!("ok {name} ({} bytes of sm_90a cubin)", cubin.len());
        if let Some(dir) = &args.dump {
            std::fs::write(dir.join(format!("{name}.cubin")), &cubin)?;
        }
    }
    Ok(())
}
