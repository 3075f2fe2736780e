#!/usr/bin/env bash
# Hardware counters of chosen kernels with Nsight Compute, on the GPU machine (Firecracker
# runtime; from a dist folder, like gpu_check.sh):
#   KERNELS="silu_mul_fp8_smem|add_rmsnorm_fp8_k" COUNT=8 bash dist/ncu_kernels.sh tandem bench-step ...
# Kernels inside CUDA graph captures cannot be profiled: pass --enforce-eager where the command
# has it. Every launch is slower under ncu (a 70B decode step took 84 ms instead of 20), so give it
# commands that reach the kernels soon: the prefill kernels after bench-step's decode steps were
# not reached in 170 s. One CSV row per launch (time, DRAM bytes and throughput, grid, registers, occupancy) in
# $OUT/ncu.csv, and the full sections of the first launches in $OUT/ncu_sections.txt (SECTIONS=0
# skips them).
set -uo pipefail
D=${DIST:-$(cd "$(dirname "$0")" && pwd)}
OUT=${OUT:-/tmp/ncu}
mkdir -p "$OUT"
source <(sed -n '/^export NCCL_NVLS/,/^export RUST_BACKTRACE/p' "$D/gpu_check.sh")
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
bin=$1; shift
[ -x "$bin" ] || bin="$D/$bin"
METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__block_size,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
timeout ${NCU_TIMEOUT:-400} "$NCU" --clock-control none -k "regex:${KERNELS:?regex of kernel names}" \
  --launch-skip ${SKIP:-0} --launch-count ${COUNT:-8} --csv --page raw --metrics "$METRICS" \
  --log-file "$OUT/ncu.csv" "$bin" "$@" > "$OUT/app.log" 2> "$OUT/ncu.err"
echo "ncu rc=$?"
# timeout stops ncu, not the program it started: stop that too before the next pass.
pkill -9 -x "$(basename "$bin")" 2>/dev/null; sleep 1
python3 - "$OUT/ncu.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"')) if len(r) > 5]
if not rows: print("no rows"); sys.exit()
head, units, data = rows[0], rows[1], rows[2:]
col = {h: i for i, h in enumerate(head)}
def g(r, k):
    return r[col[k]].replace(",", "") if k in col else "?"
print(f"{'kernel':48} {'us':>8} {'MB rd':>8} {'MB wr':>7} {'dram%':>6} {'sm%':>5} {'grid':>6} {'blk':>5} {'regs':>4} {'occ%':>5}")
for r in data:
    us = float(g(r, "gpu__time_duration.sum") or 0) / (1000 if units[col["gpu__time_duration.sum"]] == "ns" else 1)
    rd = float(g(r, "dram__bytes_read.sum") or 0); wr = float(g(r, "dram__bytes_write.sum") or 0)
    scale = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1, "Gbyte": 1e3}
    rd *= scale.get(units[col["dram__bytes_read.sum"]], 1); wr *= scale.get(units[col["dram__bytes_write.sum"]], 1)
    print(f"{g(r,'Kernel Name')[:48]:48} {us:8.1f} {rd:8.1f} {wr:7.1f} {g(r,'dram__throughput.avg.pct_of_peak_sustained_elapsed'):>6} "
          f"{g(r,'sm__throughput.avg.pct_of_peak_sustained_elapsed'):>5} {g(r,'launch__grid_size'):>6} {g(r,'launch__block_size'):>5} "
          f"{g(r,'launch__registers_per_thread'):>4} {g(r,'sm__warps_active.avg.pct_of_peak_sustained_active'):>5}")
PY
if [ "${SECTIONS:-1}" != 0 ]; then
  timeout ${NCU_TIMEOUT:-400} "$NCU" --clock-control none -k "regex:${KERNELS}" --launch-skip ${SKIP:-0} \
    --launch-count ${SECTION_COUNT:-2} --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section WarpStateStats --section LaunchStats "$bin" "$@" > "$OUT/ncu_sections.txt" 2>&1
  pkill -9 -x "$(basename "$bin")" 2>/dev/null
  grep -E "^  [a-z_]+.*\(|Stall|Warp Cycles|Memory Throughput|DRAM Throughput|Achieved Occupancy|Duration|L2 Hit|Mem Busy|Max Bandwidth" "$OUT/ncu_sections.txt" | head -n 80
fi
tail -n 5 "$OUT/ncu.err"
