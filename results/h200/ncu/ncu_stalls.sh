#!/usr/bin/env bash
# Stall reasons of decode variants; tensor-pipe use of the FP8 and bf16 prefill.
set -u
OUT=${1:?usage: bash results/h200/ncu/ncu_stalls.sh OUT_DIR (from the repository root, on the GPU machine)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
stalls() {  # stalls NAME ARGS...
    local name=$1; shift
    echo "=== stalls $name: $*"
    timeout 150 $NCU --clock-control none --kernel-name regex:_unified_attention_kernel --launch-skip 2 --launch-count 1 \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__warps_active.avg.per_cycle_active,smsp__warps_eligible.avg.per_cycle_active,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed,gpu__time_duration.sum" \
        python3 scripts/profile_kernel.py "$@" > "$OUT/stalls_$name.txt" 2>&1
    echo "rc=$?"
    grep -E "stalled|warps_active|eligible|issue_active|dram__|l1tex|duration" "$OUT/stalls_$name.txt" \
        | awk '{v=$NF; gsub(",","",v); if (v+0 >= 0.05 || $0 !~ /stalled/) print $1, $NF}' | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
}
pipes() {
    local name=$1; shift
    echo "=== pipes $name: $*"
    timeout 150 $NCU --clock-control none --kernel-name regex:_unified_attention_kernel --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --page details \
        --metrics "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_hmma.sum,sm__inst_executed_pipe_tensor_op_gmma.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active" \
        python3 scripts/profile_kernel.py "$@" --launches 3 > "$OUT/pipes_$name.txt" 2>&1
    echo "rc=$?"
    grep -E "Duration|Registers Per|Block Limit Reg|Achieved Occ|Compute \(SM\)|tensor_op|issue_active|Grid Size|Dynamic Shared" "$OUT/pipes_$name.txt" | head -14
}
stalls fp8_bs16 decode 64 4096 16 --q fp8 --kv fp8
stalls fp8_bs64 decode 64 4096 64 --q fp8 --kv fp8
stalls bf16_bs16 decode 64 4096 16 --q bf16 --kv bf16
stalls fp8_32k decode 1 32768 16 --q fp8 --kv fp8
pipes prefill_fp8 prefill 4 4096 64 --q fp8 --kv fp8
pipes prefill_bf16 prefill 4 4096 64 --q bf16 --kv bf16
