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
    n_finite = finite.sum()
    err = (out - ref).abs()
    finite_err = torch.where(finite, err, 0.0)
    ratio = torch.where(finite, err, float("inf")) / (atol + rtol * ref.abs())
    rel = finite_err / ref.abs().clamp_min(REL_FLOOR)
    # One transfer for all the figures: each float() would wait for the device on its own.
    # float64 holds every count exactly.
    stats = torch.stack([x.double() for x in (
        finite_err.max(), finite_err.sum(dtype=torch.float64) / n_finite.clamp_min(1), rel.max(), ratio.max(),
        (ratio > 1).sum(), torch.isnan(out).sum(), torch.isinf(out).sum(), n_finite,
    )]).tolist()
    max_err, mean_err, max_rel, tol_ratio, n_beyond, n_nan, n_inf, n_fin = stats
    none_finite = n_fin == 0
    return {
        "max_abs_err": float("nan") if none_finite else max_err,
        "mean_abs_err": float("nan") if none_finite else mean_err,
        "max_rel_err": float("nan") if none_finite else max_rel,
        "tol_ratio": tol_ratio,
        "n_beyond_tol": int(n_beyond),
        "n_nan": int(n_nan),
        "n_inf": int(n_inf),
    }


def max_mean_err(a: torch.Tensor, b: torch.Tensor) -> tuple:
    err = (a.float() - b.float()).abs()
    return tuple(torch.stack([err.max().double(), err.mean(dtype=torch.float64)]).tolist())


def tolerance_rule(m: dict, tol: dict) -> dict:
    mean_ratio = m["mean_abs_err"] / tol["mean_atol"]
    passed = m["tol_ratio"] <= 1.0 and mean_ratio <= 1.0
    return {"passed": bool(passed), "ratio": max(m["tol_ratio"], mean_ratio), "mean_ratio": mean_ratio}


def adaptive_rule(m: dict, lowp_max: float, lowp_mean: float, adaptive: dict) -> dict:
    ratio = m["max_abs_err"] / (adaptive["mult"] * lowp_max + adaptive["atol"])
    mean_ratio = m["mean_abs_err"] / (adaptive["mean_mult"] * lowp_mean + adaptive["atol"])
    passed = ratio <= 1.0 and mean_ratio <= 1.0
    return {"passed": bool(passed), "ratio": max(ratio, mean_ratio), "mean_ratio": mean_ratio}
