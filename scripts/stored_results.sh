#!/usr/bin/env bash
# Print the results/ folder whose stored runs were measured on this machine's kind of GPU
# (results/h100 on an H100, else results/h200): a speed comparison means most against the same card.
#   bash scripts/stored_results.sh [GPU_NAME]   (default: the first GPU nvidia-smi names)
set -euo pipefail
name=${1:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)}
case $name in
    *H100*) echo results/h100 ;;
    *) echo results/h200 ;;
esac
