"""The YAML case matrices as pytest parameters, one test per case with its readable id.

    pytest tests/test_cases.py                                # cases/smoke.yaml
    CASES=cases/default.yaml pytest tests/test_cases.py -n 4  # any matrix
"""
import os
from pathlib import Path

import pytest

import harness  # noqa: F401  (selects the interpreter when there is no GPU)
from harness.matrix import load_suite
from harness.kernels import load_kernel
from harness.runner import DEFAULT_KERNEL, default_device, run_case

SUITE = load_suite(os.environ.get("CASES") or Path(__file__).parent.parent / "cases" / "smoke.yaml")


@pytest.mark.parametrize("case", SUITE.cases, ids=[c.id for c in SUITE.cases])
def test_case(case):
    tol = SUITE.tolerances
    result = run_case(case, tol.for_case(case), tol.adaptive, tol.rules, load_kernel(DEFAULT_KERNEL),
                      default_device())
    assert result.status == "PASS", f"{result.status}: {result.message} {result.metrics}"
