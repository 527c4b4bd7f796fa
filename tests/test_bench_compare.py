"""bench.compare: rows slower beyond the band, broken or missing rows and lost bars fail the
comparison; the committed H200 runs are compared as a user would."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import compare as C

ROOT = Path(__file__).resolve().parent.parent


def row(id_, us, floor_x=None, status="ok", check=True):
    """A bench.run row: status ok, check_failed (timing skipped) or error (check None, or passed
    before timing failed)."""
    return {"id": id_, "status": status, "median_us": us if status == "ok" else None,
            "time_over_floor": floor_x, "check": None if check is None else {"passed": check}}


def run(rows, bars=None, device="NVIDIA H200", backend="cuda"):
    return {"device": device, "backend": backend, "commit": "abc", "rows": rows, "bars": bars or {}}


def bar(measured, met, rows=("a",)):
    return {"target": 0.8, "comparison": ">=", "measured": measured, "met": met, "rows": list(rows)}


def test_rows_are_judged_by_time_over_their_own_floor():
    base = run([row("a", 100, 2.0), row("b", 100, 2.0), row("c", 100, 2.0)])
    new = run([row("a", 120, 2.4), row("b", 120, 2.1), row("c", 80, 1.6)])  # b: a slower lease, same kernel
    c = C.compare(base, new)
    verdicts = {r.id: (r.verdict, round(r.ratio, 3), round(r.time_ratio, 3)) for r in c.rows}
    assert verdicts == {"a": ("slower", 1.2, 1.2), "b": ("", 1.05, 1.2), "c": ("faster", 0.8, 0.8)}
    assert c.regressed and [r.id for r in c.regressions] == ["a"]
    assert not C.compare(base, new, slower=1.25).regressed


def test_on_one_device_the_raw_time_must_agree_and_across_devices_the_floor_decides():
    # The ceilings of two runs on one device differ by measurement (H200 FP8 matmul 1256 and 1465
    # TFLOP/s on two leases): a row whose floor moved but whose time did not is neither slower nor faster.
    base = run([row("a", 100, 2.0), row("b", 100, 2.0), row("c", 100, 2.0)])
    new = run([row("a", 101, 2.4), row("b", 110, 2.2), row("c", 99, 1.6)])
    assert {r.id: r.verdict for r in C.compare(base, new).rows} == {"a": "", "b": "slower", "c": ""}
    other = run(new["rows"], device="NVIDIA H100 80GB HBM3")
    assert {r.id: r.verdict for r in C.compare(base, other).rows} == {"a": "slower", "b": "slower", "c": "faster"}


def test_without_a_floor_the_time_ratio_decides():
    c = C.compare(run([row("a", 100)]), run([row("a", 115)]))
    assert c.rows[0].verdict == "slower" and c.rows[0].ratio == pytest.approx(1.15)


def test_a_row_that_breaks_or_stops_running_regresses_and_one_broken_before_does_not():
    base = run([row("a", 100, 2.0), row("b", 100, 2.0), row("c", 100, 2.0), row("d", None, status="check_failed",
                                                                                check=False)])
    new = run([row("a", None, status="check_failed", check=False), row("b", None, status="error", check=None),
               row("c", None, status="error"), row("d", 300, 6.0)])
    c = C.compare(base, new)
    assert {r.id: r.verdict for r in c.rows} == {"a": "broken", "b": "not run", "c": "not run", "d": ""}
    assert c.regressed


def test_a_lost_bar_regresses_and_bars_over_other_rows_are_not_compared():
    base = run([row("a", 100, 2.0)], bars={"x": bar(0.85, True), "y": bar(0.85, True, rows=("a", "z"))})
    new = run([row("a", 100, 2.0)], bars={"x": bar(0.79, False), "y": bar(0.5, False, rows=("a",))})
    c = C.compare(base, new)
    assert [(b.name, b.lost) for b in c.bars] == [("x", True)]
    assert c.regressed and "bars lost: x" in C.summary_line(c)


def test_a_bar_neither_run_measured_is_left_out():
    # Two prefill-only runs (--filter prefill): the decode bars select no row in either.
    bars = {"decode_x": bar(None, False, rows=()), "prefill_x": bar(1.0, True)}
    c = C.compare(run([row("a", 100, 2.0)], bars), run([row("a", 100, 2.0)], bars))
    assert [b.name for b in c.bars] == ["prefill_x"]


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(run([row("a", 100, 2.0)])))
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps(run([row("a", 100, 2.0)], backend="interpreter")))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(run([row("b", 100, 2.0)])))
    (tmp_path / "junk.json").write_text("{")
    for args, why in (([str(good), str(cpu)], "not GPU speed"), ([str(good), str(tmp_path / "none.json")], "no such file"),
                      ([str(good), str(other)], "share no row id"), ([str(good), str(tmp_path / "junk.json")], "not JSON"),
                      ([str(good), str(good), "--slower", "0.9"], "must be > 1")):
        assert C.main(args) == C.EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1


def test_the_committed_h200_runs(tmp_path, capsys):
    """results/h200: bench_before.json (kernel e7c7113) against bench_6559381.json: the unmasked
    block-table load of 6559381 slowed the FP8-cache decode with blocks of 16 by 5-10%. (The
    bf16-q 4 x 4096 prefill with blocks of 16, 1.059x floor-relative, moved 1.037x in time: within
    the band on one device.)"""
    before, after = ROOT / "results/h200/bench_before.json", ROOT / "results/h200/bench_6559381.json"
    md = tmp_path / "speed.md"
    assert C.main([str(before), str(after), "--markdown", str(md)]) == C.EXIT_REGRESSED
    out = capsys.readouterr().out
    slower = {line.split("  ")[0] for line in out.splitlines() if line.endswith("slower")}
    assert slower == {"decode 64x8192 bs16 q=fp8 kv=fp8", "decode 64x8192 bs16 q=bf16 kv=fp8",
                      "decode 64x4096 bs16 q=fp8 kv=fp8", "decode 64x4096 bs16 q=bf16 kv=fp8",
                      "decode 256x1024 bs16 q=fp8 kv=fp8"}
    assert "45 rows compared, 5 slower than 1.05x" in out and "bars lost: none" in out
    assert md.read_text().startswith("# Kernel speed: REGRESSED")
    assert C.main([str(before), str(after), "--slower", "1.15"]) == C.EXIT_OK
    capsys.readouterr()
    # Across machines each time is divided by its own run's floor, and the report says so.
    C.main([str(ROOT / "results/h100/bench.json"), str(after)])
    assert "The devices differ" in capsys.readouterr().out


def test_the_committed_fix_took_the_regression_back():
    """bench_fe3be10.json (the visible load masked again, a later lease) against bench_6559381.json:
    the six rows are faster again and nothing is slower."""
    assert C.main([str(ROOT / "results/h200/bench_6559381.json"),
                   str(ROOT / "results/h200/bench_fe3be10.json")]) == C.EXIT_OK


def test_a_lease_whose_matmul_ceiling_read_high_is_no_regression():
    """bench_prefill_bf16q.json (lease 45: FP8 matmul read 1465 TFLOP/s) against bench_84ba067.json (lease
    42: 1256): the FP8-q prefill rows, unchanged code, read 1.17-1.19x floor-relative but kept their
    times within 1.016x; the two bf16-q FP8-cache rows the tiling change sped up are faster."""
    c = C.compare(C.load_run(ROOT / "results/h200/bench_84ba067.json"), C.load_run(ROOT / "results/h200/bench_prefill_bf16q.json"))
    assert not c.regressed
    assert {r.id for r in c.rows if r.verdict == "faster"} == {"prefill 4x4096 bs64 q=bf16 kv=fp8",
                                                               "prefill 1x8192 bs64 q=bf16 kv=fp8"}
    assert max(r.ratio for r in c.rows if "q=fp8" in r.id) > 1.15   # what the floor alone would have flagged


def test_each_run_names_the_kernel_it_timed():
    # Two kernels timed on one machine (bench.run --kernel): the comparison says which is which.
    base = dict(run([row("a", 100, 2.0)]), kernel="kernel:unified_attention")
    new = dict(run([row("a", 100, 2.0)]), kernel="my_variant:unified_attention", kernel_modified=None)
    text = C.render_terminal(C.compare(base, new))
    assert "base: kernel:unified_attention at abc on NVIDIA H200" in text
    assert "new:  my_variant:unified_attention at abc on NVIDIA H200" in text
    assert C._label(run([])) == "abc on NVIDIA H200"  # runs stored before --kernel existed name none


def test_two_runs_of_one_kernel_source_say_so():
    same = C.render_terminal(C.compare(dict(run([row("a", 100, 2.0)]), kernel_sha256="f00d"),
                                       dict(run([row("a", 104, 2.1)]), kernel_sha256="f00d")))
    assert "Both runs timed the same kernel source (sha256 f00d)" in same
    other = C.render_terminal(C.compare(dict(run([row("a", 100, 2.0)]), kernel_sha256="f00d"),
                                        dict(run([row("a", 104, 2.1)]), kernel_sha256="beef")))
    assert "same kernel source" not in other
