"""verify --threads: several cases judged at once in one process give one process's verdicts."""
import subprocess
import sys
from pathlib import Path

import harness.runner as runner
from harness.matrix import load_suite
from harness.kernels import load_kernel
from harness.runner import run_cases
from harness.schema import Result

ROOT = Path(__file__).resolve().parent.parent
FILTER = "q=fp8,kv=fp8,out=bf16,gqa=8:2,d=128,bs=16"


def some_cases(n=6):
    suite = load_suite(ROOT / "cases" / "smoke.yaml")
    cases = [c for c in suite.cases if c.id.startswith(FILTER)][:n]
    assert len(cases) == n
    return suite, cases


def test_threads_give_the_same_results_in_the_same_order():
    suite, cases = some_cases()
    kernel = load_kernel(runner.DEFAULT_KERNEL)
    alone = run_cases(cases, suite.tolerances, kernel, "cpu", progress=False)
    threaded = run_cases(cases, suite.tolerances, kernel, "cpu", progress=False, threads=3)
    assert [r.id for r in threaded] == [c.id for c in cases]
    for a, t in zip(alone, threaded):
        assert t.status == a.status == "PASS", t.message
        assert t.metrics["max_abs_err"] == a.metrics["max_abs_err"]
        assert t.metrics["n_nondeterministic"] == 0


def test_a_stop_starts_no_further_case_and_keeps_those_running(monkeypatch):
    suite, cases = some_cases()
    calls = []

    def fake_run_case(case, *args):
        calls.append(case.id)
        return Result(id=case.id, status="PASS", axes={}, timings={})
    monkeypatch.setattr(runner, "run_case", fake_run_case)
    results = run_cases(cases, suite.tolerances, None, "cpu", progress=False, threads=2,
                        stop_after=lambda i, r: True)
    # The first finished case asks to stop: at most the two cases already started have run.
    assert 1 <= len(results) == len(calls) <= 2
    assert [r.id for r in results] == [c.id for c in cases[:len(results)]]
    one = run_cases(cases, suite.tolerances, None, "cpu", progress=False, stop_after=lambda i, r: i == 2)
    assert [r.id for r in one] == [c.id for c in cases[:3]]


def test_a_case_that_crashes_on_a_thread_is_an_error_row_beside_the_others():
    from harness.inputs import build_inputs
    from kernel import unified_attention
    suite, cases = some_cases(4)
    shapes = [tuple(build_inputs(c).kernel_kwargs["out"].shape) for c in cases]
    bad_shape = shapes[1]

    def kernel_failing_on_one_shape(**kw):
        if tuple(kw["out"].shape) == bad_shape:
            raise RuntimeError("boom")
        return unified_attention(**kw)
    results = run_cases(cases, suite.tolerances, kernel_failing_on_one_shape, "cpu", progress=False, threads=2)
    assert [r.id for r in results] == [c.id for c in cases]
    for r, shape in zip(results, shapes):
        if shape == bad_shape:
            assert r.status == "ERROR" and "kernel: RuntimeError: boom" in r.message
        else:
            assert r.status == "PASS", r.message
    assert any(shape != bad_shape for shape in shapes)


def test_threads_must_be_positive(tmp_path):
    p = subprocess.run([sys.executable, "-m", "harness", "verify", "--threads", "0", "--report-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert "--threads 0: must be >= 1" in p.stderr


def test_the_e2e_reference_is_computed_once_per_key_and_judges_the_same():
    suite, cases = some_cases(4)
    kernel = load_kernel(runner.DEFAULT_KERNEL)
    runner.E2E_CACHE.entries.clear()
    runner.E2E_CACHE.bytes = 0
    first = run_cases(cases, suite.tolerances, kernel, "cpu", progress=False)
    assert 0 < len(runner.E2E_CACHE.entries) <= len(cases)
    again = run_cases(cases, suite.tolerances, kernel, "cpu", progress=False, threads=2)  # every e2e cached
    for a, b in zip(first, again):
        assert a.metrics["e2e_max_abs_err"] == b.metrics["e2e_max_abs_err"]
        assert a.metrics["e2e_mean_abs_err"] == b.metrics["e2e_mean_abs_err"]


def test_the_e2e_cache_drops_the_least_recently_used_beyond_its_bytes():
    import torch
    cache = runner._E2ECache(max_bytes=3 * 400)
    for k in "abc":
        cache.put(k, torch.zeros(100))
    assert cache.get("a") is not None          # a is now the most recently used
    cache.put("d", torch.zeros(100))
    assert list(cache.entries) == ["c", "a", "d"] and cache.bytes == 1200
    cache.put("d", torch.zeros(100))           # already there: nothing changes
    assert cache.bytes == 1200 and cache.get("b") is None


def test_compiled_variants_counts_the_triton_functions_of_the_kernels_module(monkeypatch):
    import types

    class FakeJit:  # a JITFunction's device_caches: device -> (compiled kernels by key, ...)
        def __init__(self, n):
            self.device_caches = {0: ({i: object() for i in range(n)}, {}, None, None, None)}
    module = types.ModuleType("fake_kernels")
    module.attention = FakeJit(3)
    module.reduce = FakeJit(0)
    module.helper = lambda: None

    def entry():
        pass
    entry.__module__ = "fake_kernels"
    monkeypatch.setitem(sys.modules, "fake_kernels", module)
    assert runner.compiled_variants(entry) == {"attention": 3}
    # Under the interpreter nothing is compiled: no count rather than a zero.
    assert runner.compiled_variants(load_kernel(runner.DEFAULT_KERNEL)) is None


def test_a_case_out_of_memory_beside_another_thread_runs_again_alone(tmp_path, monkeypatch):
    import argparse

    import harness.cli as cli
    suite, cases = some_cases(4)
    tries = {}

    def fake_run_case(case, *args):
        tries[case.id] = tries.get(case.id, 0) + 1
        if case.id == cases[2].id and tries[case.id] == 1:
            return Result(id=case.id, status="ERROR", axes={}, timings={},
                          message="reference: OutOfMemoryError: CUDA out of memory")
        return Result(id=case.id, status="PASS", axes={}, timings={})
    monkeypatch.setattr(runner, "run_case", fake_run_case)
    args = argparse.Namespace(jobs=None, progress=False)
    results, how, variants = cli.run_one_process(args, cases, suite, None, tmp_path / "run.jsonl", tmp_path / "shards",
                                       threads=2)
    assert how == "1 process, 2 threads"
    assert [r.id for r in results] == [c.id for c in cases] and all(r.status == "PASS" for r in results)
    assert tries[cases[2].id] == 2 and all(tries[c.id] == 1 for c in cases if c is not cases[2])
