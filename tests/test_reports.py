"""Reports: every format renders the same run consistently, and write_reports is all-or-nothing."""
from __future__ import annotations

import json
import math
import os
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import reports
from harness.schema import AXES, Result

# 1x1 PNG, enough to check the image is embedded inline.
PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")

DTYPE_PAIRS = [("fp8", "fp8", "bf16"), ("bf16", "fp8", "bf16"), ("fp16", "fp8", "fp16"), ("bf16", "bf16", "bf16")]
BLOCKS = [16, 32, 64]
SEQS = ["decode", "prefill", "mixed"]


def make_axes(q, kv, out, block, seqs, path="2d", seed=0, window=-1):
    return {
        "q_dtype": q, "kv_dtype": kv, "out_dtype": out, "scales": "0.5/0.25/0.125",
        "scale_layout": "tensor", "heads": "8:2", "head_size": 128, "block_size": block,
        "num_blocks": 256, "seqs": seqs, "window": window, "softcap": 0.0, "causal": True,
        "path": path, "layout": "contiguous", "seed": seed,
    }


def case_id(a):
    return (f"{a['q_dtype']}-{a['kv_dtype']}-{a['out_dtype']}_h{a['heads']}_d{a['head_size']}"
            f"_b{a['block_size']}_{a['seqs']}_w{a['window']}_{a['path']}_s{a['seed']}")


