"""Error metrics point at the worst element, and a failure says which bound broke and where."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from harness.matrix import load_suite
from harness.metrics import adaptive_rule, beyond_by_group, error_metrics, rule_failure, tolerance_rule
from harness.runner import _ranges, describe_spread, describe_worst, worst_element
from harness.schema import Case

ROOT = Path(__file__).resolve().parent.parent


def _case(seq_lens, heads=(8, 2)) -> Case:
    return Case(q_dtype="fp8", kv_dtype="fp8", out_dtype="bf16", scales=(1.0, 1.0, 1.0), heads=heads,
                head_size=16, block_size=16, num_blocks=64, seqs="mix", seq_lens=tuple(seq_lens))


def test_error_metrics_finds_the_element_furthest_beyond_its_tolerance():
    ref = torch.randn(6, 4, 16, generator=torch.Generator().manual_seed(0))
    out = ref.clone()
    out[1, 0, 0] += 0.1
    out[4, 2, 9] += 0.5
    m = error_metrics(out, ref, atol=1e-3, rtol=1e-2)
    assert m["worst_index"] == [4, 2, 9]
    assert m["worst_got"] == out[4, 2, 9].item() and m["worst_want"] == ref[4, 2, 9].item()
    assert m["n_beyond_tol"] == 2 and m["n_elements"] == ref.numel()


def test_a_nan_is_the_worst_element_whatever_the_finite_errors():
    ref = torch.zeros(3, 2, 8)
    out = ref.clone()
    out[0, 0, 0] = 100.0
    out[2, 1, 3] = float("nan")
    assert error_metrics(out, ref, atol=1e-3, rtol=1e-2)["worst_index"] == [2, 1, 3]


def test_the_worst_token_is_named_by_its_sequence_query_and_key_position():
    case = _case([(3, 10), (1, 7), (4, 4)])  # tokens 0-2: sequence 0, 3: sequence 1, 4-7: sequence 2
    assert worst_element(case, [3, 5, 2]) == {"worst_seq": 1, "worst_query": 0, "worst_head": 5, "worst_dim": 2}
    where = worst_element(case, [6, 7, 11])
    assert where == {"worst_seq": 2, "worst_query": 2, "worst_head": 7, "worst_dim": 11}
    text = describe_worst(case, dict(where, worst_got=0.5, worst_want=-0.25))
    assert text == ("worst at sequence 2 of 3, query 2 of 4 (key 2 of 4), q head 7 (kv 1), dim 11: "
                    "got 0.5, want -0.25")
    assert "(key 8 of 10)" in describe_worst(case, dict(worst_element(case, [1, 0, 0]), worst_got=0, worst_want=0))


def test_elements_beyond_tolerance_are_counted_by_sequence_and_kv_head():
    ref = torch.zeros(6, 4, 8)  # tokens of sequences of 2, 3 and 1 queries; 4 q heads on 2 kv heads
    out = ref.clone()
    out[2, 3, 0] = 1.0         # sequence 1, q head 3: kv head 1
    out[3, 2, 5] = float("nan")  # sequence 1, q head 2: kv head 1
    out[5, 0, 7] = 1e-4        # within tolerance
    spread = beyond_by_group(out, ref, atol=1e-3, rtol=1e-2, q_lens=(2, 3, 1), group=2)
    assert spread == {"beyond_by_seq": [0, 2, 0], "beyond_by_kv_head": [0, 2]}
    assert describe_spread(spread) == "beyond in sequence 1 of 3, kv head 1 of 2"
    out[0, 0, 0] = out[5, 1, 0] = 1.0
    spread = beyond_by_group(out, ref, atol=1e-3, rtol=1e-2, q_lens=(2, 3, 1), group=2)
    assert describe_spread(spread) == "beyond in all 3 sequences, all 2 kv heads"
    spread = beyond_by_group(out, ref, atol=1e-3, rtol=1e-2, q_lens=(2, 3, 1), group=4)
    assert describe_spread(spread) == "beyond in all 3 sequences, its one kv head"


def test_long_lists_of_sequences_read_as_ranges():
    assert _ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert _ranges(list(range(0, 40, 2))) == "0, 2, 4, 6, 8, 10, ... (20 in all)"


def test_a_failure_names_the_bound_that_broke():
    tol = {"atol": 1e-3, "rtol": 1e-2, "mean_atol": 1e-3}
    m = {"tol_ratio": 0.5, "mean_abs_err": 3e-3, "max_abs_err": 1e-3, "n_beyond_tol": 0, "n_elements": 100}
    assert rule_failure("tolerance", tolerance_rule(m, tol), m) == "tolerance rule: mean 3x the bound"
    m = dict(m, tol_ratio=2.5, mean_abs_err=1e-4, n_beyond_tol=7)
    assert rule_failure("tolerance", tolerance_rule(m, tol), m) == \
        "tolerance rule: 7 of 100 elements beyond (worst 2.5x) the bound"
    adaptive = adaptive_rule(m, lowp_max=1e-4, lowp_mean=1e-4, adaptive={"mult": 2, "mean_mult": 2, "atol": 1e-5})
    assert not adaptive["passed"] and rule_failure("adaptive", adaptive, m).startswith("adaptive rule: max 4.76x")
    m = dict(m, tol_ratio=float("nan"))
    assert "elements beyond (worst nanx)" in rule_failure("tolerance", tolerance_rule(m, tol), m)


def test_verify_points_at_the_one_wrong_element(tmp_path):
    """The fixture kernel is ours but for the last query token's q head 1, dim 5: every case fails
    with exactly that element named, on the last sequence of its mix."""
    run = subprocess.run([sys.executable, "-m", "harness", "verify", "--filter", "d=64", "--no-progress",
                          "--kernel", "tests.fixtures.one_wrong_element:unified_attention",
                          "--report-dir", str(tmp_path), "--run-id", "r"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    cases = {c.id: c for c in load_suite(ROOT / "cases" / "smoke.yaml").cases}
    results = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    assert results and all(r["status"] == "FAIL" for r in results)
    for r in results:
        case = cases[r["id"]]
        q_len, kv_len = case.seq_lens[-1]
        n = len(case.seq_lens)
        assert f"tolerance rule: 1 of {r['metrics']['n_elements']} elements beyond" in r["message"]
        kv_heads = case.heads[1]
        kv = 1 // (case.heads[0] // kv_heads)
        spread = (f"sequence {n - 1} of {n}", "its one kv head" if kv_heads == 1 else f"kv head {kv} of {kv_heads}")
        assert f"beyond in {spread[0]}, {spread[1]};" in r["message"]
        assert (f"worst at sequence {n - 1} of {n}, query {q_len - 1} of {q_len} (key {kv_len - 1} of {kv_len}), "
                f"q head 1 (kv {1 // (case.heads[0] // case.heads[1])}), dim 5:") in r["message"]
        assert r["message"] in run.stdout  # the terminal shows the whole line

    # The run names the command that runs its worst case again alone; that command reproduces it.
    line = next(x for x in run.stdout.splitlines() if x.startswith("run the worst again alone: "))
    command = shlex.split(line.split(": ", 1)[1])
    assert command[:4] == ["python", "-m", "harness", "verify"] and "--case" in command
    again = subprocess.run([sys.executable, *command[1:], "--no-progress", "--report-dir", str(tmp_path),
                            "--run-id", "again"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 1, again.stdout + again.stderr
    (alone,) = json.loads((tmp_path / "again" / "results.json").read_text())["results"]
    worst = max(results, key=lambda r: r["metrics"]["tol_ratio"])
    assert alone["id"] == worst["id"] and alone["message"] == worst["message"]
