#!/usr/bin/env bash
# Builds the release binary and the GPU test executables here (no GPU needed) and gathers what
# scripts/gpu_check.sh needs into a folder to carry to the GPU machine:
#   scripts/make_dist.sh <dist folder> [fixtures folder] [models folder]
# KERNEL_CACHE=<kcache.tgz> (a cache gpu_check.sh saved on an earlier run) goes along as
# kcache.tgz: the GPU machine then compiles only the kernel modules that changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:?usage: make_dist.sh <dist folder>}
FIX=${2:-tests/fixtures}
MODELS=${3:-models}
TESTS=${TESTS:-"cuda_kernels cuda_attention cuda_gemm cuda_backend cuda_fixtures cuda_kv_transfer cuda_tp cuda_all_reduce"}
cargo build --release --bin tandem
args=(); for t in $TESTS; do args+=(--test "$t"); done
exes=$(cargo test --release --no-run "${args[@]}" --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep -v null)
bin=$(cargo build --release --bin tandem --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep -v null)
kvbench=$(cargo build --release --example kv_transfer_bench --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep -v null)
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
cp scripts/gpu_check.sh scripts/gpu_compare.sh "$D/"
if [ -n "${KERNEL_CACHE:-}" ]; then cp "$KERNEL_CACHE" "$D/kcache.tgz"; fi
du -sh "$D"
