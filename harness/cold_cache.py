"""One process while Triton's cache is warm; worker processes once compiling proves slow.

One process judging every case is the fastest way through a matrix once Triton's cache holds the
kernel variants: processes sharing one GPU time-slice it, and each pays the start-up of torch and
CUDA. Compiling is another matter: a variant takes a second or two of CPU, and a cold matrix has
hundreds. So `verify` runs the cases in one process, grouped by compiled variant, and watches how
long first launches take; once compiling has cost it COLD_AFTER_S with at least MIN_VARIANTS_LEFT
variants still ahead, it hands the remaining cases to worker processes that compile side by side
(`verify --jobs`), and merges their results with its own. The workers take variant groups one at a
time from a shared list (`claimed_groups`), so none waits on the slowest share.
"""
from __future__ import annotations

import os
from pathlib import Path

from harness.matrix import compile_key

# Seconds of compiling (first launch minus a warm launch) after which the cache counts as cold.
COLD_AFTER_S = 2.0
# A first launch counts as compiling only above this: loading a cached variant took up to 0.125 s on
# the H200 (a warm run of cases/default.yaml summed 2.8 s of such loads over 856 cases, which passed
# COLD_AFTER_S and started workers on a warm cache); compiling one takes 1-4.6 s.
COMPILE_MIN_S = 0.3
# Fewer variants ahead than this are not worth the workers' start-up (torch, CUDA: seconds each).
MIN_VARIANTS_LEFT = 8


def variant_groups(cases: list) -> list:
    """The cases as one list per compiled variant (in order of first appearance, cases in input
    order within a group)."""
    groups = {}
    for c in cases:
        groups.setdefault(compile_key(c), []).append(c)
    return list(groups.values())


def group_by_variant(cases: list) -> list:
    """The cases reordered so that those of one compiled variant run together."""
    return [c for group in variant_groups(cases) for c in group]


def default_workers() -> int:
    """Compiling workers for a cold cache: three quarters of the cores, at most 12. On the H100 machine
    (16 cores), cold cases/default.yaml took 74.9 s with 12 workers and 89.5 s with 8: compiling
    is CPU work, and the GPU time-slicing that more processes cost is small beside it."""
    return max(2, min(12, (os.cpu_count() or 4) * 3 // 4))


def claimed_groups(cases: list, claim_dir: Path):
    """The variant groups this worker takes from a list every worker walks in the same order,
    largest group first: a group goes to the first worker that creates its claim file, so each
    worker takes the next one as it finishes one. Compile times differ per variant (1-4.6 s on
    the H200), so fixed shards of equal case counts end far apart: replayed from one cold run of
    cases/default.yaml on 12 workers, `--shard` slices 39.9-56.8 s of case time, this list 46.1-49.8 s;
    timed on the next machine, workers' walls 45.7-49.6 s and the cold run 85.7 -> 75.8 s."""
    ordered = sorted(variant_groups(cases), key=len, reverse=True)  # stable: ties keep first appearance
    claim_dir.mkdir(parents=True, exist_ok=True)
    for i, group in enumerate(ordered):
        try:
            os.close(os.open(claim_dir / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue  # another worker took it
        yield group


class ColdCacheWatch:
    """run_cases' stop_after: true once the cache proves cold (and stays so: it asks once)."""

    def __init__(self, cases: list, enabled: bool = True):
        self.cases = cases
        self.enabled = enabled
        self.compile_s = 0.0
        self.cold = False

    def __call__(self, index: int, result) -> bool:
        t = result.timings or {}
        first_launch = t.get("kernel_first", 0.0) - t.get("kernel", 0.0)
        if first_launch > COMPILE_MIN_S:
            self.compile_s += first_launch
        if not self.enabled or self.cold or self.compile_s < COLD_AFTER_S:
            return False
        ahead = {compile_key(c) for c in self.cases[index + 1:]}
        self.cold = len(ahead) >= MIN_VARIANTS_LEFT
        return self.cold
