"""Turn a run's [Result] and its provenance `meta` into terminal, markdown, HTML, JSON and JUnit reports.

All renderers are pure functions of (results, meta); `write_reports` puts the five files of a run on disk
atomically and points `<parent>/latest` at them.

meta keys read (all optional, shown as "?" when missing): commit, kernel, device, mode, torch, triton,
cases_file, seeds, started, wall_s, jobs, compiled_variants {kernel: count}, tolerances,
timing {phase: seconds}, selfcheck, bench_png_b64.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import jinja2
import markupsafe
import pandas as pd
from tabulate import tabulate

from .schema import AXES, DEFAULT_KERNEL, Result

STATUSES = ("PASS", "FAIL", "ERROR")
# Short column headers for the HTML table, so it fits a laptop screen.
AXIS_LABELS = {"block_size": "block", "head_size": "head", "num_blocks": "blocks", "scale_layout": "scale layout",
               "out_dtype": "out"}
TEMPLATE_DIR = Path(__file__).parent / "templates"
FILES = ("results.json", "report.md", "report.html", "junit.xml", "summary.txt")

# Metric columns of results_frame, in order.
METRIC_COLS = (
    "max_abs_err", "mean_abs_err", "max_rel_err", "tol_ratio", "mean_ratio", "adaptive_ratio",
    "n_beyond_tol", "n_nan", "n_inf", "n_unwritten", "sat_q", "sat_k", "sat_v",
    "e2e_max_abs_err", "e2e_mean_abs_err", "lowp_max_abs_err", "kernel_ms",
)

# Heatmap scale: green at 0, yellow at 0.5, orange just under 1, then a distinctly deeper red at >= 1 (the pass
# limit) so a near-miss never looks like a failure; grey where there is no data.
_GREEN, _YELLOW, _ORANGE, _RED = (99, 190, 123), (255, 221, 102), (245, 150, 80), (214, 48, 49)
NO_DATA = "#e3e3e3"
ERROR_BG = "#ddd0ef"


# ---------------------------------------------------------------------------------------------- helpers

def _num(x):
    """A metric as a float, or None when missing or not a number (ERROR rows, JSON strings)."""
    if x is None:
        return None
    if isinstance(x, (bool, int, float)):
        return float(x)
    if isinstance(x, str) and x in _NONFINITE:
        return _NONFINITE[x]
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


_ANSI_SEQ = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
_CTRL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_message(msg) -> str:
    """A message without terminal colour codes or control characters (compiler errors carry both)."""
    return _CTRL.sub("", _ANSI_SEQ.sub("", str(msg or "")))


def _metric(r: Result, key: str):
    return _num((r.metrics or {}).get(key))


def tol_ratio(r: Result):
    """The case's tolerance ratio (<= 1 passes), from its metrics or else from its tolerance rule."""
    v = _metric(r, "tol_ratio")
    if v is None:
        v = _num(((r.rules or {}).get("tolerance") or {}).get("ratio"))
    return v


def adaptive_ratio(r: Result):
    v = _metric(r, "adaptive_ratio")
    if v is None:
        v = _num(((r.rules or {}).get("adaptive") or {}).get("ratio"))
    return v


def _worst_key(v):
    """Ratio as an ordering key where larger is worse: NaN counts as infinitely bad, missing as unknown."""
    if v is None:
        return None
    return math.inf if math.isnan(v) else v


def _sort_key(r: Result):
    """Errors (nothing to compare: worst of all), then failures, then passes; worst ratio first in each."""
    k = _worst_key(tol_ratio(r))
    group = {"ERROR": 0, "FAIL": 1, "PASS": 2}.get(r.status, 1)
    if k is None:
        k = -1.0 if r.status == "PASS" else math.inf
    return (group, -k, r.id)


def ordered(results) -> list:
    return sorted(results, key=_sort_key)


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


def _fmt_metric(r: Result, key: str) -> str:
    raw = (r.metrics or {}).get(key)
    if isinstance(raw, bool) or raw is None:
        return _fmt(raw)
    if isinstance(raw, int):
        return str(raw)
    return _fmt(_num(raw))


def _sat(r: Result) -> str:
    vals = [(r.metrics or {}).get(k) for k in ("sat_q", "sat_k", "sat_v")]
    if all(v is None for v in vals):
        return ""
    return "/".join("-" if v is None else str(v) if isinstance(v, int) else _fmt(_num(v)) for v in vals)


def _case_time(r: Result) -> float:
    return float(sum(v for v in (r.timings or {}).values() if isinstance(v, (int, float)) and not isinstance(v, bool)))


def _dtype_pair(axes: dict) -> str:
    return f"{axes.get('q_dtype', '?')}/{axes.get('kv_dtype', '?')}/{axes.get('out_dtype', '?')}"


def _has_metric(results, key) -> bool:
    return any(_metric(r, key) is not None for r in results)


def _m(meta: dict, key: str, default="?"):
    v = (meta or {}).get(key)
    return default if v is None or v == "" else v


