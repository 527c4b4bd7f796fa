"""Self-check: does the harness catch known-bad kernels, and does it leave the correct one alone?

Every variant of harness.mutants runs on every case; the correct kernel runs on every case with
N seeds. A variant is caught when some case gives it a tolerance-rule ratio (error / tolerance,
the larger of the element-wise and mean ratios: either half fails the rule) of at least
KILL_RATIO: a clear numeric kill, not a near miss. A variant that raises on a case is an error
there, never a kill. The bar: every variant caught, and the correct kernel passing every rule
on every seed with its worst tol ratio (element-wise error / (atol + rtol |ref|), the bound
cases/tolerances.yaml sets at twice the kernel's own rounding) at most CORRECT_LIMIT.

Inputs and references are built once per case and seed and shared by every kernel judged on them.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from harness.matrix import seeded
from harness.mutants import CATALOGUE, MutantBuilder, Mutation, StaleMutation
from harness.reports import tol_ratio
from harness.runner import (compute_references, error_result, judge, launch_kernel, prepare_inputs,
                            run_case)
from harness.schema import Result

KILL_RATIO = 10.0      # a variant counts as caught at this tolerance ratio or above
CORRECT_LIMIT = 0.5    # the correct kernel's worst tolerance ratio may not exceed this


def rule_ratio(result: Result) -> Optional[float]:
    """The tolerance rule's ratio of a judged result; None for ERROR rows."""
    v = ((result.rules or {}).get("tolerance") or {}).get("ratio")
    return None if v is None else float(v)


def _worst_metric(results, key: str) -> Optional[float]:
    vals = [float(r.metrics[key]) for r in results if (r.metrics or {}).get(key) is not None]
    return max(vals, key=_order) if vals else None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


@dataclass
class VariantOutcome:
    mutation: Mutation
    ratios: dict = field(default_factory=dict)   # case id -> tolerance ratio (numeric only)
    errors: dict = field(default_factory=dict)   # case id -> why no ratio (it raised, or NaN)
    unusable: str = ""                           # why the variant could not be built at all

    @property
    def best_ratio(self) -> Optional[float]:
        return max(self.ratios.values(), default=None)

    @property
    def best_case(self) -> Optional[str]:
        return max(self.ratios, key=self.ratios.get) if self.ratios else None

    @property
    def killed_by(self) -> list:
        return [c for c, r in self.ratios.items() if r >= KILL_RATIO]

    @property
    def caught(self) -> bool:
        return not self.unusable and bool(self.killed_by)


@dataclass
class SelfCheckRun:
    cases: list                                  # [Case], seed-0 cases the variants ran on
    seeds: int
    variants: list                               # [VariantOutcome], catalogue order
    correct: list                                # [Result] of the correct kernel, every case x seed
    timing: dict = field(default_factory=dict)   # phase -> seconds

    @property
    def kill_rate(self) -> float:
        return sum(v.caught for v in self.variants) / len(self.variants) if self.variants else 0.0

    @property
    def weakest(self) -> Optional[VariantOutcome]:
        """The usable variant with the lowest best ratio (the smallest kill margin)."""
        usable = [v for v in self.variants if v.best_ratio is not None]
        return min(usable, key=lambda v: v.best_ratio) if usable else None

    @property
    def correct_worst(self) -> Optional[Result]:
        """The correct kernel's run with the highest tol ratio."""
        judged = [r for r in self.correct if tol_ratio(r) is not None]
        return max(judged, key=lambda r: _order(tol_ratio(r))) if judged else None

    @property
    def correct_worst_ratio(self) -> Optional[float]:
        worst = self.correct_worst
        return tol_ratio(worst) if worst else None

    def problems(self) -> list:
        """Every reason the bar is not met; empty when it is."""
        out = []
        for v in self.variants:
            if v.unusable:
                out.append(f"variant {v.mutation.name}: {v.unusable}")
            elif not v.caught:
                best = "no numeric result" if v.best_ratio is None else f"best ratio {v.best_ratio:.3g}"
                out.append(f"variant {v.mutation.name} not caught ({best} < {KILL_RATIO:g})")
        if not self.variants:
            out.append("no variants ran")
        # Every rule computed, not only those the tolerance file makes decisive.
        bad = [r for r in self.correct if r.status != "PASS"
               or not all(v.get("passed") for v in (r.rules or {}).values())]
        for r in bad[:5]:
            failed = [name for name, v in (r.rules or {}).items() if not v.get("passed")]
            why = r.message or f"rule {', '.join(failed)} not passed"
            out.append(f"correct kernel {r.status} on {r.id}: {why}")
        if len(bad) > 5:
            out.append(f"correct kernel: {len(bad) - 5} more cases not passing")
        worst = self.correct_worst_ratio
        if worst is not None and not worst <= CORRECT_LIMIT:
            out.append(f"correct kernel worst tol ratio {worst:.3g} > {CORRECT_LIMIT:g} "
                       f"({self.correct_worst.id})")
        if not self.correct:
            out.append("the correct kernel ran on no case")
        return out

    @property
    def met(self) -> bool:
        return not self.problems()

    def meta(self) -> dict:
        """The meta["selfcheck"] section harness.reports renders."""
        ids = [c.id for c in self.cases]
        weakest = self.weakest
        return {
            "variants": [{
                "name": v.mutation.name, "description": v.mutation.description, "kind": v.mutation.kind,
                "caught": v.caught, "best_ratio": v.best_ratio, "best_case": v.best_case,
                "killed_by": v.killed_by, "errors": dict(v.errors),
                **({"unusable": v.unusable} if v.unusable else {}),
            } for v in self.variants],
            "kill_rate": self.kill_rate,
            "kill_ratio": KILL_RATIO,
            "weakest_kill": ({"variant": weakest.mutation.name, "ratio": weakest.best_ratio,
                              "case": weakest.best_case} if weakest else None),
            "correct_worst_ratio": self.correct_worst_ratio,
            "correct_worst_id": self.correct_worst.id if self.correct_worst else None,
            "correct_limit": CORRECT_LIMIT,
            "correct_worst_mean_ratio": _worst_metric(self.correct, "mean_ratio"),
            "correct_worst_adaptive_ratio": _worst_metric(self.correct, "adaptive_ratio"),
            "correct_runs": len(self.correct),
            "seeds": self.seeds,
            "cases": ids,
            # ERROR cells are null: an exception is not a kill.
            "matrix": {v.mutation.name: {c: v.ratios.get(c) for c in ids} for v in self.variants},
            "met": self.met,
            "problems": self.problems(),
        }


