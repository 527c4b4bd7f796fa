"""`verify --memcheck`: every case in a process of its own under compute-sanitizer's memcheck.

A read or write outside any allocation rarely faults (the allocator packs tensors into larger
segments) and rarely changes a number, so the other checks cannot see it. Under memcheck, with
PyTorch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor its own
allocation, so memcheck knows its exact end), each case's kernel runs instrumented; a case with a
memcheck error becomes an ERROR row naming the first error and the log that holds them all. One
process per case ties each error to its case; `jobs` of them run side by side on the device.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.schema import Result

MEMCHECK_EXIT = 86  # compute-sanitizer's exit status when it found an error (--error-exitcode)
PRINT_LIMIT = 4     # errors printed in full per case; the summary counts them all
DEFAULT_JOBS = 8
# The lines that open an error report in compute-sanitizer's log, after its "========= " prefix.
_ERROR_START = re.compile(r"^=+ (Invalid .*|Program hit .*|Malloc/Free error.*|Uninitialized .*|Leaked .*)$")
_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error")


def find_sanitizer() -> str | None:
    """compute-sanitizer's path: HARNESS_SANITIZER, else on PATH, else in CUDA's usual folders."""
    if os.environ.get("HARNESS_SANITIZER"):
        return os.environ["HARNESS_SANITIZER"]
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        path = Path(home or "") / "bin" / "compute-sanitizer"
        if home and path.is_file():
            return str(path)
    return None


def first_error(log: str) -> tuple:
    """(errors counted, the first error in one line) from a compute-sanitizer log."""
    lines = [line.rstrip() for line in log.splitlines()]
    counts = [int(m.group(1)) for m in map(_SUMMARY.search, lines) if m]
    first = ""
    for i, line in enumerate(lines):
        m = _ERROR_START.match(line)
        if m:
            # The report's next lines say where (at KERNEL+0x.. in FILE:LINE) and what it missed.
            detail = [lines[j].lstrip("= ").strip() for j in range(i + 1, min(i + 5, len(lines)))
                      if lines[j].lstrip("= ").startswith(("at ", "and is "))]
            first = "; ".join([m.group(1), *detail])
            break
    return (counts[0] if counts else 0), first


def _judged(result: Result | None, rc: int, log: Path, output: Path, case) -> Result:
    """The case's row: its own verdict, unless memcheck found an error (in `log`) or the process
    ended before its result (its `output` says why)."""
    if rc == MEMCHECK_EXIT:
        # No verdict on the numbers: memcheck ends the CUDA context at its first error, so the
        # case's kernel did not finish (plain `verify` judges them).
        count, first = first_error(log.read_text(errors="replace") if log.is_file() else "")
        return Result(id=case.id, status="ERROR", axes=case.axis_values(),
                      timings=result.timings if result else {},
                      message=f"memcheck: {count} error(s), the first: {first or 'see the log'} (log: {log})")
    if result is None:
        said = output.read_text(errors="replace") if output.is_file() else ""
        last = next((line for line in reversed(said.splitlines()) if line.strip()), "no output")
        return Result(id=case.id, status="ERROR", axes=case.axis_values(),
                      message=f"memcheck: the case's process ended (exit {rc}) before its result: {last[:200]} "
                              f"(log: {output})")
    return result


def run_under_memcheck(argv_common: list, cases: list, work_dir: Path, jobs: int, sanitizer: str) -> list:
    """Each case in `python -m harness verify` under `sanitizer`'s memcheck, `jobs` at a time;
    the rows in the cases' order."""
    from harness.reports import load_results_json
    work_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", HARNESS_SHARED_DEVICE="1")

    def run(numbered):
        i, case = numbered
        name = f"case{i:04d}"
        ids = work_dir / f"{name}.json"
        ids.write_text(json.dumps([case.id]))
        log = work_dir / f"{name}.memcheck.log"
        cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", str(MEMCHECK_EXIT),
               "--print-limit", str(PRINT_LIMIT), "--log-file", str(log),
               sys.executable, "-m", "harness", "verify", *argv_common, "--case-ids", str(ids),
               "--threads", "1", "--no-progress", "--report-dir", str(work_dir), "--run-id", name]
        output = work_dir / f"{name}.log"
        with open(output, "w") as out:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        saved = work_dir / name / "results.json"
        got = load_results_json(saved)[0] if saved.is_file() else []
        return _judged(got[0] if got else None, rc, log, output, case)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(run, enumerate(cases)))
