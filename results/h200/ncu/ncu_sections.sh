#!/usr/bin/env bash
# ncu profiles of decode variants: stall reasons, issue rate, memory throughput.
set -u
OUT=${1:?usage: bash results/h200/ncu/ncu_sections.sh OUT_DIR (from the repository root, on the GPU machine)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
sec="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats"
run() {  # run NAME ARGS...
    local name=$1; shift
    echo "=== $name: $*"
    timeout 150 $NCU --clock-control none --kernel-name regex:_unified_attention_kernel --launch-skip 2 --launch-count 1 \
        $sec --page details python3 scripts/profile_kernel.py "$@" > "$OUT/ncu_$name.txt" 2>&1
    echo "rc=$?"
    grep -E "Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Issued Warp Per Scheduler|No Eligible|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued" "$OUT/ncu_$name.txt" | head -30
}
run fp8_bs16 decode 64 4096 16 --q fp8 --kv fp8
run fp8_bs16_words decode 64 4096 16 --q fp8 --kv fp8 --config '{"v_as_words": true}'
run fp8_bs64 decode 64 4096 64 --q fp8 --kv fp8
run bf16_bs16 decode 64 4096 16 --q bf16 --kv bf16
run fp8_32k decode 1 32768 16 --q fp8 --kv fp8
