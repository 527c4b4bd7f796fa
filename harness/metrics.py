"""Error metrics of one output against the reference, and the two verdict rules.

tolerance rule: every element within atol + rtol * |ref|, and the mean error within mean_atol.
adaptive rule:  the kernel's max (mean) error at most mult (mean_mult) times that of a plain
                PyTorch implementation rounding where the kernel rounds, plus a small atol.
"""
from __future__ import annotations

import torch

REL_FLOOR = 1e-2  # relative error is |err| / max(|ref|, floor): outputs near 0 say nothing relative


def tolerance_ratios(err: torch.Tensor, finite: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float):
    """Each element's error |out - ref| over its tolerance atol + rtol * |ref|; inf where out is not finite."""
    return torch.where(finite, err, float("inf")) / (atol + rtol * ref.abs())


def error_metrics(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> dict:
    """Max/mean/relative error, error/tolerance ratio and non-finite counts of out against ref."""
    out = out.float()
    ref = ref.float()
    finite = torch.isfinite(out)
    n_finite = finite.sum()
    err = (out - ref).abs()
    finite_err = torch.where(finite, err, 0.0)
    ratio = tolerance_ratios(err, finite, ref, atol, rtol)
    rel = finite_err / ref.abs().clamp_min(REL_FLOOR)
    worst = ratio.flatten().argmax()  # the element furthest beyond its tolerance (non-finite first)
    # One transfer for all the figures: each float() would wait for the device on its own.
    # float64 holds every count and index exactly.
    stats = torch.stack([x.double() for x in (
        finite_err.max(), finite_err.sum(dtype=torch.float64) / n_finite.clamp_min(1), rel.max(), ratio.max(),
        (ratio > 1).sum(), torch.isnan(out).sum(), torch.isinf(out).sum(), n_finite,
        worst, out.flatten()[worst], ref.flatten()[worst],
    )]).tolist()
    max_err, mean_err, max_rel, tol_ratio, n_beyond, n_nan, n_inf, n_fin, worst, got, want = stats
    none_finite = n_fin == 0
    return {
        "max_abs_err": float("nan") if none_finite else max_err,
        "mean_abs_err": float("nan") if none_finite else mean_err,
        "max_rel_err": float("nan") if none_finite else max_rel,
        "tol_ratio": tol_ratio,
        "n_beyond_tol": int(n_beyond),
        "n_elements": out.numel(),
        "n_nan": int(n_nan),
        "n_inf": int(n_inf),
        # where the worst element is: its index along each dimension of out, and both values
        "worst_index": _unravel(int(worst), out.shape),
        "worst_got": got,
        "worst_want": want,
    }


def beyond_by_group(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float, q_lens, group: int) -> dict:
    """Elements beyond atol + rtol * |ref| per sequence and per kv head, for out / ref of shape
    [tokens, q heads, dim]: a bug's pattern (one sequence, one kv head, all) points at its cause."""
    out, ref = out.float(), ref.float()
    beyond = tolerance_ratios((out - ref).abs(), torch.isfinite(out), ref, atol, rtol) > 1
    per_token = beyond.sum(dim=(1, 2))
    per_seq = torch.stack([t.sum() for t in per_token.split(list(q_lens))])
    per_kv_head = beyond.sum(dim=(0, 2)).view(-1, group).sum(dim=1)
    counts = torch.cat([per_seq, per_kv_head]).tolist()  # one transfer
    return {"beyond_by_seq": counts[:len(q_lens)], "beyond_by_kv_head": counts[len(q_lens):]}


def _unravel(flat: int, shape) -> list:
    """The index along each dimension of the element at row-major position `flat`."""
    index = []
    for n in reversed(shape):
        flat, i = divmod(flat, n)
        index.append(i)
    return index[::-1]


def max_mean_err(a: torch.Tensor, b: torch.Tensor) -> tuple:
    err = (a.float() - b.float()).abs()
    return tuple(torch.stack([err.max().double(), err.mean(dtype=torch.float64)]).tolist())


def tolerance_rule(m: dict, tol: dict) -> dict:
    mean_ratio = m["mean_abs_err"] / tol["mean_atol"]
    passed = m["tol_ratio"] <= 1.0 and mean_ratio <= 1.0
    return {"passed": bool(passed), "ratio": max(m["tol_ratio"], mean_ratio), "max_ratio": m["tol_ratio"],
            "mean_ratio": mean_ratio}


def adaptive_rule(m: dict, lowp_max: float, lowp_mean: float, adaptive: dict) -> dict:
    ratio = m["max_abs_err"] / (adaptive["mult"] * lowp_max + adaptive["atol"])
    mean_ratio = m["mean_abs_err"] / (adaptive["mean_mult"] * lowp_mean + adaptive["atol"])
    passed = ratio <= 1.0 and mean_ratio <= 1.0
    return {"passed": bool(passed), "ratio": max(ratio, mean_ratio), "max_ratio": ratio, "mean_ratio": mean_ratio}


def rule_failure(name: str, verdict: dict, m: dict) -> str:
    """Why a rule failed, naming the bound that broke (the worst element's, the mean error's) and by how much."""
    parts = []
    if not verdict["max_ratio"] <= 1.0:  # NaN counts as broken
        worst = f"{verdict['max_ratio']:.3g}x"
        parts.append(f"{m['n_beyond_tol']} of {m['n_elements']} elements beyond (worst {worst})"
                     if name == "tolerance" else f"max {worst}")
    if not verdict["mean_ratio"] <= 1.0:
        parts.append(f"mean {verdict['mean_ratio']:.3g}x")
    return f"{name} rule: " + (", ".join(parts) + " the bound" if parts else f"ratio {verdict['ratio']:.3g} > 1")