def _short_commit(meta) -> str:
    c = str(_m(meta, "commit"))
    return c[:12] if re.fullmatch(r"[0-9a-f]{13,40}", c) else c


def _secs(x) -> str:
    x = _num(x)
    if x is None:
        return "?"
    if x >= 120:
        return f"{x / 60:.1f} min"
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def _natural(v):
    """Sort axis values numerically where they are numbers, else as text."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


# ---------------------------------------------------------------------------------------------- summary

def summarize(results) -> dict:
    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    worst, worst_id = None, None
    for r in results:
        k = _worst_key(tol_ratio(r))
        if k is not None and (worst is None or k > worst):
            worst, worst_id = k, r.id
    total = len(results)
    if total == 0:
        verdict = "EMPTY"
    elif counts["FAIL"] or counts["ERROR"]:
        verdict = "FAIL"
    else:
        verdict = "PASS"
    return {
        "verdict": verdict, "total": total, "counts": counts,
        "PASS": counts["PASS"], "FAIL": counts["FAIL"], "ERROR": counts["ERROR"],
        "worst_ratio": worst, "worst_id": worst_id,
    }


def _summary_line(summary: dict, meta: dict) -> str:
    c = summary["counts"]
    worst = (f"worst tol ratio {_fmt(summary['worst_ratio'], 2)} ({summary['worst_id']})"
             if summary["worst_id"] is not None else "worst tol ratio n/a")
    return f"PASS {c['PASS']}  FAIL {c['FAIL']}  ERROR {c['ERROR']}  {worst} on {_m(meta, 'device')}"


def _header_line(meta: dict) -> str:
    return (f"{_m(meta, 'kernel')} on {_m(meta, 'device')} ({_m(meta, 'mode')})  "
            f"commit {_short_commit(meta)}  cases {_m(meta, 'cases_file')}")


# ---------------------------------------------------------------------------------------------- terminal

_ANSI = {"PASS": "\x1b[32m", "FAIL": "\x1b[1;31m", "ERROR": "\x1b[1;35m"}


def rerun_command(r: Result, meta: dict) -> str:
    """The command that runs this one case again, as this run did (case file, kernel)."""
    command = ["python", "-m", "harness", "verify", "--cases", str(_m(meta, "cases_file")), "--case", r.id]
    if _m(meta, "kernel") not in ("?", DEFAULT_KERNEL):
        command += ["--kernel", str(meta["kernel"])]
    return shlex.join(command)


MESSAGE_CHARS = 480  # a failure's message: broken bounds, spread, worst element (about 350 characters)


def render_terminal(results, meta, limit: int = 40, color: bool = False) -> str:
    """Compact table: every failure/error (up to `limit`), then the worst passes to fill `limit` rows."""
    results = list(results)
    summary = summarize(results)
    rows_sorted = ordered(results)
    failing = [r for r in rows_sorted if r.status != "PASS"]
    passing = [r for r in rows_sorted if r.status == "PASS"]
    shown_fail = failing[:limit]
    shown_pass = passing[:max(limit - len(shown_fail), 0)]
    with_ms = _has_metric(results, "kernel_ms")

    headers = ["status", "id", "max_err", "tol_ratio", "adaptive_ratio", "e2e_err", "sat(q/k/v)"]
    if with_ms:
        headers.append("kernel_ms")
    table = []
    for r in shown_fail + shown_pass:
        status = f"{_ANSI.get(r.status, '')}{r.status}\x1b[0m" if color else r.status
        row = [status, r.id, _fmt_metric(r, "max_abs_err"), _fmt(tol_ratio(r)), _fmt(adaptive_ratio(r)),
               _fmt_metric(r, "e2e_max_abs_err"), _sat(r)]
        if with_ms:
            row.append(_fmt_metric(r, "kernel_ms"))
        table.append(row)

    out = [_header_line(meta), ""]
    if table:
        out.append(tabulate(table, headers=headers, tablefmt="simple", disable_numparse=True))
    else:
        out.append("(no cases)")
    if len(failing) > len(shown_fail):
        out.append(f"... {len(failing) - len(shown_fail)} more failing/erroring (see report.md)")
    if len(passing) > len(shown_pass):
        out.append(f"... {len(passing) - len(shown_pass)} more passing")
    # Messages are too long for a column; list them under the table so a CI log shows why.
    msgs = [r for r in shown_fail if r.message]
    if msgs:
        out.append("")
        for r in msgs:
            msg = clean_message(r.message).strip()
            first = msg.splitlines()[0] if msg else ""
            out.append(f"{r.status} {r.id}: {first[:MESSAGE_CHARS]}")
    if failing:
        out += ["", f"run the worst again alone: {rerun_command(failing[0], meta)}"]
    out += ["", _summary_line(summary, meta)]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- frames

def results_frame(results) -> pd.DataFrame:
    """One row per case: id, status, message, dtype pair, every axis, every metric, ratio and time."""
    recs = []
    for r in results:
        axes = r.axes or {}
        rec = {"id": r.id, "status": r.status, "message": clean_message(r.message), "dtype": _dtype_pair(axes)}
        for a in AXES:
            rec[a] = axes.get(a)
        for k in METRIC_COLS:
            rec[k] = _metric(r, k)
        rec["tol_ratio"] = tol_ratio(r)
        rec["adaptive_ratio"] = adaptive_ratio(r)
        rec["worst_key"] = _worst_key(rec["tol_ratio"])
        rec["time_s"] = _case_time(r)
        recs.append(rec)
    cols = ["id", "status", "message", "dtype", *AXES, *METRIC_COLS, "worst_key", "time_s"]
    return pd.DataFrame.from_records(recs, columns=cols)


def worst_grid(df: pd.DataFrame, row_axis: str, col_axis: str) -> dict:
    """Worst tol ratio per (row value, col value) with case/failure/error counts, rows and cols in natural order."""
    if df.empty:
        return {"rows": [], "cols": [], "cells": {}, "row_axis": row_axis, "col_axis": col_axis}
    d = df.assign(_r=df[row_axis].astype(str), _c=df[col_axis].astype(str),
                  _fail=(df["status"] == "FAIL").astype(int), _err=(df["status"] == "ERROR").astype(int),
                  _wk=pd.to_numeric(df["worst_key"], errors="coerce"))
    g = d.groupby(["_r", "_c"], sort=False).agg(worst=("_wk", "max"), n=("id", "size"),
                                                 n_fail=("_fail", "sum"), n_err=("_err", "sum"))
    rows = sorted(d["_r"].unique(), key=_natural)
    cols = sorted(d["_c"].unique(), key=_natural)
    cells = {}
    for (rv, cv), s in g.iterrows():
        w = s["worst"]
        cells[(rv, cv)] = {"worst": None if pd.isna(w) else float(w), "n": int(s["n"]),
                           "n_fail": int(s["n_fail"]), "n_err": int(s["n_err"])}
    return {"rows": rows, "cols": cols, "cells": cells, "row_axis": row_axis, "col_axis": col_axis}


def _varying_axes(df: pd.DataFrame) -> list:
    return [a for a in AXES if a in df and df[a].astype(str).nunique() > 1]


# ---------------------------------------------------------------------------------------------- markdown

def _md_escape(s) -> str:
    s = str(s).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    return s


def _md_table(headers, rows) -> str:
    rows = [[_md_escape(c) for c in row] for row in rows]
    return tabulate(rows, headers=[_md_escape(h) for h in headers], tablefmt="github", disable_numparse=True)


# verify's reports show their own time, known only once they are rendered: they are rendered once
# with these marks where the time by phase and the wall time go, then the marks are filled in
# (write_reports(started_at=...)), which gives the same text as rendering them with the numbers.
_TIMING_MARK = "@@time-by-phase@@"
_WALL_MARK = "@@wall-time@@"
_REPORTS_MARK = "@@reports-seconds@@"


def _pending(meta: dict) -> dict:
    """meta with the reports' own time and the wall time still to come (marks)."""
    return {**meta, "wall_s": _WALL_MARK, "timing": {**(meta.get("timing") or {}), "reports": _REPORTS_MARK}}


