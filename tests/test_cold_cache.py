"""verify: one process while Triton's cache is warm, worker processes for the rest once it proves cold."""
import argparse
from pathlib import Path

import harness.cli as cli
import harness.cold_cache as cold_cache
import harness.runner as runner
from harness.cold_cache import COLD_AFTER_S, MIN_VARIANTS_LEFT, ColdCacheWatch, claimed_groups, group_by_variant
from harness.matrix import compile_key, load_suite
from harness.kernels import load_kernel
from harness.runner import run_cases
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


def test_workers_take_each_variant_group_once_largest_first(tmp_path):
    # Two workers walk the same list: each takes the next group nobody has claimed, as it gets there.
    cases = smoke_cases()
    a, b = claimed_groups(cases, tmp_path / "claims"), claimed_groups(cases, tmp_path / "claims")
    first_a, first_b = next(a), next(b)
    rest_a, rest_b = list(a), list(b)                  # a takes all that is left, b finds nothing
    assert rest_b == []
    order = [first_a, first_b, *rest_a]
    assert [len(g) for g in order] == sorted((len(g) for g in order), reverse=True)
    keys = [compile_key(g[0]) for g in order]
    assert all(compile_key(c) == k for g, k in zip(order, keys) for c in g)   # one variant per group
    assert len(set(keys)) == len(keys)                                         # taken once
    assert sorted(c.id for g in order for c in g) == sorted(c.id for c in cases)  # none lost
    assert list(claimed_groups(cases, tmp_path / "claims")) == []              # a late worker: nothing


def result(case, first, warm=0.001):
    return Result(id=case.id, status="PASS", axes={}, timings={"kernel_first": first, "kernel": warm})


def test_warm_cache_never_stops_the_run():
    cases = group_by_variant(smoke_cases())
    watch = ColdCacheWatch(cases)
    assert not any(watch(i, result(c, first=0.02)) for i, c in enumerate(cases))  # cached: milliseconds


def test_loading_many_cached_variants_is_no_cold_cache():
    cases = group_by_variant(smoke_cases())
    watch = ColdCacheWatch(cases)
    loads = [result(c, first=cold_cache.COMPILE_MIN_S) for c in cases]   # each at the limit, together far past
    assert len(loads) * cold_cache.COMPILE_MIN_S > COLD_AFTER_S
    assert not any(watch(i, r) for i, r in enumerate(loads))


def test_cold_cache_stops_the_run_once_compiling_passes_the_limit():
    cases = group_by_variant(smoke_cases())
    assert len({compile_key(c) for c in cases}) > MIN_VARIANTS_LEFT + 2
    watch = ColdCacheWatch(cases)
    asks = [watch(i, result(c, first=COLD_AFTER_S / 2 + 0.01)) for i, c in enumerate(cases[:5])]
    assert asks == [False, True, False, False, False]    # after the second slow compile, and only once
    assert not any(ColdCacheWatch(cases, enabled=False)(i, result(c, first=10.0)) for i, c in enumerate(cases))


def test_no_workers_for_the_last_few_variants():
    cases = group_by_variant(smoke_cases())
    keys = [compile_key(c) for c in cases]
    late = next(i for i in range(len(cases)) if len(set(keys[i + 1:])) < MIN_VARIANTS_LEFT)
    assert not ColdCacheWatch(cases)(late, result(cases[late], first=10.0))


def cold_setup(monkeypatch, seeds=1):
    suite = load_suite(ROOT / "cases" / "smoke.yaml")
    monkeypatch.setattr(cli, "_gpu_available", lambda: True)
    monkeypatch.setattr(cold_cache, "COLD_AFTER_S", 0.0)
    monkeypatch.setattr(cold_cache, "MIN_VARIANTS_LEFT", 1)
    monkeypatch.setattr(cold_cache, "default_workers", lambda: 2)
    filt = "q=fp8,kv=fp8,out=bf16,gqa=8:2,d=128,bs=16,seqs=decode"
    args = argparse.Namespace(cases=str(suite.path), filter=filt, case=None, seeds=seeds, shard=None, jobs=None,
                              kernel=None, progress=False, case_ids=None)
    _, cases = cli.select_cases(args)
    return suite, args, cases


def test_a_worker_never_starts_workers_of_its_own(tmp_path, monkeypatch):
    suite, args, cases = cold_setup(monkeypatch)
    monkeypatch.setattr(runner, "SHARED_DEVICE", True)     # as HARNESS_SHARED_DEVICE=1 sets it
    results, how, variants = cli.run_one_process(args, cases, suite, load_kernel("kernel:unified_attention"),
                                       tmp_path / "run.jsonl", tmp_path / "run.shards")
    assert how == "1 process" and len(results) == len(cases)
    assert not (tmp_path / "run.shards").exists()


def test_cold_run_hands_the_rest_to_workers_with_the_verdicts_of_one_process(tmp_path, monkeypatch):
    # The interpreter compiles nothing, so make the first case look cold; the workers (real
    # processes, no GPU) then take the cases left, each seed of a case with it.
    suite, args, cases = cold_setup(monkeypatch, seeds=2)
    assert len({compile_key(c) for c in cases}) >= 2 and len(cases) >= 4
    results, how, variants = cli.run_one_process(args, cases, suite, load_kernel("kernel:unified_attention"),
                                       tmp_path / "run.jsonl", tmp_path / "run.shards")
    assert how.startswith("1 process, then 2 worker processes")
    assert variants is None                               # workers compiled apart: no count
    assert [r.id for r in results] == [c.id for c in cases]
    alone = {r.id: r for r in run_cases(cases, suite.tolerances, load_kernel("kernel:unified_attention"), "cpu")}
    for r in results:
        assert r.status == alone[r.id].status == "PASS", r.message
        assert r.metrics["max_abs_err"] == alone[r.id].metrics["max_abs_err"]
    logs = sorted((tmp_path / "run.shards").glob("shard*.log"))
    assert len(logs) == 2
