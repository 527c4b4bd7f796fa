"""The command line as a user meets it: exit codes, one-line refusals, ERROR rows that do not stop a run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def harness(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True)


def test_a_kernel_that_raises_on_one_case_is_an_error_row_and_the_rest_pass(tmp_path):
    run = harness("verify", "--kernel", "tests.fixtures.raising_kernel:unified_attention",
                  "--cases", "cases/smoke.yaml", "--filter", "d=80|64",
                  "--report-dir", str(tmp_path), "--run-id", "r", "--no-progress")
    assert run.returncode == 1, run.stdout + run.stderr
    results = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    status = {r["id"]: r["status"] for r in results}
    errors = [i for i, s in status.items() if s == "ERROR"]
    assert errors and all(",d=80," in i for i in errors)
    assert [s for i, s in status.items() if ",d=80," not in i] == ["PASS"] * (len(status) - len(errors))
    assert "no head size 80 in this build" in next(r["message"] for r in results if r["status"] == "ERROR")
    for name in ("report.html", "report.md", "junit.xml", "summary.txt"):
        assert (tmp_path / "r" / name).is_file()
    # Where the time went, start-up (the imports before verify began) first; the wall time is the
    # command's, so it holds the start-up and the reports written.
    meta = json.loads((tmp_path / "r" / "results.json").read_text())["meta"]
    timing = meta["timing"]
    assert list(timing)[0] == "start-up" and timing["start-up"] > 0.1  # importing torch alone takes longer
    assert meta["wall_s"] >= timing["start-up"] + timing["reports"]


def test_a_case_that_loses_the_device_does_not_take_the_cases_after_it(tmp_path):
    # An illegal address leaves the process's CUDA context failing every later call. The run stops
    # there, and fresh processes, one at a time, take the cases left: each d=80 case (two seeds)
    # is an ERROR row of its own, every other case passes.
    run = harness("verify", "--kernel", "tests.fixtures.device_losing_kernel:unified_attention",
                  "--cases", "cases/smoke.yaml", "--filter", "d=80|64", "--seeds", "2",
                  "--report-dir", str(tmp_path), "--run-id", "r", "--no-progress")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "lost the device (kernel: RuntimeError: CUDA error: an illegal memory access" in run.stdout
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    status = {r["id"]: r["status"] for r in saved["results"]}
    assert len(status) == 8
    assert {i for i, s in status.items() if s == "ERROR"} == {i for i in status if ",d=80," in i}
    assert sum(s == "PASS" for s in status.values()) == 6
    assert "fresh processes" in saved["meta"]["jobs"]
    assert all("illegal memory access" in r["message"] for r in saved["results"] if r["status"] == "ERROR")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="an illegal address needs a GPU")
def test_an_illegal_address_on_the_gpu_is_its_cases_error_row_alone(tmp_path):
    # The real thing: two threads, so the case running beside the one that wrote out of bounds may
    # report the loss too; both run again alone, and only the culprit loses the device again.
    run = harness("verify", "--cases", "cases/smoke.yaml", "--filter", "d=80|64", "--seeds", "2",
                  "--kernel", "tests.fixtures.illegal_address_kernel:unified_attention", "--threads", "2",
                  "--report-dir", str(tmp_path), "--run-id", "r", "--no-progress")
    assert run.returncode == 1, run.stdout + run.stderr
    results = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    status = {r["id"]: r["status"] for r in results}
    assert len(status) == 8
    assert {i for i, s in status.items() if s == "ERROR"} == {i for i in status if ",d=80," in i}, run.stdout


def test_a_case_that_kills_its_worker_is_an_error_row_and_the_rest_still_run(tmp_path):
    # Two workers share the cases; the one that meets d=80 dies with it. Fresh processes, one at a
    # time, take what it left: the case it died in becomes an ERROR row naming its log.
    run = harness("verify", "--kernel", "tests.fixtures.dying_kernel:unified_attention",
                  "--cases", "cases/smoke.yaml", "--filter", "d=80|64", "--seeds", "2", "--jobs", "2",
                  "--report-dir", str(tmp_path), "--run-id", "r", "--no-progress")
    assert run.returncode == 1, run.stdout + run.stderr
    results = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    status = {r["id"]: r["status"] for r in results}
    assert len(status) == 8
    assert {i for i, s in status.items() if s == "ERROR"} == {i for i in status if ",d=80," in i}
    died = [r["message"] for r in results if r["status"] == "ERROR"]
    assert all("the worker process died while running this case" in m and "shard1.log" in m for m in died)


def test_malformed_case_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "cases" / "smoke.yaml").read_text().replace("block_size: 16", "block_size: 20", 1)
                   .replace("tolerances: tolerances.yaml", f"tolerances: {ROOT / 'cases' / 'tolerances.yaml'}"))
    run = harness("verify", "--cases", str(bad), "--report-dir", str(tmp_path))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "block_size" in lines[0] and "Traceback" not in run.stderr
    assert not any(tmp_path.glob("*/results.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_memcheck_without_a_gpu_exits_2_with_one_line(tmp_path):
    run = harness("verify", "--memcheck", "--cases", "cases/smoke.yaml", "--report-dir", str(tmp_path))
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: --memcheck: needs a GPU (memcheck watches device code; the interpreter runs none)"], run.stderr
    assert not any(tmp_path.glob("*/results.json"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="memcheck watches device code: a GPU")
def test_memcheck_reports_a_read_past_the_block_table_that_the_numbers_do_not_show(tmp_path):
    # A block table exactly as wide as its longest sequence needs, sequences shorter than a tile.
    # The kernel reads within it: every case passes. A kernel that also reads one entry past the
    # table's memory (and computes the same numbers) has every case an ERROR row.
    common = ("verify", "--memcheck", "--cases", "cases/smoke.yaml", "--filter", "layout=exact_table",
              "--report-dir", str(tmp_path), "--no-progress")
    clean = harness(*common, "--run-id", "ours")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    bad = harness(*common, "--run-id", "bad", "--kernel", "tests.fixtures.table_overread_kernel:unified_attention")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    results = json.loads((tmp_path / "bad" / "results.json").read_text())["results"]
    assert len(results) == 4 and all(r["status"] == "ERROR" for r in results)
    assert all(r["message"].startswith("memcheck: ") and "Invalid __global__ read of size 4 bytes; at _read_past"
               in r["message"] for r in results), results[0]["message"]


def test_unknown_kernel_and_bad_usage_exit_2(tmp_path):
    run = harness("verify", "--kernel", "no_such_module:fn", "--report-dir", str(tmp_path))
    assert run.returncode == 2 and "no_such_module" in run.stderr and "Traceback" not in run.stderr
    assert harness("verify", "--seeds", "many").returncode == 2
    assert harness("list", "--filter", "q=fp32").returncode == 2


def test_report_embeds_a_bench_plot_and_refuses_a_file_that_is_no_png(tmp_path):
    import base64
    from tests.test_reports import PNG_B64, make_meta, make_results
    from harness import reports
    meta = make_meta()
    del meta["bench_png_b64"]
    src = tmp_path / "run" / "results.json"
    src.parent.mkdir()
    src.write_text(json.dumps(reports.results_json(make_results(), meta)))
    png = tmp_path / "bench.png"
    png.write_bytes(base64.b64decode(PNG_B64))
    assert harness("report", str(src), "--bench-plot", str(png)).returncode == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert f"data:image/png;base64,{PNG_B64}" in html
    not_png = tmp_path / "bench.json"
    not_png.write_text("{}")
    run = harness("report", str(src), "--bench-plot", str(not_png))
    assert run.returncode == 2 and "not a PNG" in run.stderr and "Traceback" not in run.stderr


def test_case_selects_exact_ids_and_refuses_an_unknown_one_with_the_closest():
    ids = harness("list").stdout.split()
    longer = next(i for i in ids if any(j != i and j.startswith(i + ",") for j in ids))  # a prefix of others
    run = harness("list", "--case", longer, "--case", longer + ",seed=3", "--case", longer)
    assert run.returncode == 0 and run.stdout.split() == [longer, longer + ",seed=3"]
    assert harness("list", "--filter", longer).stdout.split() != [longer]  # why --case exists
    run = harness("list", "--case", longer[:-1])
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert f"--case '{longer[:-1]}': no case has this id (closest: " in run.stderr


def test_make_keeps_python_bytecode_where_the_environment_turns_it_off(tmp_path):
    """The H200 machine's image sets PYTHONDONTWRITEBYTECODE=1 and ships no bytecode: without a
    cache every make command compiled torch's modules from source (2-3 s of a warm verify there)."""
    probe = tmp_path / "probe.mk"
    probe.write_text(f"include {ROOT / 'Makefile'}\nprobe:\n"
                     "\t@$(PYTHON) -c 'import sys; print(sys.dont_write_bytecode, sys.pycache_prefix)'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    run = subprocess.run(["make", "-s", "-f", str(probe), "probe"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", str(ROOT / ".cache" / "pycache")]


def test_verify_takes_a_kernel_file_outside_any_package(tmp_path):
    # An edited copy of the kernel, anywhere: verify --kernel FILE.py:FUNCTION (an unedited copy here).
    copy = tmp_path / "my_variant.py"
    copy.write_text((ROOT / "kernel" / "unified_attention.py").read_text())
    spec = f"{copy}:unified_attention"
    run = harness("verify", "--kernel", spec, "--cases", "cases/smoke.yaml", "--filter", "d=64",
                  "--report-dir", str(tmp_path), "--run-id", "r", "--no-progress")
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["meta"]["kernel"] == spec and [r["status"] for r in doc["results"]] == ["PASS"] * 3
