"""GPU evidence for the kernel: the correct kernel over a whole matrix, and the same matrix with
the q and k scales dropped (passed as 1.0: the original bug), summarized side by side.

    python -m harness verify --jobs 8 --run-id correct
    python -m harness verify --jobs 8 --run-id dropped --kernel scripts.h100_kernel_check:dropped_scales
    python scripts/h100_kernel_check.py reports/correct/results.json reports/dropped/results.json \
        --out results/h100/kernel_check.json

The summary gives both margins: the correct kernel's worst error/tolerance ratio (must be <= 1,
expected <= 0.5) and the dropped-scale call's smallest ratio over the cases where a q or k
scale is not 1 (must be >= 10).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from harness.reports import load_results_json  # noqa: E402
from kernel import unified_attention  # noqa: E402


def dropped_scales(*, split_kv=None, validate=False, **kw):
    """Our kernel called as the buggy backend called it: q and k scales never applied."""
    one = torch.ones(1, dtype=torch.float32, device=kw["q"].device)
    if kw["q"].dtype == torch.float8_e4m3fn:
        kw["q_descale"] = one
    if kw["k"].dtype == torch.float8_e4m3fn:
        kw["k_descale"] = one
    return unified_attention(**kw, split_kv=split_kv, validate=validate)


def scales_matter(axes: dict) -> bool:
    """Dropping a q or k scale changes the answer only where that scale is not 1, and where a
    query sees more than one key (with a window of 1 the softmax is 1 whatever the scores)."""
    if int(axes["window"]) == 1:
        return False
    q_scale, k_scale, _ = (float(s) for s in str(axes["scales"]).split("/"))
    q_scale = q_scale if axes["q_dtype"] == "fp8" else 1.0
    k_scale = k_scale if axes["kv_dtype"] == "fp8" else 1.0
    return axes["scale_layout"] == "per_seq_head" and "fp8" in (axes["q_dtype"], axes["kv_dtype"]) \
        or q_scale != 1.0 or k_scale != 1.0


def summarize(correct_path: Path, dropped_path: Path) -> dict:
    correct, meta = load_results_json(correct_path)
    dropped, _ = load_results_json(dropped_path)
    ratio = lambda r: r.metrics.get("tol_ratio")  # noqa: E731
    dropped_by_id = {r.id: r for r in dropped if scales_matter(r.axes)}
    rows = [{"id": r.id, "status": r.status, "ratio": ratio(r), "adaptive_ratio": r.metrics.get("adaptive_ratio"),
             "dropped_ratio": ratio(dropped_by_id[r.id]) if r.id in dropped_by_id else None} for r in correct]
    drop = [row["dropped_ratio"] for row in rows if row["dropped_ratio"] is not None]
    return {
        "summary": {
            "device": meta.get("device"), "commit": meta.get("commit"), "torch": meta.get("torch"),
            "triton": meta.get("triton"), "cases_file": meta.get("cases_file"), "cases": len(rows),
            "passed": sum(row["status"] == "PASS" for row in rows),
            "correct_worst_ratio": max((row["ratio"] for row in rows if row["ratio"] is not None), default=None),
            "correct_worst_adaptive_ratio": max((row["adaptive_ratio"] for row in rows
                                                 if row["adaptive_ratio"] is not None), default=None),
            "dropped_cases": len(drop), "dropped_min_ratio": min(drop, default=None),
            "dropped_caught_at_10x": sum(d >= 10 for d in drop),
            "verify_wall_s": meta.get("wall_s"),
        },
        "cases": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("correct", type=Path)
    ap.add_argument("dropped", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/h100/kernel_check.json"))
    args = ap.parse_args()
    report = summarize(args.correct, args.dropped)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    s = report["summary"]
    print(json.dumps(s, indent=1))
    ok = s["passed"] == s["cases"] and s["dropped_caught_at_10x"] == s["dropped_cases"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
