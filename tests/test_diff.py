"""harness.diff and `python -m harness diff`: flips, new errors, error growth, one-sided cases, exit codes."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # also under plain `pytest`
from harness import diff as D  # noqa: E402
from harness.cli import main  # noqa: E402
from harness.reports import results_json  # noqa: E402
from harness.schema import Result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def result(cid, status="PASS", err=4e-3, ratio=0.3, message=""):
    if status == "ERROR":
        return Result(id=cid, status="ERROR", axes={}, message=message or "kernel: RuntimeError: boom")
    return Result(id=cid, status=status, axes={}, metrics={"max_abs_err": err, "tol_ratio": ratio},
                  rules={"tolerance": {"passed": status == "PASS", "ratio": ratio}},
                  message=message or ("tolerance rule: ratio > 1" if status == "FAIL" else ""))


def write(path: Path, results, meta=None) -> Path:
    path.write_text(json.dumps(results_json(results, meta or {}), allow_nan=False))
    return path


def base_run():
    return [result(f"case{i}", err=1e-3 * (i + 1), ratio=0.1 * (i + 1)) for i in range(4)]


def test_identical_runs_exit_0(tmp_path, capsys):
    b = write(tmp_path / "b.json", base_run())
    n = write(tmp_path / "n.json", base_run())
    assert main(["diff", str(b), str(n)]) == 0
    assert "OK: 0 flipped" in capsys.readouterr().out


def test_error_grown_2_5x_exits_1(tmp_path, capsys):
    new = base_run()
    new[2] = result("case2", err=new[2].metrics["max_abs_err"] * 2.5, ratio=new[2].metrics["tol_ratio"])
    assert new[2].status == "PASS"   # still passing, yet a regression
    b, n = write(tmp_path / "b.json", base_run()), write(tmp_path / "n.json", new)
    assert main(["diff", str(b), str(n)]) == 1
    out = capsys.readouterr().out
    assert "Grew 2x or more: 1" in out and "case2" in out and "2.50x" in out and "REGRESSION" in out
    # a looser factor lets the same growth through
    assert main(["diff", str(b), str(n), "--growth", "3"]) == 0


def test_an_error_that_doubled_exits_1(tmp_path, capsys):
    new = base_run()
    new[1] = result("case1", err=new[1].metrics["max_abs_err"] * 2, ratio=new[1].metrics["tol_ratio"] * 2)
    b, n = write(tmp_path / "b.json", base_run()), write(tmp_path / "n.json", new)
    assert main(["diff", str(b), str(n)]) == 1
    assert "case1" in capsys.readouterr().out


def test_growth_limits_and_tiny_errors():
    base = [result("a", err=1e-3, ratio=0.2), result("b", err=1e-7, ratio=0.01), result("c", err=2e-3, ratio=0.1),
            result("d", err=0.0, ratio=0.0)]
    new = [result("a", err=1.9e-3, ratio=0.38),       # 1.9x: under the factor
           result("b", err=9e-7, ratio=0.09),         # 9x, but both errors below 1e-6
           result("c", err=2e-3, ratio=0.25),         # tol ratio alone grew 2.5x
           result("d", err=1e-3, ratio=0.1)]          # from exactly 0
    d = D.compare(base, new)
    assert [c.id for c in d.grown] == ["d", "c"]
    assert d.grown[1].grown == "tol_ratio" and d.grown[1].growth == pytest.approx(2.5)
    assert math.isinf(d.grown[0].growth)
    assert d.regressed


def test_nan_error_counts_as_growth():
    d = D.compare([result("a", err=1e-3)], [result("a", status="FAIL", err=math.nan, ratio=math.inf)])
    assert [c.id for c in d.flips] == ["a"] and not d.grown   # a flip is reported once, as a flip
    d = D.compare([result("a", status="FAIL", err=0.1, ratio=5)],
                  [result("a", status="FAIL", err=math.nan, ratio=math.inf)])
    assert [c.id for c in d.grown] == ["a"]


def test_flips_new_errors_fixed_and_one_sided(tmp_path, capsys):
    base = [result("pass_to_fail"), result("pass_to_error"), result("fail_to_error", "FAIL", 0.5, 3.0),
            result("fail_to_pass", "FAIL", 0.5, 3.0), result("error_stays", "ERROR"), result("gone")]
    new = [result("pass_to_fail", "FAIL", 0.5, 3.0), result("pass_to_error", "ERROR"),
           result("fail_to_error", "ERROR", message="kernel: ValueError: bad"), result("fail_to_pass"),
           result("error_stays", "ERROR"), result("added", "ERROR")]
    d = D.compare(base, new)
    assert [c.id for c in d.flips] == ["pass_to_fail", "pass_to_error"]
    assert [c.id for c in d.new_errors] == ["fail_to_error"]
    assert [c.id for c in d.fixed] == ["fail_to_pass"]
    assert [c.id for c in d.only_base] == ["gone"] and [c.id for c in d.only_new] == ["added"]
    assert d.n_common == 5 and d.regressed

    b, n = write(tmp_path / "b.json", base), write(tmp_path / "n.json", new)
    md = tmp_path / "summary.md"
    assert main(["diff", str(b), str(n), "--markdown", str(md)]) == 1
    out = capsys.readouterr().out
    for title in ("Flipped PASS -> FAIL/ERROR: 2", "New errors (FAIL -> ERROR): 1", "Fixed", "Only in base: 1",
                  "Only in new: 1"):
        assert title in out
    text = md.read_text()
    assert text.startswith("# Results diff: REGRESSION")
    assert "## Flipped PASS -> FAIL/ERROR (2)" in text and "`pass_to_error`" in text
    assert "## Only in new (1) (informational)" in text and "kernel: ValueError: bad" in text


def test_only_in_one_file_does_not_fail(tmp_path, capsys):
    b = write(tmp_path / "b.json", base_run())
    n = write(tmp_path / "n.json", base_run()[:2] + [result("extra")])
    assert main(["diff", str(b), str(n)]) == 0
    out = capsys.readouterr().out
    assert "Only in base: 2" in out and "Only in new: 1" in out and "extra" in out


def test_different_tolerances_are_noted():
    d = D.compare(base_run(), base_run(), base_meta={"tolerances": {"x": 1}}, new_meta={"tolerances": {"x": 2}})
    assert any("different tolerances" in n for n in d.notes) and not d.regressed


@pytest.mark.parametrize("content", [None, "not json {", "[1, 2]", '{"meta": {}}',
                                     '{"results": [{"id": "a", "status": "PASS", "bogus": 1}]}',
                                     '{"results": [{"id": "a", "status": "MAYBE", "axes": {}}]}'])
def test_unreadable_input_exits_2(tmp_path, capsys, content):
    good = write(tmp_path / "good.json", base_run())
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["diff", str(good), str(bad)]) == 2
    assert main(["diff", str(bad), str(good)]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_growth_factor_must_exceed_1(tmp_path):
    b = write(tmp_path / "b.json", base_run())
    assert main(["diff", str(b), str(b), "--growth", "1"]) == 2


def test_two_real_runs_of_the_same_kernel_do_not_differ(tmp_path):
    from harness.matrix import filter_cases, load_suite
    from harness.reports import write_reports
    from harness.kernels import load_kernel
    from harness.runner import DEFAULT_KERNEL, default_device, run_cases
    suite = load_suite(ROOT / "cases" / "smoke.yaml")
    cases = filter_cases(suite.cases, "q=fp8,kv=fp8,d=64,seqs=decode")[:2]
    assert len(cases) == 2
    kernel = load_kernel(DEFAULT_KERNEL)
    paths = []
    for name in ("base", "new"):
        results = run_cases(cases, suite.tolerances, kernel, default_device(), progress=False)
        assert all(r.status == "PASS" for r in results)
        paths.append(write_reports(tmp_path / name, results, {"tolerances": suite.tolerances.as_dict()})
                     / "results.json")
    d, _, _ = D.diff_files(*paths)
    assert d.n_common == 2 and not d.regressed and not (d.flips or d.grown or d.only_base or d.only_new)
    assert main(["diff", str(paths[0]), str(paths[1])]) == 0
