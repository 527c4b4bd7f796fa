"""GPU evidence for the kernel: every case of a matrix with the correct kernel, and every FP8
case again with the q and k scales dropped (passed as 1.0: the original bug).

    python scripts/h100_kernel_check.py [--cases cases/default.yaml] [--out results/h100_kernel_check.json]

Writes per-case error/tolerance ratios and the two margins: the correct kernel's worst ratio
(must stay <= 1, is expected <= 0.5) and the dropped-scale call's smallest ratio (must be >= 10).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import harness  # noqa: E402,F401
from harness.matrix import load_suite  # noqa: E402
from harness.runner import default_device, device_name, run_case  # noqa: E402
from kernel import unified_attention  # noqa: E402


def dropped_scales(*, split_kv=None, validate=False, **kw):
    """Our kernel called as the buggy backend called it: q and k scales never applied."""
    one = torch.ones(1, dtype=torch.float32, device=kw["q"].device)
    if kw["q"].dtype == torch.float8_e4m3fn:
        kw["q_descale"] = one
    kw["k_descale"] = one
    return unified_attention(**kw, split_kv=split_kv, validate=validate)


def scales_matter(case) -> bool:
    """Dropping a q or k scale changes the answer only where that scale is not 1."""
    q_scale = case.scales[0] if case.q_dtype == "fp8" else 1.0
    k_scale = case.scales[1] if case.kv_dtype == "fp8" else 1.0
    return case.scale_layout == "per_seq_head" or q_scale != 1.0 or k_scale != 1.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="cases/default.yaml")
    ap.add_argument("--out", default="results/h100_kernel_check.json")
    args = ap.parse_args()
    suite = load_suite(args.cases)
    tol = suite.tolerances
    device = default_device()
    rows, t0 = [], time.perf_counter()
    for case in suite.cases:
        t = tol.for_case(case)
        good = run_case(case, t, tol.adaptive, tol.rules, unified_attention, device)
        row = {"id": case.id, "status": good.status, "ratio": good.metrics.get("tol_ratio"),
               "adaptive_ratio": good.metrics.get("adaptive_ratio"), "max_abs_err": good.metrics.get("max_abs_err"),
               "message": good.message}
        if scales_matter(case):
            bad = run_case(case, t, tol.adaptive, tol.rules, dropped_scales, device)
            row["dropped_ratio"] = bad.metrics.get("tol_ratio")
            row["dropped_max_abs_err"] = bad.metrics.get("max_abs_err")
        rows.append(row)
    correct = [r["ratio"] for r in rows if r["ratio"] is not None]
    dropped = [r["dropped_ratio"] for r in rows if r.get("dropped_ratio") is not None]
    summary = {
        "device": device_name(), "torch": torch.__version__, "cases_file": args.cases, "cases": len(rows),
        "passed": sum(r["status"] == "PASS" for r in rows),
        "not_passed": [r["id"] + ": " + r["message"] for r in rows if r["status"] != "PASS"],
        "correct_worst_ratio": max(correct), "correct_worst_adaptive_ratio": max(r["adaptive_ratio"] for r in rows if r["adaptive_ratio"] is not None),
        "dropped_cases": len(dropped), "dropped_min_ratio": min(dropped), "dropped_caught": sum(d >= 10 for d in dropped),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if not summary["not_passed"] and summary["dropped_caught"] == len(dropped) else 1


if __name__ == "__main__":
    sys.exit(main())
