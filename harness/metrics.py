"""Error metrics of one output against the reference, and the two verdict rules.

tolerance rule: every element within atol + rtol * |ref|, and the mean error within mean_atol.
adaptive rule:  the kernel's max (mean) error at most mult (mean_mult) times that of a plain
                PyTorch implementation rounding where the kernel rounds, plus a small atol.
"""
from __future__ import annotations

import torch

REL_FLOOR = 1e-2  # relative error is |err| / max(|ref|, floor): outputs near 0 say nothing relative


def error_metrics(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> dict:
    """Max/mean/relative error, error/tolerance ratio and non-finite counts of out against ref."""
    out = out.float()
    ref = ref.float()
    finite = torch.isfinite(out)
    err = (out - ref).abs()
    err = torch.where(finite, err, torch.full_like(err, float("inf")))
    allowed = atol + rtol * ref.abs()
    ratio = err / allowed
    finite_err = err[finite]
    return {
        "max_abs_err": float(finite_err.max()) if finite_err.numel() else float("nan"),
        "mean_abs_err": float(finite_err.mean()) if finite_err.numel() else float("nan"),
        "max_rel_err": float((finite_err / ref[finite].abs().clamp_min(REL_FLOOR)).max()) if finite_err.numel() else float("nan"),
        "tol_ratio": float(ratio.max()),
        "n_beyond_tol": int((ratio > 1).sum()),
        "n_nan": int(torch.isnan(out).sum()),
        "n_inf": int(torch.isinf(out).sum()),
    }


def max_mean_err(a: torch.Tensor, b: torch.Tensor) -> tuple:
    err = (a.float() - b.float()).abs()
    return float(err.max()), float(err.mean())


def tolerance_rule(m: dict, tol: dict) -> dict:
    mean_ratio = m["mean_abs_err"] / tol["mean_atol"]
    passed = m["tol_ratio"] <= 1.0 and mean_ratio <= 1.0
    return {"passed": bool(passed), "ratio": max(m["tol_ratio"], mean_ratio), "mean_ratio": mean_ratio}


def adaptive_rule(m: dict, lowp_max: float, lowp_mean: float, adaptive: dict) -> dict:
    ratio = m["max_abs_err"] / (adaptive["mult"] * lowp_max + adaptive["atol"])
    mean_ratio = m["mean_abs_err"] / (adaptive["mean_mult"] * lowp_mean + adaptive["atol"])
    passed = ratio <= 1.0 and mean_ratio <= 1.0
    return {"passed": bool(passed), "ratio": max(ratio, mean_ratio), "mean_ratio": mean_ratio}