def make_results(n=30, gpu=True, seed=0):
    """n synthetic results: mostly PASS, 4 FAIL (one with NaNs in the output), 2 ERROR (one with None metrics)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, kv, o = DTYPE_PAIRS[i % len(DTYPE_PAIRS)]
        a = make_axes(q, kv, o, BLOCKS[i % 3], SEQS[(i // 3) % 3], path="3d" if i % 5 == 0 else "2d",
                      seed=i % 2, window=128 if i % 7 == 0 else -1)
        ratio = rng.uniform(0.02, 0.45) if i % 6 else rng.uniform(0.5, 0.97)
        status, message = "PASS", ""
        if i in (3, 11, 17, 25):
            status = "FAIL"
            ratio = {3: 1.7, 11: 4.2, 17: 1.05, 25: math.inf}[i]
            message = f"tolerance: ratio {ratio} > 1 | 12 elements beyond tol"
        mx = ratio * 0.02
        metrics = {
            "max_abs_err": mx, "mean_abs_err": mx / 8, "max_rel_err": mx * 3, "tol_ratio": ratio,
            "mean_ratio": ratio / 6, "n_beyond_tol": 12 if status == "FAIL" else 0,
            "n_nan": 40 if i == 25 else 0, "n_inf": 0, "n_unwritten": 0,
            "sat_q": rng.randint(0, 3), "sat_k": 0, "sat_v": rng.randint(0, 2),
            "e2e_max_abs_err": mx * 2, "e2e_mean_abs_err": mx / 4, "lowp_max_abs_err": mx * 0.9,
            "adaptive_ratio": ratio * 0.8,
        }
        if gpu:
            metrics["kernel_ms"] = 0.05 + 0.01 * i
        rules = {"tolerance": {"passed": ratio <= 1, "ratio": ratio},
                 "adaptive": {"passed": ratio * 0.8 <= 1, "ratio": ratio * 0.8}}
        if i == 7:
            status, message = "ERROR", "RuntimeError: Triton compile failed\n\x1b[31mout of resources\x1b[0m: shared memory"
            metrics = {k: None for k in metrics}
            rules = {}
        if i == 20:
            status, message, metrics, rules = "ERROR", "ValueError: num_blocks too small", {}, {}
        out.append(Result(id=case_id(a), status=status, axes=a, metrics=metrics, rules=rules, message=message,
                          timings={"inputs": 0.01, "kernel": 0.02 + 0.001 * i, "reference": 0.03}))
    return out


def make_selfcheck(case_ids):
    cases = case_ids[:6]
    variants = [
        ("drop_k_scale", "k_scale not applied", "mutation", 80.0),
        ("off_by_one_block", "last block skipped", "mutation", 35.0),
        ("softcap_ignored", "softcap left out", "mutation", 4.0),
        ("fp16_accum", "accumulate in fp16", "wrapper", 0.6),
    ]
    matrix, out = {}, []
    for k, (name, desc, kind, best) in enumerate(variants):
        row = {c: best / (1 + j) for j, c in enumerate(cases)}
        matrix[name] = row
        out.append({"name": name, "description": desc, "kind": kind, "caught": best >= 1, "best_ratio": best,
                    "killed_by": [c for c, v in row.items() if v > 1]})
    return {"variants": out, "kill_rate": 0.75, "correct_worst_ratio": 0.31, "seeds": 3, "cases": cases,
            "matrix": matrix}


def make_meta(results=None, gpu=True, selfcheck=True):
    meta = {
        "commit": "0123456789abcdef0123456789abcdef01234567", "kernel": "kernel:unified_attention",
        "device": "NVIDIA H100 80GB HBM3" if gpu else "CPU interpreter", "mode": "gpu" if gpu else "interpreter",
        "torch": "2.9.1", "triton": "3.5.1", "cases_file": "cases/smoke.yaml", "seeds": 2,
        "started": "2026-11-25T02:30:00+00:00", "wall_s": 42.5, "jobs": "1 process, 2 threads",
        "compiled_variants": {"_unified_attention_kernel": 207, "_reduce_segments_kernel": 5},
        "tolerances": {"rules": ["tolerance", "adaptive"], "adaptive": {"mult": 2.0},
                       "by_dtype": {"fp8/fp8/bf16": {"atol": 0.05, "rtol": 0.05}}},
        "timing": {"inputs": 1.5, "compile": 20.0, "kernel": 3.2, "reference": 12.0, "reports": 0.4},
        "bench_png_b64": PNG_B64,
    }
    if selfcheck and results is not None:
        meta["selfcheck"] = make_selfcheck([r.id for r in results])
    return meta


@pytest.fixture(scope="module")
def run():
    results = make_results()
    return results, make_meta(results)


def counts_of(results):
    return {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "ERROR")}


# ---------------------------------------------------------------------------------------------- summary

def test_summarize(run):
    results, _ = run
    s = reports.summarize(results)
    assert (s["PASS"], s["FAIL"], s["ERROR"], s["total"]) == (24, 4, 2, 30)
    assert s["counts"] == counts_of(results)
    assert s["worst_id"] == results[25].id and math.isinf(s["worst_ratio"])
    assert s["verdict"] == "FAIL"
    ok = [r for r in results if r.status == "PASS"]
    s2 = reports.summarize(ok)
    assert s2["verdict"] == "PASS"
    assert s2["worst_ratio"] == max(r.metrics["tol_ratio"] for r in ok)
    assert reports.summarize([])["verdict"] == "EMPTY"


# ---------------------------------------------------------------------------------------------- terminal

def test_terminal_failures_first_and_summary(run):
    results, meta = run
    text = reports.render_terminal(results, meta, limit=12)
    lines = text.splitlines()
    assert "kernel:unified_attention" in lines[0] and "NVIDIA H100" in lines[0] and "0123456789ab" in lines[0]
    table_rows = [ln for ln in lines if re.match(r"^(PASS|FAIL|ERROR)\s+\S+_s\d(\s|$)", ln)]
    statuses = [ln.split()[0] for ln in table_rows]
    first_pass = statuses.index("PASS")
    assert statuses[:first_pass] == ["ERROR"] * 2 + ["FAIL"] * 4
    assert set(statuses[first_pass:]) == {"PASS"}
    assert len(table_rows) == 12
    assert "... 18 more passing" in text
    # Worst first among failures (ERRORs have no ratio and count as worst), and among passes.
    fail_ratios = [reports.tol_ratio(r) for r in reports.ordered(results) if r.status == "FAIL"]
    assert fail_ratios == sorted(fail_ratios, reverse=True)
    pass_ids = [ln.split()[1] for ln in table_rows[first_pass:]]
    pass_ratios = [next(r for r in results if r.id == i).metrics["tol_ratio"] for i in pass_ids]
    assert pass_ratios == sorted(pass_ratios, reverse=True)
    assert "kernel_ms" in text and "sat(q/k/v)" in text
    assert re.search(r"^PASS 24  FAIL 4  ERROR 2  worst tol ratio inf \(\S+\) on NVIDIA H100", lines[-1])
    assert "\x1b" not in text
    assert "\x1b[" in reports.render_terminal(results, meta, color=True)


def test_terminal_interpreter_has_no_kernel_ms():
    results = make_results(n=10, gpu=False)
    text = reports.render_terminal(results, make_meta(gpu=False), limit=40)
    assert "kernel_ms" not in text and "more passing" not in text
    assert "on CPU interpreter" in text.splitlines()[-1]


# ---------------------------------------------------------------------------------------------- markdown

def test_markdown_structure(run):
    results, meta = run
    md = reports.render_markdown(results, meta)
    assert md.startswith("# Paged attention check: FAIL")
    i_fail = md.index("## Failures and errors")
    head = md[:i_fail]
    for needle in ("verdict", "24", "NVIDIA H100", "kernel:unified_attention", "0123456789abcdef", "2.9.1",
                   "3.5.1", "cases/smoke.yaml", "2026-11-25", "42.5 s", "compile 20.0 s", "2 threads",
                   "compiled kernel variants", "_unified_attention_kernel 207, _reduce_segments_kernel 5"):
        assert needle in head, needle
    fail_section = md[i_fail:md.index("## Worst tol ratio by axis")]
    for r in results:
        assert (f"`{r.id}`" in fail_section) == (r.status != "PASS")
    # A '|' in a message must not break the table; a newline must not either.
    assert "ratio 1.7 > 1 \\| 12 elements" in fail_section
    table, rerun = fail_section.split("Run the worst again alone:")
    assert all(ln.startswith("|") for ln in table.splitlines()[2:] if ln and not ln.startswith("#"))
    worst = reports.ordered([r for r in results if r.status != "PASS"])[0]
    assert f"python -m harness verify --cases cases/smoke.yaml --case {worst.id}\n" in rerun  # default kernel
    grid = md[md.index("## Worst tol ratio by axis"):]
    assert "dtype \\ block_size" in grid and "fp8/fp8/bf16" in grid and "**4.2**" in grid
    assert "## Self-check" in md and "75%" in md and "**0.6**" in md and "**0.31**" in md
    tail = md[md.index("<details><summary>All 30 cases</summary>"):]
    assert all(f"`{r.id}`" in tail for r in results)
    assert "http" not in md.replace("fp8", "")  # nothing to fetch


def test_markdown_fits_a_pr_comment():
    big = make_results(n=900)
    md = reports.render_markdown(big, make_meta(big))
    assert len(md) <= reports.MARKDOWN_MAX_CHARS
    assert re.search(r"\.\.\. \d+ more cases in report.html", md) and md.rstrip().endswith("</details>")
    # Failures are never cut for room; the full table gives way first.
    fails = [r for r in big if r.status != "PASS"]
    assert all(f"`{r.id}`" in md for r in fails[:reports.MARKDOWN_MAX_FAILURES])
    assert len(reports.render_markdown(big, make_meta(big), max_chars=None)) > reports.MARKDOWN_MAX_CHARS
    # Every case failing with a message as long as a real one: failure rows give way too.
    message = "tolerance rule: 11697 of 12288 elements beyond (worst 1.07e+03x) ... " + "x" * 400
    for r in big:
        r.status, r.message = "FAIL", message
        r.id = "q=fp8,kv=fp8,out=bf16,gqa=8:2,d=128,bs=16,seqs=mixed,scale_layout=per_seq_head,path=3d," + r.id
    md = reports.render_markdown(big, make_meta(big))
    assert len(md) <= reports.MARKDOWN_MAX_CHARS
    shown = int(re.search(r"\.\.\. (\d+) more failing", md).group(1))
    assert 10 <= len(big) - shown < reports.MARKDOWN_MAX_FAILURES


# ---------------------------------------------------------------------------------------------- HTML

def test_html_self_contained(run):
    results, meta = run
    page = reports.render_html(results, meta)
    assert page.startswith("<!doctype html>")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)
    assert not [u for u in refs if re.match(r"(https?:)?//", u)]
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script src" not in page
    assert page.count('<table class="heat"') == 2
    for r in results:
        assert f'data-id="{r.id}"' in page, r.id
        assert r.id.replace("_", "_<wbr>") in page, r.id  # shown, breakable at underscores
    assert page.count("data-search=") == len(results)
    for r in results:  # each failing row carries the command that runs it again alone
        assert (f"--case {r.id}</code>" in page) == (r.status != "PASS"), r.id
    assert "data:image/png;base64," + PNG_B64 in page
    assert 'id="killmatrix"' in page and "fp16_accum" in page
    # Terminal colour codes from compiler output are dropped, not shown as garbage.
    assert "Triton compile failed" in page and "out of resources: shared memory" in page and "\x1b" not in page
    # Dropdown filters for varying axes and status; sortable table; text filter.
    for axis in ("status", "dtype", "block_size", "seqs", "path", "window"):
        assert f'data-axis="{axis}"' in page, axis
    assert 'class="grid sortable"' in page and 'id="q"' in page


def test_heat_colours():
    assert reports.ratio_color(0.0) == "#63be7b"
    assert reports.ratio_color(0.5) == "#ffdd66"
    red = "#d63031"
    assert reports.ratio_color(1.0) == reports.ratio_color(7.0) == reports.ratio_color(math.inf) == red
    assert reports.ratio_color(math.nan) == red
    assert reports.ratio_color(0.99) != red  # a near miss must not look like a failure
    assert reports.ratio_text_color(1.2) == "#ffffff" and reports.ratio_text_color(0.3) != "#ffffff"
    assert reports.ratio_color(None) == reports.NO_DATA
    g0, g1 = reports.ratio_color(0.2), reports.ratio_color(0.8)
    assert g0 not in ("#63be7b", "#ffdd66") and g1 not in ("#ffdd66", red)


def test_heatmap_cells(run):
    results, _ = run
    df = reports.results_frame(results)
    grid = reports.worst_grid(df, "dtype", "block_size")
    assert grid["cols"] == ["16", "32", "64"]
    cell = grid["cells"][("bf16/fp8/bf16", "32")]  # holds case 25 (inf)
    assert math.isinf(cell["worst"]) and cell["n_fail"] >= 1
    # A cell holding only errors has no ratio but counts its errors.
    only_err = [r for r in results if r.status == "ERROR"]
    g = reports.worst_grid(reports.results_frame(only_err), "dtype", "block_size")
    assert all(c["worst"] is None and c["n_err"] == c["n"] for c in g["cells"].values())


# ---------------------------------------------------------------------------------------------- JSON

def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_json_round_trip(run, tmp_path):
    results, meta = run
    results = results + [Result(id="nan_case", status="FAIL", axes=results[0].axes,
                                metrics={"tol_ratio": math.nan, "max_abs_err": -math.inf}, message="nan")]
    data = reports.results_json(results, meta)
    text = json.dumps(data, allow_nan=False)  # strict JSON: no NaN/Infinity literals
    assert data["summary"]["FAIL"] == 5 and len(data["results"]) == 31
    p = tmp_path / "results.json"
    p.write_text(text)
    back, meta2 = reports.load_results_json(p)
    assert meta2 == json.loads(json.dumps(meta))
    assert len(back) == len(results)
    for a, b in zip(results, back):
        assert _same(a.to_dict(), b.to_dict()), a.id
    assert math.isnan(back[-1].metrics["tol_ratio"]) and back[25].metrics["tol_ratio"] == math.inf


# ---------------------------------------------------------------------------------------------- JUnit

def test_junit(run):
    results, meta = run
    root = ET.fromstring(reports.render_junit(results, meta).encode())
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    assert suite.get("name") == "smoke.yaml"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("30", "4", "2")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [r.id for r in results]
    assert {c.get("classname") for c in cases} == {"attention"}
    assert float(cases[0].get("time")) == pytest.approx(sum(results[0].timings.values()), abs=1e-3)
    assert sum(c.find("failure") is not None for c in cases) == 4
    assert sum(c.find("error") is not None for c in cases) == 2
    fail = cases[11].find("failure")
    assert "4.2" in fail.get("message") and "tol_ratio = 4.2" in fail.text
    err = cases[7].find("error")
    assert err.get("message").startswith("RuntimeError") and "\x1b" not in err.text
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["commit"].startswith("0123456789abcdef") and props["device"] == "NVIDIA H100 80GB HBM3"


# ---------------------------------------------------------------------------------------------- writing

def test_write_reports_and_latest(run, tmp_path):
    results, meta = run
    base = tmp_path / "reports"
    out = reports.write_reports(base / "run1", results, meta)
    assert out == (base / "run1").absolute()
    assert sorted(p.name for p in out.iterdir()) == sorted(reports.FILES)
    latest = base / "latest"
    assert latest.is_symlink() and latest.resolve() == out.resolve()
    assert (latest / "report.html").read_text() == (out / "report.html").read_text()
    assert not (out / "summary.txt").read_text().count("\x1b")
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)

    out2 = reports.write_reports(base / "run2", results[:10], meta)
    assert latest.resolve() == out2.resolve()
    # Rewriting an existing dir replaces it wholesale.
    (base / "run1" / "stale.txt").write_text("x")
    reports.write_reports(base / "run1", results[:5], meta)
    assert not (base / "run1" / "stale.txt").exists()
    assert json.loads((base / "run1" / "results.json").read_text())["summary"]["total"] == 5
    assert sorted(p.name for p in base.iterdir()) == ["latest", "run1", "run2"]


def test_reports_that_show_their_own_time_are_rendered_once_and_read_as_if_rendered_with_it(run, tmp_path,
                                                                                            monkeypatch):
    """verify's reports carry the time spent rendering them: rendered once with marks, filled in
    after, they are byte for byte what a render with the final numbers gives."""
    results, meta = run
    meta = {**meta, "timing": {k: v for k, v in meta["timing"].items() if k != "reports"}}
    meta.pop("wall_s")
    renders = []
    real_render_html = reports.render_html
    monkeypatch.setattr(reports, "render_html", lambda *a: renders.append(1) or real_render_html(*a))
    out = reports.write_reports(tmp_path / "once", results, meta, started_at=reports.time.perf_counter() - 30.0)
    assert len(renders) == 1
    assert 0 < meta["timing"]["reports"] < 30.0 < meta["wall_s"]
    again = reports.write_reports(tmp_path / "whole", results, meta)
    for name in reports.FILES:
        text = (out / name).read_text()
        assert "@@" not in text
        assert text == (again / name).read_text(), name
    assert f"reports {reports._secs(meta['timing']['reports'])}" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["meta"]["wall_s"] == meta["wall_s"]


def test_write_reports_atomic_on_failure(run, tmp_path, monkeypatch):
    results, meta = run
    base = tmp_path / "reports"
    reports.write_reports(base / "run1", results, meta)
    before = {p.name: p.read_text() for p in (base / "run1").iterdir()}

    def boom(*a, **k):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(reports, "render_html", boom)
    with pytest.raises(RuntimeError, match="renderer broke"):
        reports.write_reports(base / "run1", results[:3], meta)
    with pytest.raises(RuntimeError):
        reports.write_reports(base / "run_new", results[:3], meta)
    assert {p.name: p.read_text() for p in (base / "run1").iterdir()} == before
    assert sorted(p.name for p in base.iterdir()) == ["latest", "run1"]  # no temp dirs, no partial run_new
    assert (base / "latest").resolve() == (base / "run1").resolve()

    # A failure while writing a file (not rendering) is all-or-nothing too.
    monkeypatch.undo()
    real_write = Path.write_text

    def flaky(self, text, *a, **k):
        if self.name == "junit.xml":
            raise OSError("disk full")
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", flaky)
    with pytest.raises(OSError):
        reports.write_reports(base / "run1", results[:3], meta)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in (base / "run1").iterdir()} == before
    assert sorted(p.name for p in base.iterdir()) == ["latest", "run1"]


def test_latest_copy_fallback(run, tmp_path, monkeypatch):
    results, meta = run
    base = tmp_path / "reports"

    def no_symlink(*a, **k):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(os, "symlink", no_symlink)
    reports.write_reports(base / "a", results[:4], meta)
    latest = base / "latest"
    assert latest.is_dir() and not latest.is_symlink()
    assert sorted(p.name for p in latest.iterdir()) == sorted(reports.FILES)
    monkeypatch.undo()
    # Later, with symlinks available, the copied dir is replaced by a link.
    reports.write_reports(base / "b", results[:6], meta)
    assert latest.is_symlink() and latest.resolve() == (base / "b").resolve()
    assert sorted(p.name for p in base.iterdir()) == ["a", "b", "latest"]


def test_reports_agree_on_counts(run, tmp_path):
    results, meta = run
    out = reports.write_reports(tmp_path / "r" / "x", results, meta)
    want = counts_of(results)
    js = json.loads((out / "results.json").read_text())
    assert {k: js["summary"][k] for k in want} == want
    assert [r["status"] for r in js["results"]].count("FAIL") == want["FAIL"]
    m = re.search(r"PASS (\d+)  FAIL (\d+)  ERROR (\d+)", (out / "summary.txt").read_text())
    assert dict(zip(("PASS", "FAIL", "ERROR"), map(int, m.groups()))) == want
    md = (out / "report.md").read_text()
    assert f"30 (PASS {want['PASS']}, FAIL {want['FAIL']}, ERROR {want['ERROR']})" in md
    page = (out / "report.html").read_text()
    for label, n in (("pass", want["PASS"]), ("fail", want["FAIL"]), ("error", want["ERROR"])):
        assert re.search(rf'<div class="card {label}"><b>{n}</b>', page), label
    assert page.count('class="fail"') == want["FAIL"] * 2  # failures table + full table
    assert page.count('class="error"') == want["ERROR"] * 2
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert (int(suite.get("failures")), int(suite.get("errors"))) == (want["FAIL"], want["ERROR"])
    assert int(suite.get("tests")) - want["FAIL"] - want["ERROR"] == want["PASS"]


def test_empty_and_minimal_meta(tmp_path):
    for fn in (reports.render_terminal, reports.render_markdown, reports.render_html, reports.render_junit):
        assert fn([], {})
    out = reports.write_reports(tmp_path / "e", [], {})
    assert "(no cases)" in (out / "summary.txt").read_text()
    one = make_results(n=1)
    assert one[0].id in reports.render_html(one, {"device": "x"})
    # Ids and messages are escaped.
    evil = Result(id="a<b>_c&d", status="ERROR", axes=one[0].axes, message="<script>alert(1)</script>")
    page = reports.render_html([evil], {"kernel": "<k>"})
    assert "<script>alert" not in page and "a&lt;b&gt;_<wbr>c&amp;d" in page and "&lt;k&gt;" in page
    assert set(AXES) <= set(reports.results_frame(one).columns)
