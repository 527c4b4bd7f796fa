"""Sharded runs merge into the verdicts of an unsharded run, case by case."""
import subprocess
import sys
from pathlib import Path

import pytest

from harness.merge import merge_runs
from harness.reports import load_results_json
from harness.schema import Result

ROOT = Path(__file__).resolve().parent.parent
FILTER = "q=fp8,kv=fp8,gqa=8:2,d=128,bs=16,seqs=decode"


def verify(tmp_path, *extra):
    cmd = [sys.executable, "-m", "harness", "verify", "--cases", "cases/smoke.yaml", "--filter", FILTER,
           "--report-dir", str(tmp_path), "--no-progress", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def verdicts(path):
    results, _ = load_results_json(path)
    return {r.id: r.status for r in results}


def test_jobs_and_merge_match_an_unsharded_run(tmp_path):
    whole = verify(tmp_path, "--run-id", "whole")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    jobs = verify(tmp_path, "--run-id", "jobs", "--jobs", "2")
    assert jobs.returncode == 0, jobs.stdout + jobs.stderr
    expected = verdicts(tmp_path / "whole" / "results.json")
    assert len(expected) >= 3
    assert verdicts(tmp_path / "jobs" / "results.json") == expected

    shards = [tmp_path / "jobs.shards" / f"shard{k}" / "results.json" for k in (1, 2)]
    merged = subprocess.run([sys.executable, "-m", "harness", "merge", *map(str, shards), "--out",
                             str(tmp_path / "merged")], cwd=ROOT, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert verdicts(tmp_path / "merged" / "results.json") == expected
    assert set(verdicts(shards[0])).isdisjoint(verdicts(shards[1]))


def test_a_worker_that_finds_every_variant_group_taken_reports_no_case_and_succeeds(tmp_path):
    claims = ["--claim-dir", str(tmp_path / "claims")]
    first = verify(tmp_path, "--run-id", "w1", *claims)
    late = verify(tmp_path, "--run-id", "w2", *claims)
    assert first.returncode == 0 and late.returncode == 0, late.stdout + late.stderr
    assert len(verdicts(tmp_path / "w1" / "results.json")) >= 3
    assert verdicts(tmp_path / "w2" / "results.json") == {}


def test_a_case_in_two_shards_is_refused():
    r = Result(id="a", status="PASS", axes={})
    with pytest.raises(ValueError, match="case a appears in two shard results"):
        merge_runs([([r], {}), ([r], {})])