def _is_pending(meta) -> bool:
    return (meta or {}).get("wall_s") == _WALL_MARK


def _wall_text(meta) -> str:
    return _WALL_MARK if _is_pending(meta) else _secs(_m(meta, "wall_s", None))


def _provenance_md(meta: dict, summary: dict) -> str:
    return _md_table(["", ""], _provenance(meta, summary))


def _timing_md(meta) -> str:
    """The markdown report's line of time by phase ("" without timing)."""
    if _is_pending(meta):
        return _TIMING_MARK
    rows = _timing_rows(meta)
    return ("**Time by phase:** " + ", ".join(f"{t['phase']} {t['text']}" + (f" ({t['pct']})" if t["pct"] else "")
                                              for t in rows)) if rows else ""


def _timing_html(meta) -> str:
    """The HTML report's panel of time by phase ("" without timing)."""
    if _is_pending(meta):
        return markupsafe.Markup(_TIMING_MARK)
    return markupsafe.Markup(_html_template("timing.html.j2").render(timing=_timing_rows(meta)))


def _fill_pending(texts: dict, results, meta) -> dict:
    """The reports rendered with _pending(meta), completed with meta's final reports time and wall time."""
    filled = dict(texts)
    filled["results.json"] = (texts["results.json"].replace(json.dumps(_WALL_MARK), json.dumps(meta["wall_s"]))
                              .replace(json.dumps(_REPORTS_MARK), json.dumps(meta["timing"]["reports"])))
    # The wall time sits in a table whose columns tabulate pads: the table is made again whole.
    summary = summarize(results)
    filled["report.md"] = texts["report.md"].replace(_TIMING_MARK, _timing_md(meta)).replace(
        _provenance_md(_pending(meta), summary), _provenance_md(meta, summary))
    filled["report.html"] = texts["report.html"].replace(_TIMING_MARK, str(_timing_html(meta))).replace(
        _WALL_MARK, str(markupsafe.escape(_wall_text(meta))))
    filled["junit.xml"] = render_junit(results, meta)  # milliseconds: rendered again whole
    return filled


