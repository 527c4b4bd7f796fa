"""Sharded runs merge into the verdicts of an unsharded run, case by case."""
import json
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


def test_run_isolated_names_each_case_its_worker_died_in(tmp_path, monkeypatch):
    # Workers stand in for themselves: each takes its ids in the matrix's order, runs them grouped by
    # compiled variant (as verify does) and dies at the first case in `deadly`. With the matrix
    # [a1, b1, a2, b2] (a and b two compiled variants), the first worker runs a1 a2 b1 b2 and dies in
    # a1; the second gets b1 a2 b2, runs b1 b2 a2 and dies in b2 after finishing b1.
    from harness import merge
    from harness.cold_cache import variant_groups
    from harness.matrix import load_suite
    a, b = [g for g in variant_groups(list(load_suite(ROOT / "cases" / "smoke.yaml").cases)) if len(g) >= 2][:2]
    cases = [a[0], b[0], a[1], b[1]]
    deadly = {a[0].id, b[1].id}

    def fake_run_shards(command, argv, jobs, work_dir):
        ids = set(json.loads(Path(argv[argv.index("--case-ids") + 1]).read_text()))
        work_dir.mkdir(parents=True)
        (work_dir / "shard1.log").write_text("verify: ...\n")
        got = []
        for group in variant_groups([c for c in cases if c.id in ids]):
            for c in group:
                if c.id in deadly:
                    return [(got, {})]
                got.append(Result(id=c.id, status="PASS", axes=c.axis_values()))
        return [(got, {"wall_s": 1.0})]

    monkeypatch.setattr(merge, "run_shards", fake_run_shards)
    results = merge.run_isolated([], tmp_path, cases)
    assert sorted(r.id for r in results) == sorted(c.id for c in cases)
    assert {r.id for r in results if r.status == "ERROR"} == deadly
    assert all("died while running this case" in r.message for r in results if r.status == "ERROR")
