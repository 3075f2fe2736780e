#!/usr/bin/env bash
# Builds the release binary and the GPU test executables here (no GPU needed) and gathers what
# scripts/gpu_check.sh needs into a folder to carry to the GPU machine:
#   scripts/make_dist.sh <dist folder> [fixtures folder] [models folder]
# KERNEL_CACHE=<kcache.tgz> (a cache gpu_check.sh saved on an earlier run: cubins and autotuning
# choices) goes along as kcache.tgz, with every kernel module compiled here (NVRTC 13.0 from .venv)
# added: the GPU machine then compiles nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:?usage: make_dist.sh <dist folder>}
FIX=${2:-tests/fixtures}
MODELS=${3:-models}
TESTS=${TESTS:-"cuda_kernels cuda_attention cuda_gemm cuda_backend cuda_fixtures cuda_kv_transfer cuda_tp cuda_all_reduce"}
# The binary is always built with the example: an example (like a test) brings in the
# dev-dependencies' features, and building the binary alone would compile its dependencies a
# second time with other features (~5 minutes on 2 cores).
targets=(--bin tandem --example kv_transfer_bench)
cargo build --release "${targets[@]}"
args=(); for t in $TESTS; do args+=(--test "$t"); done
exes=$(cargo test --release --no-run "${args[@]}" --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep -v null)
built=$(cargo build --release "${targets[@]}" --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep -v null)
bin=$(grep '/tandem$' <<< "$built")
kvbench=$(grep '/kv_transfer_bench$' <<< "$built")
rm -rf "$D"; mkdir -p "$D/tests" "$D/fixtures" "$D/models"
cp "$bin" "$D/tandem"
cp "$kvbench" "$D/kv_transfer_bench"
for e in $exes; do
  n=$(basename "$e" | sed 's/-[0-9a-f]*$//')
  case " $TESTS " in *" $n "*) cp "$e" "$D/tests/$n" ;; esac
done
strip "$D/tandem" "$D/kv_transfer_bench" "$D"/tests/*
cp -r "$FIX"/llama-bf16 "$FIX"/llama-fp8 "$D/fixtures/"
cp -r "$MODELS"/. "$D/models/"
cp scripts/gpu_check.sh scripts/gpu_compare.sh scripts/ncu_kernels.sh "$D/"
# The kernel cache: KERNEL_CACHE's (autotuning choices, cubins), with every module compiled here
# by NVRTC 13.0 from .venv where it is installed, so the GPU machine compiles nothing
# (KERNEL_FILL=0: carry KERNEL_CACHE as it is, the GPU machine compiling what changed).
kc=$(mktemp -d)
if [ -n "${KERNEL_CACHE:-}" ]; then tar xzf "$KERNEL_CACHE" -C "$kc"; fi
nvrtc=$(ls -d .venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n 1 || true)
if [ -n "$nvrtc" ] && [ "${KERNEL_FILL:-1}" != 0 ]; then
  LD_LIBRARY_PATH="$nvrtc" TANDEM_KERNEL_CACHE="$kc/tandem-kernels" "$D/tandem" kernels --check --fill-cache >/dev/null
fi
if [ -d "$kc/tandem-kernels" ]; then tar czf "$D/kcache.tgz" -C "$kc" tandem-kernels; fi
rm -rf "$kc"
du -sh "$D"
