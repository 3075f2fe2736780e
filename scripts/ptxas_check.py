#!/usr/bin/env python3
"""Compiles kernel sources with NVRTC (the options kernels.rs uses, to PTX) and runs `ptxas -v` on
the PTX, to see what NVRTC's log does not show: registers, spills, and wgmma serialization warnings
(C7510..C7520). No GPU needed.

    LD_LIBRARY_PATH=<.../nvidia/cu13/lib> PTXAS=<ptxas> \\
      scripts/ptxas_check.py out.ptx kernels/common.cuh kernels/flash_common.cuh kernels/flash_prefill_wgmma.cu

NVRTC comes from the pip package nvidia-cuda-nvrtc (cu13); any ptxas that knows sm_90a works (the
PTX version line is lowered to PTXAS_PTX_VERSION, 8.7 by default, for a CUDA 12.x ptxas).
"""
import ctypes
import glob
import os
import re
import subprocess
import sys

lib_path = os.environ.get("NVRTC_LIB") or (glob.glob(
    os.path.join(os.path.dirname(__file__), "..", ".venv/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13")) or [None])[0]
if not lib_path:
    sys.exit("libnvrtc.so.13 not found: set NVRTC_LIB")
nvrtc = ctypes.CDLL(lib_path)
source = "".join(open(f).read() for f in sys.argv[2:]).encode()
prog = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, b"module.cu", 0, None, None) == 0
opts = [b"--gpu-architecture=compute_90a", b"--std=c++17", b"-lineinfo", b"--fmad=true"]
rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(prog, log)
print(log.value.decode(), end="")
if rc != 0:
    sys.exit("NVRTC failed")
nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
ptx = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetPTX(prog, ptx)
version = os.environ.get("PTXAS_PTX_VERSION", "8.7")
with open(sys.argv[1], "w") as f:
    f.write(re.sub(r"\.version \d+\.\d+", f".version {version}", ptx.value.decode()))
ptxas = os.environ.get("PTXAS", "ptxas")
out = subprocess.run([ptxas, "-arch=sm_90a", "-v", sys.argv[1], "-o", sys.argv[1] + ".cubin"],
                     capture_output=True, text=True)
print(out.stdout + out.stderr, end="")
sys.exit(out.returncode)
