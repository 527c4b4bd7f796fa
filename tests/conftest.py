"""One GPU per pytest-xdist worker: HARNESS_GPUS=0,1,2,3 pytest -n 4 tests/test_cases.py.

Set before any test module initializes CUDA, so each worker sees only its own device.
"""
import os

_worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
_gpus = [g for g in os.environ.get("HARNESS_GPUS", "").split(",") if g]
if _worker.startswith("gw") and _gpus:
    os.environ["CUDA_VISIBLE_DEVICES"] = _gpus[int(_worker[2:]) % len(_gpus)]