def _timing_rows(meta):
    timing = (meta or {}).get("timing") or {}
    wall = _num((meta or {}).get("wall_s"))
    total = wall or sum(v for v in (_num(x) for x in timing.values()) if v) or None
    rows = []
    for phase, secs in timing.items():
        s = _num(secs)
        share = (s / total) if (s is not None and total) else None
        rows.append({"phase": phase, "secs": s, "text": _secs(s), "share": share,
                     "pct": "" if share is None else f"{100 * share:.0f}%"})
    return rows


def _grid_md(grid: dict) -> str:
    if not grid["rows"]:
        return "(no data)"
    headers = [f"{grid['row_axis']} \\ {grid['col_axis']}", *grid["cols"]]
    body = []
    for rv in grid["rows"]:
        row = [rv]
        for cv in grid["cols"]:
            c = grid["cells"].get((rv, cv))
            if c is None:
                row.append("")
                continue
            txt = _fmt(c["worst"], 2) if c["worst"] is not None else "-"
            if c["worst"] is not None and c["worst"] > 1:
                txt = f"**{txt}**"
            if c["n_err"]:
                txt += f" ({c['n_err']} err)"
            row.append(txt)
        body.append(row)
    return _md_table(headers, body)


def _provenance(meta: dict, summary: dict) -> list:
    """(label, value) pairs shared by the markdown and HTML headers."""
    return [
        ("verdict", summary["verdict"]),
        ("cases", f"{summary['total']} (PASS {summary['PASS']}, FAIL {summary['FAIL']}, ERROR {summary['ERROR']})"),
        ("worst tol ratio", (f"{_fmt(summary['worst_ratio'], 3)} ({summary['worst_id']})"
                             if summary["worst_id"] is not None else "n/a")),
        ("device", f"{_m(meta, 'device')} ({_m(meta, 'mode')})"),
        ("kernel", _m(meta, "kernel")),
        ("commit", _m(meta, "commit")),
        ("torch / triton", f"{_m(meta, 'torch')} / {_m(meta, 'triton')}"),
        ("case file", _m(meta, "cases_file")),
        ("seeds", _m(meta, "seeds")),
        ("started", _m(meta, "started")),
        ("wall time", _wall_text(meta) + (f" ({meta['jobs']})" if meta.get("jobs") else "")),
    ] + ([("compiled kernel variants", ", ".join(f"{name} {n}" for name, n in meta["compiled_variants"].items()))]
         if meta.get("compiled_variants") else [])


# GitHub rejects PR comments over 65,536 characters; stay under it with room for a header the poster adds.
MARKDOWN_MAX_CHARS = 60_000
MARKDOWN_MAX_FAILURES = 100


