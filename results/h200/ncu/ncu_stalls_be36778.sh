#!/usr/bin/env bash
# Stall reasons, issue rate, latency per instruction and tensor-pipe use at be36778 (lease 13).
set -u
OUT=${1:?usage: bash results/h200/ncu/ncu_stalls_be36778.sh OUT_DIR (from the repository root, on the GPU machine)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
M="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__warps_active.avg.per_cycle_active,smsp__warps_eligible.avg.per_cycle_active,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,smsp__average_warp_latency_per_inst_issued.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
stalls() {
    local name=$1 skip=$2; shift 2
    echo "=== $name: $*"
    timeout 120 $NCU --clock-control none --kernel-name regex:_unified_attention_kernel --launch-skip $skip --launch-count 1 \
        --metrics "$M" python3 scripts/profile_kernel.py "$@" > "$OUT/stalls_$name.txt" 2>&1
    echo "rc=$?"
    grep -E "stalled|warps_active|eligible|issue_active|dram__|l1tex|duration|latency_per|hmma" "$OUT/stalls_$name.txt" \
        | awk '{v=$NF; gsub(",","",v); if (v+0 >= 0.1 || $0 !~ /stalled/) print $1, $NF}' | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
}
stalls be36778_fp8_bs16 2 decode 64 4096 16 --q fp8 --kv fp8
stalls be36778_fp8_bs64 2 decode 64 4096 64 --q fp8 --kv fp8
stalls be36778_prefill_fp8 1 prefill 4 4096 64 --q fp8 --kv fp8 --launches 3
stalls be36778_prefill_bf16 1 prefill 4 4096 64 --q bf16 --kv bf16 --launches 3
