"""Compile kernel variants ahead of a single-process run, in helper processes, when the cache is cold.

One process judging every case is the fastest way through a matrix once Triton's cache holds the
kernel variants: processes sharing one GPU time-slice it, and each pays the start-up of torch and
CUDA. Compiling is another matter: a variant takes a second or two of CPU. So `verify` runs the
cases in one process, grouped by compiled variant, and watches how long first launches take; once
compiling has cost it COLD_AFTER_S, it starts helpers that share out one case of every variant
the run has not reached yet, in run order, and launch it (compiling it into Triton's cache). The
main process waits at each new variant until its helper has compiled it, so no variant is
compiled twice and the helpers have the CPUs. Helpers judge nothing and write no report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness.matrix import compile_key

# Seconds of compiling (first launch minus a warm launch) after which the cache counts as cold.
COLD_AFTER_S = 2.0
# A helper's log line for each case it has finished with, compiled or not.
DONE_MARK = "done "
# Longest wait for one variant; past it the main process compiles the variant itself.
WAIT_LIMIT_S = 120.0
# Fewer variants left than this are not worth a helper's start-up (torch, CUDA: several seconds).
MIN_VARIANTS_LEFT = 8


def group_by_variant(cases: list) -> list:
    """The cases reordered so that those of one compiled variant run together (groups in order of
    first appearance, cases in input order within a group)."""
    groups = {}
    for c in cases:
        groups.setdefault(compile_key(c), []).append(c)
    return [c for group in groups.values() for c in group]


def default_helpers() -> int:
    """One compile per core, leaving two cores to the main process and the system."""
    return max(1, min(16, (os.cpu_count() or 4) - 2))


class CompileAhead:
    """Watches a run over cases ordered by group_by_variant (run_cases' hooks), starts helpers when
    compiling is slow, and holds the run at each variant until its helper has compiled it."""

    def __init__(self, cases: list, helper_argv: list, work_dir: Path, helpers: int):
        self.cases = cases
        self.helper_argv = helper_argv
        self.work_dir = work_dir
        self.helpers = helpers
        self.compile_s = 0.0
        self.procs = []
        self.helper_of = {}          # case id -> index of the helper that compiles its variant
        self.done = set()            # case ids a helper has finished (compiled or failed)

    @property
    def started(self) -> bool:
        return bool(self.procs)

    def before_case(self, index: int) -> None:
        """Wait until the helper that compiles this case's variant is done with it (or has exited)."""
        k = self.helper_of.get(self.cases[index].id)
        if k is None:
            return
        proc, deadline = self.procs[k][0], time.monotonic() + WAIT_LIMIT_S
        while self.cases[index].id not in self.done and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            self._read_log(k)
        self._read_log(k)

    def _read_log(self, k: int) -> None:
        text = (self.work_dir / f"helper{k + 1}.log").read_text()
        for line in text.split("\n")[:-1]:          # whole lines only: the last may be half written
            if line.startswith(DONE_MARK):
                self.done.add(line[len(DONE_MARK):])

    def after_case(self, index: int, result) -> None:
        """Called after cases[index] ran; starts the helpers the first time compiling passes COLD_AFTER_S."""
        t = result.timings or {}
        self.compile_s += max(0.0, t.get("kernel_first", 0.0) - t.get("kernel", 0.0))
        if self.started or self.helpers < 1 or self.compile_s < COLD_AFTER_S:
            return
        reached = {compile_key(c) for c in self.cases[:index + 1]}
        ahead = {}
        for c in self.cases[index + 1:]:
            ahead.setdefault(compile_key(c), c.id)
        if len(ahead) < MIN_VARIANTS_LEFT:
            return
        ids = [i for key, i in ahead.items() if key not in reached]
        self._start(ids)

    def _start(self, ids: list) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        n = min(self.helpers, len(ids))
        print(f"  compiling is slow (cold cache): {n} helper processes compile the {len(ids)} variants ahead",
              flush=True)
        for k in range(n):
            mine = ids[k::n]
            self.helper_of.update((i, k) for i in mine)
            id_file = self.work_dir / f"helper{k + 1}.json"
            id_file.write_text(json.dumps(mine))
            log = open(self.work_dir / f"helper{k + 1}.log", "w")
            cmd = [sys.executable, "-m", "harness", "verify", *self.helper_argv, "--compile-only", str(id_file)]
            env = dict(os.environ, HARNESS_SHARED_DEVICE="1")
            self.procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))

    def finish(self) -> None:
        """Wait for the helpers (they are done or nearly so once the main process has finished)."""
        for proc, log in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()

    def describe(self) -> str:
        return f"1 process, {len(self.procs)} compile helpers" if self.started else "1 process"


def run_compile_only(cases: list, id_file: str, kernel, device: str) -> int:
    """A helper: build each named case's inputs and launch the kernel once, which compiles its
    variant into Triton's cache; judge nothing. A case that fails here fails again, judged, in the
    main process."""
    import torch
    from harness.runner import launch_kernel, prepare_inputs
    wanted = json.loads(Path(id_file).read_text())
    by_id = {c.id: c for c in cases}
    for case_id in wanted:
        if case_id not in by_id:
            continue
        try:
            launch_kernel(kernel, prepare_inputs(by_id[case_id], device, {}), device, {}, twice=False)
        except Exception as e:  # noqa: BLE001 - the main process meets it again and reports it
            print(f"{case_id}: {type(e).__name__}: {e}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{DONE_MARK}{case_id}", flush=True)
    return 0
