"""Compare two runs' results.json case by case: what regressed from a base run to a new one.

Regressions (exit 1): a case that passed and now fails or errors (flip); a failing case that now
errors (new error); a case whose max_abs_err or tol_ratio grew by the growth factor or more,
even while still passing (ignored when both errors are below TINY_ERROR, where growth is noise).
Listed without failing: cases fixed, and cases present in only one of the files.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tabulate import tabulate

from harness.reports import MESSAGE_CHARS, load_results_json, tol_ratio

DEFAULT_GROWTH = 2.0
TINY_ERROR = 1e-6          # below this on both sides, a growth factor says nothing
MAX_ROWS = 200             # per section, so a CI summary stays readable


class DiffInputError(Exception):
    """A results file that cannot be read or is not a results.json; str() is one line."""


@dataclass
class Change:
    id: str
    base_status: str = ""
    new_status: str = ""
    base_err: Optional[float] = None       # max_abs_err
    new_err: Optional[float] = None
    base_ratio: Optional[float] = None     # tol_ratio
    new_ratio: Optional[float] = None
    growth: Optional[float] = None         # the larger of the two growth factors
    grown: str = ""                        # which metrics grew beyond the factor
    message: str = ""                      # the new run's message (or the base's when only there)


@dataclass
class Diff:
    growth_factor: float
    flips: list = field(default_factory=list)        # PASS -> FAIL/ERROR
    new_errors: list = field(default_factory=list)   # FAIL -> ERROR
    grown: list = field(default_factory=list)        # error or tol ratio grew beyond the factor
    fixed: list = field(default_factory=list)        # FAIL/ERROR -> PASS
    only_base: list = field(default_factory=list)
    only_new: list = field(default_factory=list)
    n_base: int = 0
    n_new: int = 0
    n_common: int = 0
    notes: list = field(default_factory=list)        # e.g. the tolerances differ

    @property
    def regressed(self) -> bool:
        return bool(self.flips or self.new_errors or self.grown)


def load(path) -> tuple:
    """(results, meta) of a results.json; DiffInputError when unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DiffInputError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise DiffInputError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise DiffInputError(f"{path}: not a results.json (no 'results' list)")
    try:
        results, meta = load_results_json(path)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise DiffInputError(f"{path}: malformed result rows ({type(e).__name__}: {e})") from None
    for r in results:
        if not isinstance(r.id, str) or r.status not in ("PASS", "FAIL", "ERROR"):
            raise DiffInputError(f"{path}: a result row has no id or an unknown status ({r.status!r})")
    return results, meta if isinstance(meta, dict) else {}


def _num(x) -> Optional[float]:
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _grew(base: Optional[float], new: Optional[float], factor: float) -> Optional[float]:
    """new / base when that reaches the factor (an error that doubled is flagged at the default 2x);
    NaN counts as infinitely large."""
    if base is None or new is None:
        return None
    base = math.inf if math.isnan(base) else base
    new = math.inf if math.isnan(new) else new
    if math.isinf(base):
        return None
    if base == 0:
        return math.inf if new > 0 else None
    return new / base if new >= factor * base else None


def _by_id(results, label: str, notes: list) -> dict:
    out = {}
    for r in results:
        if r.id in out:
            notes.append(f"{label}: case {r.id} appears more than once; the last row counts")
        out[r.id] = r
    return out


def compare(base, new, growth_factor: float = DEFAULT_GROWTH, base_meta=None, new_meta=None) -> Diff:
    if not growth_factor > 1:
        raise ValueError(f"growth factor {growth_factor}: must be > 1")
    d = Diff(growth_factor=growth_factor)
    b = _by_id(base, "base", d.notes)
    n = _by_id(new, "new", d.notes)
    d.n_base, d.n_new = len(b), len(n)
    if base_meta and new_meta and base_meta.get("tolerances") and new_meta.get("tolerances") \
            and base_meta["tolerances"] != new_meta["tolerances"]:
        d.notes.append("the two runs used different tolerances: tol ratios are not comparable")

    for cid, nr in n.items():
        br = b.get(cid)
        if br is None:
            d.only_new.append(Change(cid, new_status=nr.status, new_err=_num((nr.metrics or {}).get("max_abs_err")),
                                     new_ratio=tol_ratio(nr), message=nr.message))
            continue
        d.n_common += 1
        c = Change(cid, br.status, nr.status,
                   _num((br.metrics or {}).get("max_abs_err")), _num((nr.metrics or {}).get("max_abs_err")),
                   tol_ratio(br), tol_ratio(nr), message=nr.message or br.message)
        if br.status == "PASS" and nr.status != "PASS":
            d.flips.append(c)
            continue
        if br.status == "FAIL" and nr.status == "ERROR":
            d.new_errors.append(c)
            continue
        if br.status != "PASS" and nr.status == "PASS":
            d.fixed.append(c)
        tiny = (c.base_err is not None and c.new_err is not None
                and abs(c.base_err) < TINY_ERROR and abs(c.new_err) < TINY_ERROR)
        if tiny:
            continue
        grew = {name: g for name, g in (("max_abs_err", _grew(c.base_err, c.new_err, growth_factor)),
                                        ("tol_ratio", _grew(c.base_ratio, c.new_ratio, growth_factor)))
                if g is not None}
        if grew:
            c.growth = max(grew.values())
            c.grown = ", ".join(grew)
            d.grown.append(c)
    for cid, br in b.items():
        if cid not in n:
            d.only_base.append(Change(cid, base_status=br.status, base_err=_num((br.metrics or {}).get("max_abs_err")),
                                      base_ratio=tol_ratio(br), message=br.message))
    d.grown.sort(key=lambda c: -c.growth)
    return d