def render_markdown(results, meta, max_chars: int | None = MARKDOWN_MAX_CHARS) -> str:
    """GitHub-flavoured report for a PR comment or CI job summary. The collapsed all-cases table is cut to keep
    the whole under max_chars (None: no limit); the failures table shows up to 100 rows, fewer where they would
    take more than two thirds of max_chars; everything else is always complete."""
    results = list(results)
    meta = meta or {}
    summary = summarize(results)
    df = results_frame(results)
    out = [f"# Paged attention check: {summary['verdict']}", ""]

    out += [_provenance_md(meta, summary), ""]
    timing = _timing_md(meta)
    if timing:
        out += [timing, ""]

    failing = [r for r in ordered(results) if r.status != "PASS"]
    out += ["## Failures and errors", ""]
    if failing:
        def failure_table(n):
            return _md_table(["status", "id", "tol_ratio", "adaptive_ratio", "max_err", "message"],
                             [[r.status, f"`{r.id}`", _fmt(tol_ratio(r)), _fmt(adaptive_ratio(r)),
                               _fmt_metric(r, "max_abs_err"), clean_message(r.message)[:MESSAGE_CHARS]]
                              for r in failing[:n]])
        shown = min(len(failing), MARKDOWN_MAX_FAILURES)
        table = failure_table(shown)
        # Rows are padded to the longest message: fewer rows where they would crowd out the rest.
        while max_chars is not None and shown > 10 and len(table) > max_chars * 2 // 3:
            shown = shown * 4 // 5
            table = failure_table(shown)
        out.append(table)
        if len(failing) > shown:
            out += ["", f"... {len(failing) - shown} more failing (see report.html)"]
        out += ["", "Run the worst again alone:", "", "```", rerun_command(failing[0], meta), "```"]
    else:
        out.append("None.")
    out.append("")

    out += ["## Worst tol ratio by axis", "",
            "Dtype pair (q/kv/out) by block size; **bold** is over the limit (1).", "",
            _grid_md(worst_grid(df, "dtype", "block_size")), ""]
    # Other varying axes, one line each, so a pattern (e.g. only the 3d path fails) stands out.
    lines = []
    for a in _varying_axes(df):
        if a in ("q_dtype", "kv_dtype", "out_dtype", "block_size", "seed"):
            continue
        g = worst_grid(df.assign(_all="all"), a, "_all")
        parts = []
        for v in g["rows"]:
            c = g["cells"][(v, "all")]
            bad = ", ".join(x for x in (f"{c['n_fail']} fail" if c["n_fail"] else "",
                                        f"{c['n_err']} err" if c["n_err"] else "") if x)
            parts.append(f"{v}: {_fmt(c['worst'], 2) if c['worst'] is not None else '-'}"
                         + (f" ({bad})" if bad else ""))
        lines.append([a, "; ".join(parts)])
    if lines:
        out += [_md_table(["axis", "worst tol ratio by value"], lines), ""]

    sc = meta.get("selfcheck")
    if sc:
        out += _selfcheck_md(sc)

    tol = meta.get("tolerances")
    if tol:
        out += ["<details><summary>Tolerances</summary>", "", "```json",
                json.dumps(_jsonable(tol), indent=2, default=str), "```", "", "</details>", ""]

    headers = ["status", "id", "max_err", "mean_err", "tol_ratio", "mean_ratio", "adaptive_ratio", "e2e_err",
               "sat(q/k/v)"]
    with_ms = _has_metric(results, "kernel_ms")
    if with_ms:
        headers.append("kernel_ms")
    rows = []
    for r in ordered(results):
        row = [r.status, f"`{r.id}`", _fmt_metric(r, "max_abs_err"), _fmt_metric(r, "mean_abs_err"),
               _fmt(tol_ratio(r)), _fmt_metric(r, "mean_ratio"), _fmt(adaptive_ratio(r)),
               _fmt_metric(r, "e2e_max_abs_err"), _sat(r)]
        if with_ms:
            row.append(_fmt_metric(r, "kernel_ms"))
        rows.append(row)
    head = "\n".join(out)
    table = _md_table(headers, rows) if rows else "(no cases)"
    note = ""
    if max_chars is not None and rows and len(head) + len(table) + 200 > max_chars:
        # Rows are rendered at a fixed width, so cut the rendered table by lines: header + separator + rows.
        lines = table.splitlines()
        room = max(max_chars - len(head) - 200, 0)
        keep, used = 2, len(lines[0]) + len(lines[1]) + 2
        while keep < len(lines) and used + len(lines[keep]) + 1 <= room:
            used += len(lines[keep]) + 1
            keep += 1
        shown = keep - 2
        table = "\n".join(lines[:keep]) if shown else ""
        note = f"\n\n... {len(rows) - shown} more cases in report.html and results.json"
    tail = [f"<details><summary>All {len(results)} cases</summary>", "", table + note, "", "</details>", ""]
    return head + "\n" + "\n".join(tail)


# ---------------------------------------------------------------------------------------------- selfcheck

def _kill_class(v) -> str:
    if v is None:
        return "none"
    if math.isnan(v) or v >= 10:
        return "caught"
    return "weak" if v >= 1 else "missed"


def _selfcheck_view(sc: dict) -> dict:
    variants = sc.get("variants") or []
    matrix = sc.get("matrix") or {}
    cases = list(sc.get("cases") or sorted({c for row in matrix.values() for c in row}))
    best = [_num(v.get("best_ratio")) for v in variants]
    best = [b for b in best if b is not None]
    rows = []
    for v in variants:
        cells = []
        for c in cases:
            x = _num((matrix.get(v.get("name")) or {}).get(c))
            cells.append({"v": x, "text": _fmt(x, 2), "cls": _kill_class(x), "case": c})
        rows.append({**v, "best_text": _fmt(_num(v.get("best_ratio")), 3), "best_cls": _kill_class(_num(v.get("best_ratio"))),
                     "cells": cells,
                     "killed_by": list(v.get("killed_by") or [])})
    return {
        "rows": rows, "cases": cases,
        "kill_rate": _num(sc.get("kill_rate")),
        "kill_rate_text": "?" if _num(sc.get("kill_rate")) is None else f"{100 * _num(sc.get('kill_rate')):.0f}%",
        "n_caught": sum(1 for v in variants if v.get("caught")), "n_variants": len(variants),
        "detect_margin": min(best) if best else None,
        "detect_margin_text": _fmt(min(best), 3) if best else "?",
        "correct_worst": _num(sc.get("correct_worst_ratio")),
        "correct_worst_text": _fmt(_num(sc.get("correct_worst_ratio")), 3),
        "seeds": sc.get("seeds", "?"),
    }


