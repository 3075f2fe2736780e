#!/usr/bin/env bash
# Runs every GPU test and benchmark of the CUDA backend on the GPU machine, from binaries built on
# a CPU machine and carried in a folder (default dist/): the `tandem` binary, test executables in
# tests/, fixtures/ and models/ presets. Prints a short table last; full logs go to $OUT.
#
#   bash dist/gpu_check.sh              # everything
#   STAGES="kernels tests" bash dist/gpu_check.sh
#   SERVE_EXTRA="--enforce-eager" STAGES=serve bash dist/gpu_check.sh   # extra serve flags (A/B runs)
#   STAGES="serve serve_sync" bash dist/gpu_check.sh   # served with and without async scheduling
#   BENCH_EXTRA="--compare-split-blocks-per-sm 2" STAGES=bench bash dist/gpu_check.sh   # extra bench-step flags (A/B runs)
#
# Library paths per shared/docs/device.md (never the CUDA stubs folder); NVLink multicast off.
set -uo pipefail
D=${DIST:-$(cd "$(dirname "$0")" && pwd)}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
STAGES=${STAGES:-"kernels tests generate bench bench_kv8 kvgpu serve tp tp4"}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/nccl
NCCL_LIB=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2
[ -e "$NCCL_LIB" ] && ln -sf "$NCCL_LIB" /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/cuda/lib64:/tmp/nccl
export TANDEM_KERNEL_CACHE=/tmp/tandem-kernels TANDEM_FIXTURES="$D/fixtures" TANDEM_MODELS_DIR="$D/models"
# Cubins of an earlier run (make_dist.sh KERNEL_CACHE=...; keyed by source, so stale ones are unused).
if [ -f "$D/kcache.tgz" ] && [ ! -d "$TANDEM_KERNEL_CACHE" ]; then tar xzf "$D/kcache.tgz" -C /tmp; fi
export RUST_BACKTRACE=1
LOG="$OUT/gpu_check.log"
: > "$LOG"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee -a "$LOG"

ROWS=()
step() { # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s%N)
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" > "$OUT/step.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  cat "$OUT/step.log" >> "$LOG"
  tail -n 60 "$OUT/step.log"
  local summary=$(grep -E "^test result:" "$OUT/step.log" | tail -1 | sed 's/test result: //; s/; finished.*//')
  [ $rc = 124 ] && echo "TIMED OUT after ${limit}s" | tee -a "$LOG"
  ROWS+=("$(printf '%-34s %-5s %6d.%01ds  %s' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((ms / 1000)) $((ms % 1000 / 100)) "$summary")")
}

case " $STAGES " in *" kernels "*)
  step "kernels --check (nvrtc sm_90a)" 180 "$D/tandem" kernels --check ;;
