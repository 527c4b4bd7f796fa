#!/usr/bin/env bash
# Collect the GPU results that results/<machine>/ keeps, into OUT_DIR, one step or several per call:
#   bash scripts/gpu_results.sh OUT_DIR verify|selfcheck|tests|memcheck|bench ...
# verify: `make verify` on cases/default.yaml from an empty Triton cache, then twice warm; each
#         make command's wall time goes to OUT_DIR/verify_timing.txt (the bars: cold <= 90 s, warm <= 20 s).
# selfcheck: `make selfcheck` (cases/selfcheck.yaml, 10 seeds) on 12 worker processes.
# tests: the kernel, reference and command-line tests on the GPU (the last hold a real illegal address
#        and memcheck catching a read past the block table).
# memcheck: `make memcheck` (cases/smoke.yaml, each case under compute-sanitizer's memcheck), then the
#        exact_table cases of cases/default.yaml the same way.
# bench: `make bench` (JSON and PNG), then bench.compare against the stored bench.json of the same
#        card (results/h100/ on an H100, else results/h200/; bench_compare.txt; a regression is
#        reported, it does not fail the step).
set -uo pipefail
out=${1:?usage: gpu_results.sh OUT_DIR STEP...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader > "$out/device.txt"
stored=$(bash scripts/stored_results.sh "$(head -n 1 "$out/device.txt")")
status=0

timed() {  # timed LABEL COMMAND...: run, append "LABEL SECONDS rc=N" to verify_timing.txt
    local label=$1 start rc
    shift
    start=$(date +%s.%N)
    "$@"
    rc=$?
    echo "$label $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s rc=$rc" | tee -a "$out/verify_timing.txt"
    return $rc
}

for step in "$@"; do
    case $step in
        verify)
            cold=$(mktemp -d)
            TRITON_CACHE_DIR=$cold timed cold make verify ARGS="--run-id gpu_cold" > "$out/verify_cold.log" 2>&1 || status=1
            for run in 1 2; do
                TRITON_CACHE_DIR=$cold timed "warm$run" make verify ARGS="--run-id gpu_warm$run" \
                    > "$out/verify_warm$run.log" 2>&1 || status=1
            done
            tar -czf "$out/verify_reports.tgz" reports/gpu_cold reports/gpu_warm1 reports/gpu_warm2
            ;;
        selfcheck)
            make selfcheck ARGS="--jobs 12 --run-id gpu_selfcheck" > "$out/selfcheck.log" 2>&1 || status=1
            tar -czf "$out/selfcheck_reports.tgz" reports/gpu_selfcheck
            ;;
        tests)
            python3 -m pytest -q -n 8 tests/test_kernel.py tests/test_reference.py tests/test_cli.py > "$out/tests.log" 2>&1 || status=1
            ;;
        memcheck)
            make memcheck ARGS="--run-id gpu_memcheck" > "$out/memcheck.log" 2>&1 || status=1
            make memcheck ARGS="--cases cases/default.yaml --filter layout=exact_table --run-id gpu_memcheck_exact" \
                > "$out/memcheck_exact.log" 2>&1 || status=1
            tar -czf "$out/memcheck_reports.tgz" reports/gpu_memcheck reports/gpu_memcheck_exact
            ;;
        bench)
            make bench ARGS="--out $out/bench.json --plot $out/bench.png" > "$out/bench.log" 2>&1 || status=1
            python3 -m bench.compare "$stored/bench.json" "$out/bench.json" > "$out/bench_compare.txt" 2>&1
            ;;
        *)
            echo "gpu_results.sh: unknown step '$step' (verify, selfcheck, tests, memcheck, bench)" >&2
            exit 2
            ;;
    esac
done
exit $status
