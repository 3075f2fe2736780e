#!/usr/bin/env bash
# Shows that `tandem bench` is never the bottleneck: pinned to ONE core, it drives 256 concurrent
# streams from the mock server (ITL 5 ms, so up to 51,200 tokens/s offered, every token its own
# SSE event) and must sustain at least 20,000 streamed tokens/s. The mock runs on other cores.
# Writes benchmarks/results/loadgen.json.
#   usage: scripts/loadgen_check.sh [path/to/tandem]   (default: target/debug/tandem, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-${TANDEM_BIN:-target/debug/tandem}}
if [ ! -x "$BIN" ]; then cargo build --bin tandem; BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/tandem; fi
FLOOR=20000
PORT=${LOADGEN_PORT:-18777}
WORK=$(mktemp -d)
CORES=$(nproc)
MOCK_CPUS=$([ "$CORES" -gt 1 ] && echo "1-$((CORES - 1))" || echo 0)
taskset -c "$MOCK_CPUS" "$BIN" mock-server --port "$PORT" --itl-ms 5 >"$WORK/mock.log" 2>&1 &
MOCK=$!
trap 'kill $MOCK 2>/dev/null; rm -rf "$WORK"' EXIT
# A word-level tokenizer: output tokens are counted from the streamed text, as in real runs.
python3 - "$WORK/tok" <<'PY'
import json, os, sys
os.makedirs(sys.argv[1]); vocab = {f"w{i}": i for i in range(1000)}; vocab["[UNK]"] = 1000
json.dump({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}},
          open(os.path.join(sys.argv[1], "tokenizer.json"), "w"))
PY
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
CMD=(taskset -c 0 "$BIN" bench --url "127.0.0.1:$PORT" --model mock --isl 100 --osl 150
     --concurrency 256 --artifact-dir "$WORK/art" --tokenizer "$WORK/tok" --no-progress)
# CPU time of the bench process: bash's `times` accounts waited-for children (the mock server,
# still running, is not among them); subtract what the children used before.
to_s() { python3 -c "import sys; m, s = sys.argv[1].rstrip('s').split('m'); print(int(m) * 60 + float(s))" "$1"; }
times >"$WORK/t0"  # a builtin with a redirect runs in this shell (a subshell would see zeros)
read -r U0 S0 < <(tail -1 "$WORK/t0")
T0=$(date +%s.%N)
"${CMD[@]}" | tee "$WORK/summary.txt"
T1=$(date +%s.%N)
times >"$WORK/t1"
read -r U1 S1 < <(tail -1 "$WORK/t1")
USER_S=$(python3 -c "print($(to_s "$U1") - $(to_s "$U0"))")
SYS_S=$(python3 -c "print($(to_s "$S1") - $(to_s "$S0"))")
WALL_S=$(python3 -c "print(round($T1 - $T0, 2))")
python3 - "$WORK" "$FLOOR" "$USER_S" "$SYS_S" "$WALL_S" "${LOADGEN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" "${CMD[*]}" <<'PY'
import json, sys, glob, platform, datetime, os
work, floor, user, sys_s, wall, commit, cmd = sys.argv[1:]
run = json.load(open(glob.glob(f"{work}/art/*concurrency256/profile_export_genai_perf.json")[0]))
value = run["output_token_throughput"]["avg"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
result = {
    "name": "loadgen_streamed_tokens_per_s_one_core_256_streams",
    "value": round(value, 1), "unit": "tokens/s", "floor": int(floor),
    "bench_cpu_seconds": round(float(user) + float(sys_s), 2), "wall_seconds": float(wall),
    "itl_avg_ms": round(run["inter_token_latency"]["avg"], 3), "mock_itl_ms": 5.0,
    "request_count": run["request_count"]["avg"],
    "command": cmd.replace(work, "$WORK"),
    "machine": f"{platform.node()}: {os.cpu_count()} cores, {cpu}",
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "commit": commit,
}
os.makedirs("benchmarks/results", exist_ok=True)
json.dump(result, open("benchmarks/results/loadgen.json", "w"), indent=2)
print(json.dumps(result, indent=2))
if value < float(floor):
    sys.exit(f"FAIL: {value:.0f} tokens/s is below the floor of {floor}")
print(f"OK: {value:.0f} tokens/s >= {floor} on one core")
PY