def _order(x: float) -> float:
    return math.inf if math.isnan(x) else x


def run_selfcheck(cases, tolerances, seeds: int, correct_kernel: Callable, device: str,
                  mutations=CATALOGUE, source: Optional[str] = None,
                  log: Optional[Callable[[str], None]] = None) -> SelfCheckRun:
    """Judge every variant on every case and the correct kernel on every case x seed."""
    cases = list(cases)
    outcomes = [VariantOutcome(m) for m in mutations]
    run = SelfCheckRun(cases=cases, seeds=seeds, variants=outcomes, correct=[])
    t = run.timing = {"build": 0.0, "inputs": 0.0, "reference": 0.0, "correct kernel": 0.0, "variants": 0.0}
    with MutantBuilder(source) as builder:
        t0 = time.perf_counter()
        kernels = {}
        for o in outcomes:
            try:
                kernels[o.mutation.name] = builder.build(o.mutation)
            except StaleMutation as e:
                o.unusable = str(e)
            except Exception as e:   # a mutant that does not even import is no kill either
                o.unusable = f"mutated kernel does not import: {_first_line(e)}"
            if o.unusable and log:
                log(f"variant {o.mutation.name}: {o.unusable}")
        t["build"] += time.perf_counter() - t0

        for i, case in enumerate(cases):
            t_case = time.perf_counter()
            tol = tolerances.for_case(case)
            judge_args = (tol, tolerances.adaptive, tolerances.rules, device)
            timings = {}
            stage = "inputs"
            try:
                inputs = prepare_inputs(case, device, timings)
                stage = "reference"
                refs = compute_references(inputs, device, timings)
            except Exception as e:
                run.correct.append(error_result(case, stage, e, timings))
                for o in outcomes:
                    if not o.unusable:
                        o.errors[case.id] = f"{stage}: {_first_line(e)}"
                inputs = refs = None
            if inputs is not None:
                # -- the correct kernel, judged exactly as `verify` judges it --
                stage = "kernel"
                try:
                    got = launch_kernel(correct_kernel, inputs, device, timings)
                    stage = "metrics"
                    run.correct.append(judge(case, inputs, refs, got, *judge_args, timings))
                except Exception as e:
                    run.correct.append(error_result(case, stage, e, timings))

                # -- every variant on the same inputs, one launch each: only its ratio matters --
                t0 = time.perf_counter()
                for o in outcomes:
                    if o.unusable:
                        continue
                    try:
                        got = launch_kernel(kernels[o.mutation.name], inputs, device, {}, twice=False)
                        ratio = rule_ratio(judge(case, inputs, refs, got, *judge_args, {}))
                    except Exception as e:
                        o.errors[case.id] = f"kernel: {_first_line(e)}"
                        continue
                    if ratio is None or math.isnan(ratio):
                        o.errors[case.id] = "tolerance ratio is NaN"
                    else:
                        o.ratios[case.id] = ratio
                t["variants"] += time.perf_counter() - t0

            # -- more seeds for the correct kernel --
            for k in range(1, seeds):
                run.correct.append(run_case(seeded(case, k), *judge_args[:3], correct_kernel, device))

            if log:
                mine = run.correct[-seeds:]
                worst = max((tol_ratio(r) for r in mine if tol_ratio(r) is not None), default=None)
                n_bad = sum(r.status != "PASS" for r in mine)
                usable = [o for o in outcomes if not o.unusable]
                n_kill = sum(case.id in o.ratios and o.ratios[case.id] >= KILL_RATIO for o in usable)
                log(f"[{i + 1}/{len(cases)}] {case.id}: correct worst tol ratio {_ratio_text(worst)} over {seeds} seeds"
                    + (f" ({n_bad} not passing)" if n_bad else "")
                    + f"; {n_kill}/{len(usable)} variants caught here ({time.perf_counter() - t_case:.1f} s)")
    for r in run.correct:
        t["inputs"] += r.timings.get("inputs", 0.0)
        t["reference"] += r.timings.get("reference", 0.0)
        t["correct kernel"] += r.timings.get("kernel_first", 0.0) + r.timings.get("kernel", 0.0)
    return run


