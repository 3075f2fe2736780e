#!/usr/bin/env bash
# The FP8 GEMM helper's device run: kernel tests, GEMM microbenchmark, backend tests, and a
# bench-step of the 70B dummy with profiles. Run from the repo root of the device copy:
#   bash dist-gemv/gpu_gemv.sh            (logs and JSON under $OUT)
set -uo pipefail
D=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/gpu_gemv}
mkdir -p "$OUT"
source <(sed -n "/^export NCCL/,/^export RUST/p" "$D/gpu_check.sh")
STAGES=${STAGES:-"kernels gemm backend step"}
t() { echo "--- $1 ($(date +%T))"; }
case " $STAGES " in *" kernels "*)
  t kernels
  timeout 90 "$D/tests/cuda_gemm" --test-threads=1 --nocapture > "$OUT/cuda_gemm.log" 2>&1
  echo "cuda_gemm rc $?"
  grep -E "^test |test result|panicked|stream|unscaled|fp8 gemm" "$OUT/cuda_gemm.log" | grep -v " ok$" | head -70 ;;
esac
case " $STAGES " in *" gemm "*)
  t bench-gemm
  timeout 60 "$D/tandem" bench-gemm ${GEMM_ARGS:-} > "$OUT/bench_gemm.json" 2> "$OUT/bench_gemm.log"
  echo "bench-gemm rc $?"
  grep -E "best|rror" "$OUT/bench_gemm.log" | sed 's/  */ /g' ;;
esac
case " $STAGES " in *" backend "*)
  for x in cuda_backend cuda_fixtures; do
    t $x
    timeout 60 "$D/tests/$x" --test-threads=1 > "$OUT/$x.log" 2>&1
    echo "$x rc $?"; grep -E "test result|panicked|FAILED" "$OUT/$x.log" | head -8
  done
  # Does a batch-size path switch (streaming kernel at M = 1, cuBLASLt above) keep batches consistent?
  t "cuda_backend stream at M=1"
  TANDEM_FP8_STREAM_MAX_M=1 timeout 60 "$D/tests/cuda_backend" --test-threads=1 --nocapture \
    > "$OUT/cuda_backend_stream1.log" 2>&1
  echo "cuda_backend (stream at M=1) rc $?"; grep -E "test result|panicked|rel " "$OUT/cuda_backend_stream1.log" | head -30 ;;
esac
case " $STAGES " in *" step "*)
  # The default policy, then the outer-vector cuBLASLt product alone (the previous path), then the
  # streaming kernel at M = 1 (decode only for the comparisons: a 9000-token prompt is skipped).
  for v in default:prefill "outer:TANDEM_FP8_UNSCALED_MAX_M=0" "stream1:TANDEM_FP8_STREAM_MAX_M=1"; do
    name=${v%%:*}; envs=${v#*:}; [ "$envs" = prefill ] && envs="" plen=3000 || plen=9000
    t "bench-step $name"
    env $envs timeout 100 "$D/tandem" bench-step --model llama-3.3-70b-fp8-dynamic --load-format dummy \
      --batch 1,32 --context 3000 --prompt-len $plen --prefill-batch 1 --gpu-memory-utilization 0.95 \
      --iters 10 > "$OUT/bench_step_$name.json" 2> "$OUT/bench_step_$name.log"
    echo "bench-step $name rc $?"
    grep -E "decode|prefill|profile|rror" "$OUT/bench_step_$name.log" | cut -c1-700
  done ;;
esac
t done
