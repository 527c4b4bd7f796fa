"""verify --memcheck: compute-sanitizer's findings become their cases' ERROR rows."""
import os
import sys
from pathlib import Path

from harness.matrix import filter_cases, load_suite
from harness.memcheck import MEMCHECK_EXIT, first_error, run_under_memcheck

ROOT = Path(__file__).resolve().parent.parent
FAKE = [sys.executable, str(ROOT / "tests" / "fixtures" / "fake_sanitizer.py")]


def test_first_error_names_the_error_where_it_happened_and_what_it_missed():
    log = (ROOT / "tests" / "fixtures" / "fake_sanitizer.py").read_text().split('"""')[3]
    count, first = first_error(log)
    assert count == 3
    assert first == ("Invalid __global__ read of size 4 bytes; at _unified_attention_kernel+0xd70 in "
                     "unified_attention.py:128; and is 1 bytes after the nearest allocation at 0x7fa7d6800000 "
                     "of size 16 bytes")
    assert first_error("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n") == (0, "")


def test_a_case_memcheck_flags_is_an_error_row_and_the_others_keep_their_verdicts(tmp_path, monkeypatch):
    suite = load_suite(ROOT / "cases" / "smoke.yaml")
    cases = filter_cases(list(suite.cases), "layout=exact_table,kv=fp8,bs=16")
    assert len(cases) == 2
    flagged, clean = cases
    monkeypatch.setenv("FAKE_MEMCHECK_FLAG", flagged.id)
    # The fake sanitizer is a python script: HARNESS_SANITIZER names one program, so wrap it.
    wrapper = tmp_path / "sanitizer"
    wrapper.write_text(f"#!/bin/sh\nexec {' '.join(FAKE)} \"$@\"\n")
    wrapper.chmod(0o755)
    results = run_under_memcheck(["--cases", "cases/smoke.yaml"], cases, tmp_path / "run", 2, str(wrapper))
    assert [r.id for r in results] == [flagged.id, clean.id]
    assert results[1].status == "PASS", results[1].message
    bad = results[0]
    assert bad.status == "ERROR"
    assert bad.message.startswith("memcheck: 3 error(s), the first: Invalid __global__ read of size 4 bytes; "
                                  "at _unified_attention_kernel+0xd70 in unified_attention.py:128")
    assert bad.message.endswith("case0000.memcheck.log)")
    assert bad.timings  # the run's own phases are kept


def test_a_case_whose_process_ends_before_its_result_is_an_error_row_naming_its_log(tmp_path):
    suite = load_suite(ROOT / "cases" / "smoke.yaml")
    case = filter_cases(list(suite.cases), "layout=exact_table,kv=fp8,bs=16")[0]
    broken = tmp_path / "sanitizer"
    broken.write_text("#!/bin/sh\necho 'Device not supported' >&2\nexit 7\n")
    broken.chmod(0o755)
    result, = run_under_memcheck(["--cases", "cases/smoke.yaml"], [case], tmp_path / "run", 1, str(broken))
    assert result.status == "ERROR"
    assert result.message.startswith("memcheck: the case's process ended (exit 7) before its result: "
                                     "Device not supported (log: ")
    assert MEMCHECK_EXIT != 7