def _selfcheck_md(sc: dict) -> list:
    v = _selfcheck_view(sc)
    out = ["## Self-check (does the harness catch broken kernels?)", "",
           f"Kill rate **{v['kill_rate_text']}** ({v['n_caught']}/{v['n_variants']} variants caught) over "
           f"{len(v['cases'])} cases x {v['seeds']} seeds. Margins: weakest catch ratio "
           f"**{v['detect_margin_text']}** (higher is better, >= 10 is a clear catch); correct kernel worst ratio "
           f"**{v['correct_worst_text']}** (must stay < 1).", ""]
    out.append(_md_table(
        ["variant", "kind", "caught", "best ratio", "killed by", "description"],
        [[r.get("name", "?"), r.get("kind", "?"), "yes" if r.get("caught") else "NO", r["best_text"],
          f"{len(r['killed_by'])}/{len(v['cases'])}", r.get("description", "")] for r in v["rows"]]))
    out.append("")
    if v["rows"] and v["cases"]:
        headers = ["variant", *[f"c{i + 1}" for i in range(len(v["cases"]))]]
        body = [[r.get("name", "?"), *[c["text"] for c in r["cells"]]] for r in v["rows"]]
        legend = "; ".join(f"c{i + 1} = `{c}`" for i, c in enumerate(v["cases"]))
        out += ["<details><summary>Kill matrix (ratio per variant and case)</summary>", "",
                _md_table(headers, body), "", legend, "", "</details>", ""]
    return out


# ---------------------------------------------------------------------------------------------- HTML

def ratio_color(v) -> str:
    """Heatmap colour of a tol ratio: green 0 -> yellow 0.5 -> red >= 1, grey for none."""
    if v is None:
        return NO_DATA
    if math.isnan(v) or v >= 1:
        rgb = _RED
    elif v <= 0:
        rgb = _GREEN
    elif v < 0.5:
        rgb = _mix(_GREEN, _YELLOW, v / 0.5)
    else:
        rgb = _mix(_YELLOW, _ORANGE, (v - 0.5) / 0.5)
    return "#%02x%02x%02x" % rgb


def ratio_text_color(v) -> str:
    """White text on the failing red, dark elsewhere."""
    return "#ffffff" if v is not None and (math.isnan(v) or v >= 1) else "#1d2330"


def _mix(a, b, t):
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def _tint(hex_color: str, keep: float = 0.35) -> str:
    """A pale version of a colour, so whole table rows can carry it and stay readable."""
    rgb = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return "#%02x%02x%02x" % _mix((255, 255, 255), rgb, keep)


def _grid_view(grid: dict) -> dict:
    rows = []
    for rv in grid["rows"]:
        cells = []
        for cv in grid["cols"]:
            c = grid["cells"].get((rv, cv))
            if c is None:
                cells.append({"text": "", "bg": NO_DATA, "fg": "#1d2330", "title": "no cases", "n": 0, "n_bad": 0,
                              "n_err": 0, "note": ""})
                continue
            w = c["worst"]
            text = _fmt(w, 2) if w is not None else "err"
            bg = ERROR_BG if w is None else ratio_color(w)
            title = (f"{grid['row_axis']}={rv} {grid['col_axis']}={cv}: {c['n']} cases, worst {_fmt(w, 4)}, "
                     f"{c['n_fail']} fail, {c['n_err']} error")
            note = ", ".join(x for x in (f"{c['n_fail']} fail" if c["n_fail"] else "",
                                         f"{c['n_err']} err" if c["n_err"] else "") if x)
            cells.append({"text": text, "bg": bg, "fg": ratio_text_color(w), "title": title, "n": c["n"],
                          "n_bad": c["n_fail"] + c["n_err"], "n_err": c["n_err"], "note": note})
        rows.append({"label": rv, "cells": cells})
    return {"row_axis": grid["row_axis"], "col_axis": grid["col_axis"], "cols": grid["cols"], "rows": rows}


def _sort_value(v) -> str:
    """data-v for the JS sorter: numbers as text, NaN as worst, missing as empty (sorts last)."""
    if v is None:
        return ""
    if math.isnan(v):
        return "Infinity"
    return repr(float(v)) if not math.isinf(v) else ("Infinity" if v > 0 else "-Infinity")


@functools.lru_cache(maxsize=None)
def _html_template(name: str = "report.html.j2") -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                             autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(name)


