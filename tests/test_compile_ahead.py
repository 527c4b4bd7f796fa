"""One process, grouped by compiled variant; helpers start only when compiling proves slow."""
import json
import subprocess
import sys
from pathlib import Path

from harness.compile_ahead import COLD_AFTER_S, DONE_MARK, MIN_VARIANTS_LEFT, CompileAhead, group_by_variant
from harness.matrix import compile_key, load_suite
from harness.schema import Result

ROOT = Path(__file__).resolve().parent.parent


def smoke_cases():
    return load_suite(ROOT / "cases" / "smoke.yaml").cases


def test_group_by_variant_keeps_each_variant_together_and_loses_nothing():
    cases = smoke_cases()
    ordered = group_by_variant(cases)
    assert sorted(c.id for c in ordered) == sorted(c.id for c in cases)
    keys = [compile_key(c) for c in ordered]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(keys))          # each variant's cases are one contiguous run


class Recorder(CompileAhead):
    def _start(self, ids):
        self.asked = ids
        self.procs = [("fake", None)]

    def finish(self):
        pass


def result(case, first, warm=0.001):
    return Result(id=case.id, status="PASS", axes={}, timings={"kernel_first": first, "kernel": warm})


def test_warm_cache_starts_no_helper():
    cases = group_by_variant(smoke_cases())
    ahead = Recorder(cases, [], Path("unused"), helpers=4)
    for i, c in enumerate(cases):
        ahead.after_case(i, result(c, first=0.02))      # loading a cached variant: milliseconds
    assert not ahead.started and ahead.describe() == "1 process"


def test_cold_cache_hands_the_variants_not_reached_to_helpers():
    cases = group_by_variant(smoke_cases())
    keys = list(dict.fromkeys(compile_key(c) for c in cases))
    assert len(keys) > MIN_VARIANTS_LEFT + 2
    ahead = Recorder(cases, [], Path("unused"), helpers=4)
    i = 0
    while not ahead.started:
        ahead.after_case(i, result(cases[i], first=COLD_AFTER_S / 2 + 0.01))
        i += 1
    reached = {compile_key(c) for c in cases[:i]}
    asked = [next(c for c in cases if c.id == cid) for cid in ahead.asked]
    assert {compile_key(c) for c in asked} == set(keys) - reached   # one case per variant not reached
    assert len(asked) == len(keys) - len(reached)
    assert ahead.describe() == "1 process, 1 compile helpers"


def test_no_helpers_when_few_variants_are_left():
    cases = group_by_variant(smoke_cases())
    ahead = Recorder(cases, [], Path("unused"), helpers=4)
    keys = [compile_key(c) for c in cases]
    last_groups_start = next(i for i in range(len(cases)) if len(set(keys[i:])) < MIN_VARIANTS_LEFT)
    ahead.after_case(last_groups_start, result(cases[last_groups_start], first=10.0))
    assert not ahead.started


def test_compile_only_helper_runs_named_cases_and_writes_no_report(tmp_path):
    case_id = smoke_cases()[0].id
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([case_id, "no-such-case"]))
    proc = subprocess.run([sys.executable, "-m", "harness", "verify", "--cases", "cases/smoke.yaml",
                           "--report-dir", str(tmp_path / "reports"), "--compile-only", str(ids)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{DONE_MARK}{case_id}\n" in proc.stdout
    assert not (tmp_path / "reports").exists()


def test_the_run_waits_at_a_variant_until_its_helper_has_compiled_it(tmp_path):
    cases = group_by_variant(smoke_cases())
    firsts = [i for i, c in enumerate(cases) if i == 0 or compile_key(cases[i - 1]) != compile_key(c)]
    wanted = [cases[firsts[1]].id, cases[firsts[2]].id]
    ahead = CompileAhead(cases, ["--cases", "cases/smoke.yaml"], tmp_path, helpers=2)
    ahead._start(wanted)
    assert ahead.helper_of == {wanted[0]: 0, wanted[1]: 1}
    ahead.before_case(firsts[2])
    assert wanted[1] in ahead.done
    ahead.before_case(firsts[1])
    ahead.finish()
    assert set(wanted) <= ahead.done
    assert all(proc.returncode == 0 for proc, _ in ahead.procs)
    ahead.before_case(0)                            # a case no helper compiles: no wait