def run_from_shards(shards: list, cases: list, seeds: int, mutations=CATALOGUE) -> SelfCheckRun:
    """One SelfCheckRun from the (results, meta) of self-checks run on disjoint slices of `cases`."""
    outcomes = {m.name: VariantOutcome(m) for m in mutations}
    run = SelfCheckRun(cases=list(cases), seeds=seeds, variants=list(outcomes.values()), correct=[],
                       timing={})
    for results, meta in shards:
        run.correct.extend(results)
        for phase, secs in (meta.get("timing") or {}).items():
            run.timing[phase] = run.timing.get(phase, 0.0) + secs
        for v in (meta.get("selfcheck") or {}).get("variants", []):
            o = outcomes.get(v["name"])
            if o is None:
                continue
            o.ratios.update({c: r for c, r in meta["selfcheck"]["matrix"].get(v["name"], {}).items()
                             if r is not None})
            o.errors.update(v.get("errors") or {})
            o.unusable = o.unusable or v.get("unusable", "")
    return run


# ---------------------------------------------------------------------------------------------- terminal

def _ratio_text(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def render_kill_matrix(run: SelfCheckRun) -> str:
    """Variants x cases table of tolerance ratios ('*' marks a kill), with its case legend."""
    from tabulate import tabulate
    ids = [c.id for c in run.cases]
    headers = ["variant", "kind", *[f"c{j + 1}" for j in range(len(ids))], "best", "caught"]
    rows = []
    for o in run.variants:
        if o.unusable:
            rows.append([o.mutation.name, o.mutation.kind, *(["stale" if "no longer applies" in o.unusable
                                                               else "n/a"] * len(ids)), "-", "NO"])
            continue
        cells = []
        for c in ids:
            if c in o.errors:
                cells.append("ERR")
            else:
                r = o.ratios.get(c)
                cells.append(_ratio_text(r) + ("*" if r is not None and r >= KILL_RATIO else ""))
        rows.append([o.mutation.name, o.mutation.kind, *cells, _ratio_text(o.best_ratio),
                     "yes" if o.caught else "NO"])
    out = [tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True,
                    colalign=("left", "left", *(["right"] * (len(ids) + 1)), "left")),
           f"cells: tolerance-rule ratio (error / tolerance); * = caught (>= {KILL_RATIO:g}); ERR = raised (no kill)",
           ""]
    out += [f"c{j + 1} = {c}" for j, c in enumerate(ids)]
    errors = [(o.mutation.name, c, msg) for o in run.variants for c, msg in o.errors.items()]
    if errors:
        out.append("")
        out += [f"ERR {name} on c{ids.index(c) + 1}: {msg[:200]}" for name, c, msg in errors]
    unusable = [o for o in run.variants if o.unusable]
    if unusable:
        out.append("")
        out += [f"{o.mutation.name}: {o.unusable}" for o in unusable]
    return "\n".join(out)


def render_summary(run: SelfCheckRun) -> str:
    n_caught = sum(v.caught for v in run.variants)
    weakest = run.weakest
    ids = [c.id for c in run.cases]
    lines = [f"kill rate: {n_caught}/{len(run.variants)} = {100 * run.kill_rate:.0f}% "
             f"(caught: tolerance ratio >= {KILL_RATIO:g} on at least one case)"]
    if weakest:
        lines.append(f"weakest kill margin: {_ratio_text(weakest.best_ratio)} "
                     f"({weakest.mutation.name}, best on c{ids.index(weakest.best_case) + 1})")
    worst = run.correct_worst
    n_pass = sum(r.status == "PASS" for r in run.correct)
    if worst:
        lines.append(f"correct kernel: worst tol ratio {_ratio_text(tol_ratio(worst))} (limit {CORRECT_LIMIT:g}; "
                     f"{worst.id}); worst mean ratio {_ratio_text(_worst_metric(run.correct, 'mean_ratio'))}, "
                     f"worst adaptive ratio {_ratio_text(_worst_metric(run.correct, 'adaptive_ratio'))} "
                     f"(rules pass at <= 1); {n_pass}/{len(run.correct)} runs pass "
                     f"({len(run.cases)} cases x {run.seeds} seeds)")
    else:
        lines.append(f"correct kernel: no judged run ({n_pass}/{len(run.correct)} pass)")
    problems = run.problems()
    lines.append("verdict: " + ("MET" if not problems else "NOT MET"))
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