def render_html(results, meta) -> str:
    results = list(results)
    meta = meta or {}
    summary = summarize(results)
    df = results_frame(results)
    varying = _varying_axes(df)
    shown_axes = [a for a in varying if a not in ("q_dtype", "kv_dtype", "out_dtype")]
    with_ms = _has_metric(results, "kernel_ms")

    # Kept to what fits a 1400px screen; every metric is in results.json.
    metric_cols = [("max_abs_err", "max err"), ("tol_ratio", "tol ratio"),
                   ("mean_ratio", "mean ratio"), ("adaptive_ratio", "adaptive ratio"),
                   ("e2e_max_abs_err", "e2e err"), ("lowp_max_abs_err", "low-prec err"),
                   ("n_beyond_tol", "beyond tol")]
    if with_ms:
        metric_cols.append(("kernel_ms", "kernel ms"))

    rows = []
    for r in ordered(results):
        t = tol_ratio(r)
        axes = r.axes or {}
        color = ratio_color(_worst_key(t)) if t is not None else NO_DATA
        bad = [_metric(r, k) for k in ("n_nan", "n_inf", "n_unwritten")]
        cells = []
        for key, _ in metric_cols:
            v = t if key == "tol_ratio" else adaptive_ratio(r) if key == "adaptive_ratio" else _metric(r, key)
            cells.append({"key": key, "v": _sort_value(v), "text": _fmt_metric(r, key) if key not in
                          ("tol_ratio", "adaptive_ratio") else _fmt(v),
                          "bg": color if key == "tol_ratio" else None,
                          "fg": ratio_text_color(_worst_key(t)) if key == "tol_ratio" else None})
        message = clean_message(r.message)
        search = " ".join([r.id, r.status, message, _dtype_pair(axes),
                           *(f"{a}={axes.get(a)}" for a in AXES)]).lower()
        rows.append({
            "id": r.id, "id_parts": r.id.split("_"), "status": r.status, "message": message,
            "nonfinite": "" if all(b is None for b in bad) else "/".join("-" if b is None else _fmt(b) for b in bad),
            "nonfinite_v": _sort_value(sum(b for b in bad if b is not None)) if any(b is not None for b in bad) else "",
            "dtype": _dtype_pair(axes), "axes": {a: str(axes.get(a, "")) for a in AXES},
            "shown_axes": [{"v": str(axes.get(a, "")), "sort": _natural_sort_attr(axes.get(a))} for a in shown_axes],
            "cells": cells, "sat": _sat(r), "time": _fmt(_case_time(r), 3), "time_v": _sort_value(_case_time(r)),
            "bg": ERROR_BG if r.status == "ERROR" else _tint(color), "search": search,
            "rerun": rerun_command(r, meta) if r.status != "PASS" else "",
        })

    filters = [{"axis": "status", "label": "status", "options": [s for s in STATUSES if summary["counts"].get(s)]},
               {"axis": "dtype", "label": "dtype q/kv/out", "options": sorted(df["dtype"].unique(), key=_natural)}]
    for a in varying:
        if a in ("q_dtype", "kv_dtype", "out_dtype"):
            continue
        filters.append({"axis": a, "label": a, "options": sorted(df[a].astype(str).unique(), key=_natural)})

    heatmaps = [_grid_view(worst_grid(df, "dtype", "block_size")), _grid_view(worst_grid(df, "dtype", "seqs"))]
    tpl = _html_template()
    bench = meta.get("bench_png_b64")
    if isinstance(bench, bytes):
        bench = bench.decode("ascii")
    tol = meta.get("tolerances")
    return tpl.render(
        title=f"Paged attention check: {summary['verdict']}",
        summary=summary, meta=meta, provenance=_provenance(meta, summary),
        worst_text=_fmt(summary["worst_ratio"], 3) if summary["worst_id"] is not None else "n/a",
        worst_bad=summary["worst_ratio"] is not None and summary["worst_ratio"] > 1,
        header=_header_line(meta), timing_html=_timing_html(meta), heatmaps=heatmaps,
        legend=[{"text": t, "bg": ratio_color(v), "fg": ratio_text_color(v)} for t, v in
                (("0", 0.0), ("0.25", 0.25), ("0.5", 0.5), ("0.75", 0.75), ("\u2265 1 (fail)", 1.0))]
        + [{"text": "no data", "bg": NO_DATA, "fg": "#1d2330"}, {"text": "errors only", "bg": ERROR_BG, "fg": "#1d2330"}],
        shown_axes=[(a, AXIS_LABELS.get(a, a)) for a in shown_axes], metric_cols=metric_cols, rows=rows, filters=filters,
        selfcheck=_selfcheck_view(meta["selfcheck"]) if meta.get("selfcheck") else None,
        bench_png_b64=re.sub(r"\s+", "", bench) if bench else None,
        tolerances=json.dumps(_jsonable(tol), indent=2, default=str) if tol else None,
        failing=[r for r in rows if r["status"] != "PASS"],
    )


def _natural_sort_attr(v) -> str:
    n = _num(v) if not isinstance(v, str) else None
    if n is None and isinstance(v, str):
        try:
            n = float(v)
        except ValueError:
            n = None
    return "" if n is None else _sort_value(n)


# ---------------------------------------------------------------------------------------------- JSON

# Non-finite floats are stored as these strings: strict JSON (jq, browsers) has no NaN/Infinity.
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def _unjson_numbers(x):
    """Undo _jsonable on the numeric dicts of a Result (metrics, rules, timings)."""
    if isinstance(x, str) and x in _NONFINITE:
        return _NONFINITE[x]
    if isinstance(x, dict):
        return {k: _unjson_numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjson_numbers(v) for v in x]
    return x


def results_json(results, meta) -> dict:
    results = list(results)
    return _jsonable({"format": 1, "meta": meta or {}, "summary": summarize(results),
                      "results": [r.to_dict() for r in results]})