esac
case " $STAGES " in *" tests "*)
  for t in "$D"/tests/*; do
    [ -x "$t" ] || continue
    [ "$(basename "$t")" = cuda_tp ] && continue # the tp stage runs it
    step "$(basename "$t")" 180 "$t" --test-threads=1 --nocapture
  done ;;
esac
case " $STAGES " in *" fixtures_f16p "*)
  # The fixtures and model tests with prefill attention taking P and V as F16 (TANDEM_FLASH_PREFILL=f16).
  # cuda_backend's decode-vs-fresh-prefill check is expected to exceed its 3e-2 bound on the FP8 model
  # (measured 3.1e-2 at 6e614b0): why F16 is not the default.
  step "cuda_fixtures, P as F16" 180 env TANDEM_FLASH_PREFILL=f16 "$D/tests/cuda_fixtures" --test-threads=1 --nocapture
  step "cuda_backend, P as F16" 180 env TANDEM_FLASH_PREFILL=f16 "$D/tests/cuda_backend" --test-threads=1 --nocapture ;;
esac
case " $STAGES " in *" generate "*)
  step "generate tiny-llama cuda" 120 "$D/tandem" generate --model tiny-llama --load-format dummy \
    --device cuda --prompt "The capital of France is" --max-tokens 16 --ignore-eos
  step "generate tiny-llama-fp8 cuda" 120 "$D/tandem" generate --model tiny-llama-fp8 --load-format dummy \
    --device cuda --prompt "Hello" --max-tokens 16 --ignore-eos
  step "generate 70B fp8 dummy cuda" 240 "$D/tandem" generate --model llama-3.3-70b-fp8-dynamic \
    --load-format dummy --device cuda --prompt "Tell me a story" --max-tokens 64 --ignore-eos \
    --gpu-memory-utilization 0.95 ;;
esac
case " $STAGES " in *" bench "*)
  step "bench-step 70B fp8 dummy" 300 "$D/tandem" bench-step --model llama-3.3-70b-fp8-dynamic \
    --load-format dummy --batch 1,32 --context 3000 --prompt-len 3000 --prefill-batch 1,2 \
    --gpu-memory-utilization 0.95 --iters "${ITERS:-20}" ${BENCH_EXTRA:-}
  sed -n '/^{/,/^}/p' "$OUT/step.log" > "$OUT/bench_step.json" ;;
esac

case " $STAGES " in *" bench_kv8 "*)
  # The same decode and prefill steps with an FP8 (e4m3) KV pool (--kv-cache-dtype fp8).
  step "bench-step 70B fp8 dummy, fp8 KV" 300 "$D/tandem" bench-step --model llama-3.3-70b-fp8-dynamic \
    --load-format dummy --batch 1,32 --context 3000 --prompt-len 3000 --prefill-batch 1 \
    --gpu-memory-utilization 0.95 --iters "${ITERS:-20}" --kv-cache-dtype fp8 ${BENCH_EXTRA:-}
  sed -n '/^{/,/^}/p' "$OUT/step.log" > "$OUT/bench_step_kv8.json" ;;
esac

case " $STAGES " in *" gemm "*)
  # Every FP8 product path on the 70B linear shapes at decode batch sizes, in isolation; GEMM_TP
  # lists tensor-parallel sizes whose per-rank shapes to time too (one GPU suffices).
  for tp in ${GEMM_TP:-1}; do
    step "bench-gemm 70B shapes, TP$tp rank" 300 "$D/tandem" bench-gemm --m ${GEMM_M:-1,8,32} \
      --iters 30 --tensor-parallel-size "$tp"
    grep '^{' "$OUT/step.log" > "$OUT/bench_gemm_tp$tp.json"
    ROWS+=("$(grep -E ' best ' "$OUT/step.log" | sed "s/^/  TP$tp /" | paste -sd '\n')")
  done ;;
esac

case " $STAGES " in *" ab "*)
  # The 1-GPU step under several environments, one process each (A/B of switches read at start-up):
  # (name:environment, optionally |extra bench-step flags)
  #   AB="base:TANDEM_PDL=0;pdl:TANDEM_PDL=1;split2:TANDEM_AB=1|--compare-split-blocks-per-sm 2" STAGES=ab bash dist/gpu_check.sh
  IFS=';' read -ra CASES <<< "${AB:-default:TANDEM_AB=1}"
  for c in "${CASES[@]}"; do
    name=${c%%:*}; rest=${c#*:}; envs=${rest%%|*}; flags=""
    [ "$rest" != "$envs" ] && flags=${rest#*|}
    step "bench-step ab $name" 300 env $envs "$D/tandem" bench-step --model llama-3.3-70b-fp8-dynamic \
      --load-format dummy --batch ${AB_BATCH:-1,32} --context 3000 --prompt-len 3000 --prefill-batch 1 \
      --gpu-memory-utilization 0.95 --iters "${ITERS:-20}" $flags
    sed -n '/^{/,/^}/p' "$OUT/step.log" > "$OUT/bench_step_ab_$name.json"
    ROWS+=("$(printf '  ab %-12s %s' "$name" "$(grep -E '"(decode_step_ms_batch[0-9]+_ctx3000[a-z0-9_]*|prefill_tokens_per_s_1x3000)"' \
      "$OUT/bench_step_ab_$name.json" | sed 's/_ctx3000//; s/decode_step_ms_//; s/prefill_tokens_per_s_1x3000/prefill/' | tr -d ' "\n')")")
  done ;;
esac

case " $STAGES " in *" kvgpu "*)
  # Same-node GPU KV transfer (kv::transfer::cuda): its tests, then the KV of a 3000-token prompt of
  # the 70B layout (1.0 GB) into scattered blocks, by peer copy, CUDA IPC, TP1 -> TP2, and TCP for
  # comparison; last, prefill + transfer with the copy after vs streamed layer by layer.
  [ -x "$D/tests/cuda_kv_transfer" ] && case " $STAGES " in *" tests "*) ;; *)
    step "cuda_kv_transfer" 120 "$D/tests/cuda_kv_transfer" --test-threads=1 --nocapture ;; esac
  NG=$(nvidia-smi -L 2>/dev/null | wc -l)
  DST1=$([ "$NG" -ge 2 ] && echo 1 || echo 0)
  kvb() { step "kv transfer $1" "$2" "$D/kv_transfer_bench" "${@:3}"; grep -h '^{' "$OUT/step.log" >> "$OUT/kv_transfer.json"; }
  : > "$OUT/kv_transfer.json"
  kvb "cuda-peer 0->$DST1" 60 --transport cuda-peer --dst-gpus $DST1 --iters 20
  kvb "cuda-peer 0->0 (same GPU)" 60 --transport cuda-peer --dst-gpus 0 --iters 20
  kvb "cuda-peer TP1->TP2 0->0,$DST1" 60 --transport cuda-peer --dst-gpus 0,$DST1 --iters 20
  kvb "cuda-ipc 0->$DST1" 60 --transport cuda-ipc --dst-gpus $DST1 --iters 20
  kvb "cuda-ipc TP1->TP2 0->0,$DST1" 60 --transport cuda-ipc --dst-gpus 0,$DST1 --iters 20
  if [ -n "${KV_FULL:-}" ]; then  # TCP and the layer-overlap run (slow; measured once, see docs/kv-transfer.md)
  kvb "tcp loopback" 60 --transport tcp --iters 3
  kvb "overlap 70B prefill 0->$DST1" 240 --transport cuda-peer --dst-gpus $DST1 --iters ${KV_OVERLAP_ITERS:-3} \
    --overlap-model llama-3.3-70b-fp8-dynamic
  fi ;;
esac

# The 70B dummy model behind `tandem serve`, measured by `tandem bench` as the guide does (ISL 3000 /
# OSL 150, concurrency 1, the guide's engine flags). serve_run NAME EXTRA_SERVE_FLAGS
serve_run() {
  local name=$1 extra=$2 M=llama-3.3-70b-fp8-dynamic
  "$D/tandem" serve --model $M --load-format dummy --device cuda --gpu-memory-utilization 0.95 \
    --max-model-len 3500 --max-num-batched-tokens 3500 --block-size 128 --port 8123 $extra > "$OUT/serve_$name.log" 2>&1 &
  SERVE=$!
  for _ in $(seq 1 120); do
    (exec 3<>/dev/tcp/127.0.0.1/8123) 2>/dev/null && break; sleep 1
  done
  step "serve $name + bench c=${SERVE_CONCURRENCY:-1}" 300 "$D/tandem" bench --url http://127.0.0.1:8123 \
    --model $M --tokenizer "$D/models/$M" --isl 3000 --osl 150 --concurrency ${SERVE_CONCURRENCY:-1} \
    --artifact-dir "$OUT/agg-1gpu-$name" --deployment-kind tandem --mode aggregated --tp 1 --dp 1 --no-progress
  ROWS+=("$(grep -A2 'TTFT avg' "$OUT/step.log" | head -3 | sed 's/^/  /')")
  # Decode through the server at temperature 0 (greedy) and 1 (the sampling kernel): one request of
  # 300 tokens after a 2-token prompt; ms per token = wall time / 300.
  for temp in 0 1.0; do
    t0=$(date +%s%N)
    curl -s -m 60 http://127.0.0.1:8123/v1/completions -H 'content-type: application/json' \
      -d "{\"model\":\"$M\",\"prompt\":\"Hello world\",\"max_tokens\":300,\"temperature\":$temp,\"ignore_eos\":true}" \
      > "$OUT/serve_${name}_temp_$temp.json"
    ms=$(( ($(date +%s%N) - t0) / 1000 ))
    ROWS+=("$(printf '  serve %s decode T=%-4s %s ms/token (%s)' $name $temp "$(awk "BEGIN{printf \"%.2f\", $ms/300/1000}")" \
      "$(grep -o '"completion_tokens":[0-9]*' "$OUT/serve_${name}_temp_$temp.json")")")
  done
  curl -s -m 5 http://127.0.0.1:8123/metrics | grep -E '^tandem_engine_' | sed "s/^/  $name /" >> "$LOG"
  kill $SERVE; wait $SERVE 2>/dev/null
  tail -n 20 "$OUT/serve_$name.log"
}
case " $STAGES " in *" serve "*) serve_run default "${SERVE_EXTRA:-}" ;; esac
# A/B: every step read back before the next is scheduled (no async scheduling).
case " $STAGES " in *" serve_sync "*) serve_run sync "--async-scheduling=false ${SERVE_EXTRA:-}" ;; esac

case " $STAGES " in *" tp "*)
  # Tensor parallelism over 2 GPUs: TP2 against TP1 on the fixtures, then the 70B dummy's decode step.
  GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
  if [ "$GPUS" -lt 2 ]; then
    echo "tp stage skipped: $GPUS GPU(s) visible, TP2 needs 2" | tee -a "$LOG"
  else
    step "cuda_tp (TP2 vs TP1, fixtures)" 180 "$D/tests/cuda_tp" --test-threads=1 --nocapture
    # Decode graphs against eager launches in the same process (`_eager` keys).
    step "bench-step 70B fp8 dummy TP2" 300 "$D/tandem" bench-step --model llama-3.3-70b-fp8-dynamic \
      --load-format dummy --tensor-parallel-size 2 --batch 1,32 --context 3000 --prompt-len 3000 \
      --prefill-batch 1 --gpu-memory-utilization 0.95 --iters "${ITERS:-20}" --compare-eager
    sed -n '/^{/,/^}/p' "$OUT/step.log" > "$OUT/bench_step_tp2.json"
    if [ -n "${TP_AB:-}" ]; then  # the same step with the all-reduce as a kernel of its own (peer), or NCCL's
      for ar in peer nccl; do
        step "bench-step 70B fp8 dummy TP2, TANDEM_ALL_REDUCE=$ar" 300 env TANDEM_ALL_REDUCE=$ar "$D/tandem" bench-step \
          --model llama-3.3-70b-fp8-dynamic --load-format dummy --tensor-parallel-size 2 --batch 1,32 \
          --context 3000 --prompt-len 3000 --prefill-batch 1 --gpu-memory-utilization 0.95 --iters "${ITERS:-20}"
        sed -n '/^{/,/^}/p' "$OUT/step.log" > "$OUT/bench_step_tp2_$ar.json"
      done
    fi
  fi ;;
esac

case " $STAGES " in *" tp4 "*)
  # The decode step of the 70B dummy over 4 GPUs (issue 10 on a 4-GPU machine).
  GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
  if [ "$GPUS" -lt 4 ]; then
    echo "tp4 stage skipped: $GPUS GPU(s) visible" | tee -a "$LOG"
  else
    step "bench-step 70B fp8 dummy TP4" 300 "$D/tandem" bench-step --model llama-3.3-70b-fp8-dynamic \
      --load-format dummy --tensor-parallel-size 4 --batch 1,32 --context 3000 --prompt-len 3000 \
      --prefill-batch 1 --gpu-memory-utilization 0.95 --iters "${ITERS:-20}"
    sed -n '/^{/,/^}/p' "$OUT/step.log" > "$OUT/bench_step_tp4.json"
  fi ;;
esac

# The kernel cache for the next run's dist (make_dist.sh KERNEL_CACHE=.../kcache.tgz).
[ -d "$TANDEM_KERNEL_CACHE" ] && tar czf "$OUT/kcache.tgz" -C /tmp "$(basename "$TANDEM_KERNEL_CACHE")"

echo
echo "================ summary ================"
for r in "${ROWS[@]}"; do echo "$r"; done
[ -s "$OUT/bench_step.json" ] && cat "$OUT/bench_step.json"
[ -s "$OUT/kv_transfer.json" ] && cat "$OUT/kv_transfer.json"
[ -s "$OUT/bench_step_tp2.json" ] && cat "$OUT/bench_step_tp2.json"
[ -s "$OUT/bench_step_tp2_nccl.json" ] && cat "$OUT/bench_step_tp2_nccl.json"
[ -s "$OUT/bench_step_tp4.json" ] && cat "$OUT/bench_step_tp4.json"
