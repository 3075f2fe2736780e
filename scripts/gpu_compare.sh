#!/usr/bin/env bash
# The guide's comparison on the GPU machine: each deployment file is served by `tandem serve -f`,
# swept by `tandem bench` (ISL 3000 / OSL 150), and all are drawn by `tandem pareto`.
# Runs from a dist folder (scripts/make_dist.sh) carried to the GPU machine:
#
#   DEPLOYMENTS="benchmarks/h200x2/agg-tp1x2.yaml benchmarks/h200x2/disagg-p1-d1.yaml" \
#     CONCURRENCY="1 4 16 64" PER_LEVEL=4 bash dist/gpu_compare.sh
#
# PER_LEVEL measured requests per concurrent stream (the guide uses 10, after 2 of warm-up; device
# time is short, so the default is 4 after 1). Artifacts go to $OUT/artifacts.tar.gz, the plot and
# gain table to $OUT.
set -uo pipefail
D=${DIST:-$(cd "$(dirname "$0")" && pwd)}
OUT=${OUT:-/tmp/gpu_compare}
mkdir -p "$OUT"
source <(sed -n '/^export NCCL_NVLS/,/^export RUST_BACKTRACE/p' "$D/gpu_check.sh")
M=llama-3.3-70b-fp8-dynamic
CONCURRENCY=${CONCURRENCY:-"1 4 16 64"}
PER_LEVEL=${PER_LEVEL:-4}
WARMUP=${WARMUP:-1}
PORT=8123
WORK=/tmp/compare
mkdir -p "$WORK"
dirs=()
for f in ${DEPLOYMENTS:?list deployment files}; do
  name=$(basename "$f" .yaml)
  echo "=== $name ($f)"
  "$D/tandem" serve -f "$f" --port $PORT > "$OUT/serve-$name.log" 2>&1 &
  SERVE=$!
  up=0
  for _ in $(seq 1 240); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && { up=1; break; }
    kill -0 $SERVE 2>/dev/null || break
    sleep 1
  done
  if [ $up = 0 ]; then echo "serve $name did not come up"; tail -n 30 "$OUT/serve-$name.log"; kill $SERVE 2>/dev/null; continue; fi
  case $name in  # the GPU shape for deployment_config.json (tokens/s/gpu divides by it)
    agg-tp1x2) shape="--tp 1 --dp 2" ;;
    agg-tp2) shape="--tp 2 --dp 1" ;;
    agg-tp2x2) shape="--tp 2 --dp 2" ;;
    disagg-p1-d1|disagg-p1-d1-kv8) shape="--mode disaggregated --prefill-tp 1 --prefill-dp 1 --decode-tp 1 --decode-dp 1" ;;
    disagg-p2-d1tp2) shape="--mode disaggregated --prefill-tp 1 --prefill-dp 2 --decode-tp 2 --decode-dp 1" ;;
    *) echo "unknown deployment $name: add its shape here"; kill $SERVE; continue ;;
  esac
  for c in $CONCURRENCY; do
    timeout ${LEVEL_TIMEOUT:-300} "$D/tandem" bench --url http://127.0.0.1:$PORT --model $M \
      --tokenizer "$D/models/$M" --isl 3000 --osl 150 --concurrency "$c" \
      --request-count $((PER_LEVEL * c)) --warmup-request-count $((WARMUP * c)) \
      --artifact-dir "$WORK/$name" --deployment-kind tandem --deployment-name "$name" \
      $shape --no-progress 2>&1 | tail -n 4
  done
  dirs+=("$WORK/$name")
  kill $SERVE; wait $SERVE 2>/dev/null
  tail -n 5 "$OUT/serve-$name.log"
  # The cuBLASLt algorithms the servers tuned so far (gemm_tune; kept with the results).
  cp "$TANDEM_KERNEL_CACHE/cublaslt-choices.json" "$OUT/" 2>/dev/null
done
"$D/tandem" pareto "${dirs[@]}" --output-dir "$OUT" 2>&1 | tail -n 30
tar -czf "$OUT/artifacts.tar.gz" -C "$WORK" .