def load_results_json(path) -> tuple:
    """(results, meta) back from a results.json written by write_reports."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    results = []
    for d in data.get("results", []):
        d = dict(d)
        for k in ("metrics", "rules", "timings"):
            if k in d:
                d[k] = _unjson_numbers(d[k] or {})
        results.append(Result.from_dict(d))
    return results, data.get("meta", {})


# ---------------------------------------------------------------------------------------------- JUnit

# XML 1.0 forbids most control characters (e.g. ANSI escapes in compiler errors); drop them.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(s) -> str:
    return _XML_BAD.sub("", str(s))


def render_junit(results, meta) -> str:
    results = list(results)
    meta = meta or {}
    summary = summarize(results)
    suite_name = Path(str(_m(meta, "cases_file", "cases"))).name
    wall = _num(meta.get("wall_s"))
    total_time = wall if wall is not None else sum(_case_time(r) for r in results)
    attrs = {"tests": str(summary["total"]), "failures": str(summary["FAIL"]), "errors": str(summary["ERROR"]),
             "skipped": "0", "time": f"{total_time:.3f}"}
    root = ET.Element("testsuites", {"name": _x(_m(meta, "kernel")), **attrs})
    suite = ET.SubElement(root, "testsuite", {"name": _x(suite_name), **attrs,
                                              "timestamp": _x(_m(meta, "started", "")),
                                              "hostname": _x(_m(meta, "device"))})
    props = ET.SubElement(suite, "properties")
    for key in ("commit", "kernel", "device", "mode", "torch", "triton", "cases_file", "seeds", "started", "wall_s"):
        if meta.get(key) is not None:
            ET.SubElement(props, "property", {"name": key, "value": _x(meta[key])})
    for r in results:
        tc = ET.SubElement(suite, "testcase", {"classname": "attention", "name": _x(r.id),
                                               "time": f"{_case_time(r):.3f}"})
        if r.status == "FAIL":
            el = ET.SubElement(tc, "failure", {"message": _x(r.message or "out of tolerance"), "type": "tolerance"})
            lines = [f"{k} = {_fmt_metric(r, k)}" for k in (r.metrics or {})]
            lines += [f"rule {k}: passed={v.get('passed')} ratio={_fmt(_num(v.get('ratio')), 4)}"
                      for k, v in (r.rules or {}).items() if isinstance(v, dict)]
            el.text = _x("\n".join(lines))
        elif r.status == "ERROR":
            first = (r.message or "error").strip().splitlines() or ["error"]
            el = ET.SubElement(tc, "error", {"message": _x(first[0][:500]), "type": "error"})
            el.text = _x(r.message or "")
        elif r.status != "PASS":
            ET.SubElement(tc, "skipped", {"message": _x(f"status {r.status}")})
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# ---------------------------------------------------------------------------------------------- writing

def _render_all(results, meta) -> dict:
    return {
        "results.json": json.dumps(results_json(results, meta), indent=1, default=str, allow_nan=False) + "\n",
        "report.md": render_markdown(results, meta),
        "report.html": render_html(results, meta),
        "junit.xml": render_junit(results, meta),
        "summary.txt": render_terminal(results, meta, color=False),
    }


def write_reports(out_dir, results, meta, started_at: float | None = None) -> Path:
    """Write the five reports into out_dir all at once (or not at all), then point <parent>/latest at it.
    started_at: time.perf_counter() when the command began. Given, the reports show their own time:
    they are rendered once, then meta["timing"]["reports"] (rendering them) and meta["wall_s"] (the
    command until then) are set and filled in."""
    results = list(results)
    if started_at is None:
        texts = _render_all(results, meta)
    else:
        t0 = time.perf_counter()
        texts = _render_all(results, _pending(meta))
        meta.setdefault("timing", {})["reports"] = time.perf_counter() - t0
        meta["wall_s"] = time.perf_counter() - started_at
        texts = _fill_pending(texts, results, meta)
    out_dir = Path(out_dir).absolute()
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        # mkdtemp makes the dir 0700; give it the usual permissions so the reports can be served.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.name != "latest":
        _point_latest(parent / "latest", out_dir)
    return out_dir


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename `new` to `target`. POSIX can't rename over a non-empty dir, so an old target is moved aside first
    and restored if the final rename fails."""
    if not target.exists() and not target.is_symlink():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    if target.is_symlink() or target.is_file():
        os.replace(target, old)
    else:
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _point_latest(link: Path, target: Path) -> None:
    tmp_link = link.parent / f".{link.name}.tmp-{os.getpid()}"
    try:
        tmp_link.unlink(missing_ok=True)
        # Relative, so the reports tree can be moved or archived as a whole.
        os.symlink(os.path.relpath(target, link.parent), tmp_link, target_is_directory=True)
    except (OSError, NotImplementedError):
        _copy_latest(link, target)
        return
    try:
        os.replace(tmp_link, link)
    except OSError:
        # `latest` is a real directory (an earlier copy): os.replace can't put a link over it.
        _swap_into_place(tmp_link, link)


def _copy_latest(link: Path, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{link.name}.tmp-", dir=link.parent))
    try:
        shutil.copytree(target, tmp, dirs_exist_ok=True)
        _swap_into_place(tmp, link)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
