"""Split a run into worker processes and join shard results into one run.

`verify --jobs N` starts N processes that take variant groups from one shared list, and
`selfcheck --jobs N` N processes on `--shard k/N` slices (Triton compiles on the CPU, so workers
compile kernel variants side by side while sharing the GPU); both merge their results.
`merge` joins results.json files from shards run anywhere (a CI job matrix, one GPU each).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from harness.schema import Result


def merge_runs(runs: list, order: list | None = None) -> tuple:
    """[(results, meta)] -> (results, meta): one run; a case id in two runs is an error."""
    seen, merged = {}, []
    for results, meta in runs:
        for r in results:
            if r.id in seen:
                raise ValueError(f"case {r.id} appears in two shard results")
            seen[r.id] = r
            merged.append(r)
    if order is not None:
        rank = {cid: i for i, cid in enumerate(order)}
        merged.sort(key=lambda r: rank.get(r.id, len(rank)))
    metas = [meta for _, meta in runs]
    meta = dict(metas[0]) if metas else {}
    meta["shard"] = f"merged from {len(runs)} shard(s)"
    timing = {}
    for m in metas:
        for phase, secs in (m.get("timing") or {}).items():
            timing[phase] = timing.get(phase, 0.0) + secs
    meta["timing"] = timing
    meta["wall_s"] = max((m.get("wall_s") or 0.0) for m in metas) if metas else 0.0
    return merged, meta


def _partial_results(jsonl: Path) -> list:
    """Results a worker streamed before it died."""
    if not jsonl.is_file():
        return []
    return [Result.from_dict(json.loads(line)) for line in jsonl.read_text().splitlines() if line.strip()]


def run_shards(command: str, argv_common: list, jobs: int, work_dir: Path, claims: bool = False) -> list:
    """Run `python -m harness COMMAND` in `jobs` processes side by side: each on its `--shard k/N`,
    or with claims, all on one list of variant groups that each takes from as it goes
    (cold_cache.claimed_groups).

    Returns one (results, meta) per shard; a worker that died leaves what it streamed and an
    empty meta. Workers hand cached device memory back after each case (HARNESS_SHARED_DEVICE).
    """
    from harness.reports import load_results_json
    work_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work_dir / "claims", ignore_errors=True)  # a run under the same id starts with none taken
    procs = []
    for k in range(1, jobs + 1):
        share = ["--claim-dir", str(work_dir / "claims")] if claims else ["--shard", f"{k}/{jobs}"]
        cmd = [sys.executable, "-m", "harness", command, *argv_common, *share,
               "--report-dir", str(work_dir), "--run-id", f"shard{k}"]
        log = open(work_dir / f"shard{k}.log", "w")
        env = dict(os.environ, HARNESS_SHARED_DEVICE="1")
        procs.append((k, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    runs = []
    for k, proc, log in procs:
        rc = proc.wait()
        log.close()
        done = work_dir / f"shard{k}" / "results.json"
        runs.append(load_results_json(done) if done.is_file()
                    else (_partial_results(work_dir / f"shard{k}.jsonl"), {}))
        print(f"  shard {k}/{jobs} finished (exit {rc}); log {work_dir / f'shard{k}.log'}", flush=True)
    return runs


def run_workers(argv_common: list, jobs: int, work_dir: Path, cases: list) -> tuple:
    """`verify` on each of `jobs` shards in its own process: the merged (results, meta) and the
    cases no worker finished (a worker that lost its device stops; one that died leaves what it
    streamed), for run_isolated."""
    runs = run_shards("verify", [*argv_common, "--no-progress"], jobs, work_dir, claims=True)
    results, meta = merge_runs([r for r in runs if r[0] or r[1]], order=[c.id for c in cases])
    done = {r.id for r in results}
    return results, meta, [c for c in cases if c.id not in done]


def run_isolated(argv_common: list, work_dir: Path, cases: list) -> list:
    """The cases (in the matrix's order) in fresh worker processes, one at a time. A worker stops
    at the first case that loses its device (an illegal address leaves a process's CUDA context
    unusable: every later call in it fails the same way), which keeps its ERROR row, and the next
    worker takes the rest.
    A worker that dies (a crash in the kernel) leaves what it streamed; the case it was running,
    the first unfinished one in its order, becomes an ERROR row naming its log."""
    from harness.cold_cache import group_by_variant
    results, left, round_no = [], list(cases), 0
    while left:
        round_no += 1
        ids = work_dir / f"isolated{round_no}.json"
        work_dir.mkdir(parents=True, exist_ok=True)
        ids.write_text(json.dumps([c.id for c in left]))
        (got, meta), = run_shards("verify", [*argv_common, "--no-progress", "--case-ids", str(ids)], 1,
                                  work_dir / f"isolated{round_no}")
        results += got
        done = {r.id for r in got}
        # The worker got its ids in the matrix's order (as `left` keeps them) and ran them grouped.
        unfinished = [c for c in group_by_variant(left) if c.id not in done]
        if not meta and unfinished:  # it died: in the case after the last one it streamed
            log = work_dir / f"isolated{round_no}" / "shard1.log"
            if "verify:" not in (log.read_text(errors="replace") if log.is_file() else ""):
                # it died before its first line, i.e. before running any case: so would the next
                results += [Result(id=c.id, status="ERROR", axes=c.axis_values(),
                                   message=f"not run: a worker process died before starting (see {log})")
                            for c in unfinished]
                break
            dead = unfinished[0]
            results.append(Result(id=dead.id, status="ERROR", axes=dead.axis_values(),
                                  message=f"kernel: the worker process died while running this case (see {log})"))
            done.add(dead.id)
        left = [c for c in left if c.id not in done]
    return results
