#!/usr/bin/env bash
# Profile the attention kernel on one benchmark batch with Nsight Compute (GPU machine, repo root):
#   bash scripts/ncu_profile.sh OUT_DIR stalls|sections|source NAME BATCH...
# BATCH is scripts/profile_kernel.py's arguments, e.g. `decode 64 4096 16 --q fp8 --kv fp8`.
# stalls: stall reasons per issued instruction, warps active and eligible, issue rate, latency per
#         instruction, DRAM, shared-memory and tensor-pipe use -> OUT_DIR/stalls_NAME.txt
# sections: ncu's SpeedOfLight, Occupancy, LaunchStats, WarpStateStats, SchedulerStats,
#         MemoryWorkloadAnalysis, ComputeWorkloadAnalysis, InstructionStats -> OUT_DIR/ncu_NAME.txt
# source: warp stall samples per SASS instruction (SourceCounters) -> OUT_DIR/source_NAME.csv, and
#         scripts/ncu_source_stalls.py's summary of it (where the warps wait) -> OUT_DIR/source_NAME.txt
# The clocks are left alone (--clock-control none); the second launch is profiled (the first compiles).
set -uo pipefail
usage="usage: ncu_profile.sh OUT_DIR stalls|sections|source NAME BATCH..."
out=${1:?$usage}
mode=${2:?$usage}
name=${3:?$usage}
shift 3
mkdir -p "$out"
export PYTHONUNBUFFERED=1
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
common=(--clock-control none --kernel-name regex:_unified_attention_kernel --launch-skip 1 --launch-count 1)
case $mode in
    stalls)
        metrics="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
        metrics+=",smsp__warps_active.avg.per_cycle_active,smsp__warps_eligible.avg.per_cycle_active"
        metrics+=",smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__average_warp_latency_per_inst_issued.ratio"
        metrics+=",dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum"
        metrics+=",l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed"
        metrics+=",sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
        file="$out/stalls_$name.txt"
        "$ncu" "${common[@]}" --metrics "$metrics" python3 scripts/profile_kernel.py "$@" > "$file" 2>&1
        ;;
    sections)
        file="$out/ncu_$name.txt"
        sections=()
        for s in SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats MemoryWorkloadAnalysis \
                 ComputeWorkloadAnalysis InstructionStats; do
            sections+=(--section "$s")
        done
        "$ncu" "${common[@]}" "${sections[@]}" --page details python3 scripts/profile_kernel.py "$@" > "$file" 2>&1
        ;;
    source)
        report=$(mktemp -d)/source_$name
        "$ncu" "${common[@]}" --section SourceCounters --section WarpStateStats -o "$report" \
            python3 scripts/profile_kernel.py "$@" > "$out/source_$name.log" 2>&1
        rc=$?
        "$ncu" -i "$report.ncu-rep" --page source --csv --print-source sass > "$out/source_$name.csv" || rc=1
        python3 scripts/ncu_source_stalls.py "$out/source_$name.csv" | tee "$out/source_$name.txt"
        exit $rc
        ;;
    *)
        echo "ncu_profile.sh: unknown mode '$mode' (stalls, sections, source)" >&2
        exit 2
        ;;
esac
rc=$?
# The figures RESULTS.md quotes, one per line (stall reasons of at least 0.1 cycle per instruction).
grep -E "stalled|warps_active|eligible|issue_active|latency_per|dram__|l1tex|duration|hmma|Duration|Issue Slots|Registers Per|Achieved Occ" "$file" \
    | awk '{v=$NF; gsub(",", "", v); if (v + 0 >= 0.1 || $0 !~ /stalled/) print $1, $NF}' \
    | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
exit $rc