# ---------------------------------------------------------------------------------------------- rendering

def _f(x: Optional[float]) -> str:
    if x is None:
        return ""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def _growth_text(x: Optional[float]) -> str:
    return "" if x is None else ("new > 0 (base 0)" if math.isinf(x) else f"{x:.2f}x")


def _sections(d: Diff):
    """(title, headers, rows, fails) for every non-empty section, regressions first."""
    both = ["id", "base", "new", "max_err base", "max_err new", "tol_ratio base", "tol_ratio new"]

    def row(c: Change, *extra):
        return [c.id, c.base_status, c.new_status, _f(c.base_err), _f(c.new_err), _f(c.base_ratio),
                _f(c.new_ratio), *extra]

    specs = [
        ("Flipped PASS -> FAIL/ERROR", both + ["message"], [row(c, c.message[:MESSAGE_CHARS]) for c in d.flips], True),
        ("New errors (FAIL -> ERROR)", both + ["message"], [row(c, c.message[:MESSAGE_CHARS]) for c in d.new_errors], True),
        (f"Grew {d.growth_factor:g}x or more", both + ["growth", "grew"],
         [row(c, _growth_text(c.growth), c.grown) for c in d.grown], True),
        ("Fixed (FAIL/ERROR -> PASS)", both, [row(c) for c in d.fixed], False),
        ("Only in base", ["id", "status", "max_err", "tol_ratio"],
         [[c.id, c.base_status, _f(c.base_err), _f(c.base_ratio)] for c in d.only_base], False),
        ("Only in new", ["id", "status", "max_err", "tol_ratio"],
         [[c.id, c.new_status, _f(c.new_err), _f(c.new_ratio)] for c in d.only_new], False),
    ]
    return [s for s in specs if s[2]]


def verdict_line(d: Diff) -> str:
    counts = (f"{len(d.flips)} flipped to FAIL/ERROR, {len(d.new_errors)} new errors, "
              f"{len(d.grown)} grew {d.growth_factor:g}x or more")
    extra = (f"; {len(d.fixed)} fixed, {len(d.only_base)} only in base, {len(d.only_new)} only in new"
             f" ({d.n_common} cases in both)")
    return ("REGRESSION: " if d.regressed else "OK: ") + counts + extra


def _label(path, meta: dict) -> str:
    commit = (meta or {}).get("commit")
    return f"{path}" + (f" (commit {str(commit)[:12]})" if commit else "")


def render_terminal(d: Diff, base_label: str, new_label: str) -> str:
    out = [f"diff: base {base_label}: {d.n_base} cases; new {new_label}: {d.n_new} cases", ""]
    for note in d.notes:
        out.append(f"note: {note}")
    if d.notes:
        out.append("")
    for title, headers, rows, _ in _sections(d):
        shown = rows[:MAX_ROWS]
        out += [f"{title}: {len(rows)}", tabulate(shown, headers=headers, tablefmt="simple", disable_numparse=True)]
        if len(rows) > len(shown):
            out.append(f"... {len(rows) - len(shown)} more")
        out.append("")
    out.append(verdict_line(d))
    return "\n".join(out) + "\n"


def _md_cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(d: Diff, base_label: str, new_label: str) -> str:
    out = [f"# Results diff: {'REGRESSION' if d.regressed else 'OK'}", "",
           f"Base `{base_label}` ({d.n_base} cases) against new `{new_label}` ({d.n_new} cases); "
           f"growth limit {d.growth_factor:g}x (ignored where both errors are below {TINY_ERROR:g}).", "",
           f"**{verdict_line(d)}**", ""]
    out += [f"> note: {_md_cell(n)}" for n in d.notes]
    if d.notes:
        out.append("")
    for title, headers, rows, fails in _sections(d):
        shown = rows[:MAX_ROWS]
        body = [[f"`{r[0]}`", *r[1:]] for r in shown]
        out += [f"## {title} ({len(rows)})" + ("" if fails else " (informational)"), "",
                tabulate([[_md_cell(x) for x in r] for r in body], headers=[_md_cell(h) for h in headers],
                         tablefmt="github", disable_numparse=True), ""]
        if len(rows) > len(shown):
            out += [f"... {len(rows) - len(shown)} more", ""]
    return "\n".join(out)


def diff_files(base_path, new_path, growth_factor: float = DEFAULT_GROWTH) -> tuple:
    """(Diff, base label, new label) of two results.json files; DiffInputError when unreadable."""
    base, base_meta = load(base_path)
    new, new_meta = load(new_path)
    d = compare(base, new, growth_factor, base_meta, new_meta)
    return d, _label(base_path, base_meta), _label(new_path, new_meta)
