#!/usr/bin/env bash
# one GPU call: make verify cold, then warm three times (bytecode kept by make, reports rendered once)
set -u
r=/tmp/r; mkdir -p $r; export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache
t() { local label=$1 s rc; shift; s=$(date +%s.%N); "$@" > $r/$label.log 2>&1; rc=$?; echo "$label rc=$rc $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s" >> $r/timing.txt; }
t cold make verify ARGS="--run-id cold"
for i in 1 2 3; do t warm$i make verify ARGS="--run-id warm$i"; done
tar -czf $r/reports.tgz reports/cold reports/warm1 reports/warm2 reports/warm3
tar -czf $OUT/results.tgz -C $r .
cat $r/timing.txt
