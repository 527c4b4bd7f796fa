"""Compare two benchmark runs (bench.run's JSON): which rows got slower, which bars were lost.

    python -m bench.compare BASE.json NEW.json [--slower 1.10] [--markdown FILE]

Rows are matched by id. A row's change is its time over the floor that its own run's ceilings
imply (`time_over_floor`), new over base: a lease whose copy bandwidth or matmul rate differs
moves the floor with it, so the ratio speaks of the kernel rather than the machine. The raw
time ratio stands beside it. Between two runs on the same device a row is slower (or faster)
only where its raw time says so too: there the ceilings differ by measurement alone. In 29 runs
on H200 leases (results/h200/*.json) the matmul rates spread 18% (bf16 672-793, FP8 1240-1465
TFLOP/s; copy bandwidth 0.7%), while unchanged compute-bound rows kept their times within 2%.
Rows without a floor (no ceilings) are compared by raw time.

Exit status: 0 nothing regressed; 1 a row slower than --slower, a row that passed its check in
BASE and failed or did not run in NEW, or a bar met in BASE and missed in NEW; 2 bad input.
Reads JSON only: no GPU, torch or triton needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from bench import fmt

# Repeated H200 runs of one compiled variant (results/h200/tuning_sweeps.json, FP8 decode 64 x
# 4096): 212.4-213.8 us in four runs with blocks of 16 (0.7%), 228.7-233.6 us in three with blocks
# of 64 (2.1%). A change under 5% is not told apart from the machine.
DEFAULT_SLOWER = 1.05
EXIT_OK, EXIT_REGRESSED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """A file that is no GPU benchmark run, or two runs with nothing to compare; one line."""


@dataclass
class RowChange:
    id: str
    base_us: Optional[float]
    new_us: Optional[float]
    time_ratio: Optional[float]    # new / base median time
    ratio: Optional[float]         # new / base time over floor (time ratio where a run has no floor)
    verdict: str                   # "slower", "faster", "" (within the band), "broken", "not run"


@dataclass
class BarChange:
    name: str
    target: str
    base: Optional[float]
    base_met: bool
    new: Optional[float]
    new_met: bool

    @property
    def lost(self) -> bool:
        return self.base_met and not self.new_met


@dataclass
class Comparison:
    base: dict
    new: dict
    slower: float
    rows: List[RowChange]
    bars: List[BarChange]
    only_base: List[str]
    only_new: List[str]

    @property
    def regressions(self) -> List[RowChange]:
        return [r for r in self.rows if r.verdict in ("slower", "broken", "not run")]

    @property
    def regressed(self) -> bool:
        return bool(self.regressions) or any(b.lost for b in self.bars)


def load_run(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        run = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not JSON ({e})") from None
    if not isinstance(run, dict) or not isinstance(run.get("rows"), list):
        raise BadInput(f"{path}: no 'rows' list: not a bench.run result")
    if run.get("backend") != "cuda":
        raise BadInput(f"{path}: backend {run.get('backend')!r}: times from Triton's interpreter are not GPU speed")
    return run


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _passed(row: dict) -> bool:
    return row.get("status") == "ok" and bool((row.get("check") or {}).get("passed"))


def compare_rows(base_row: dict, new_row: dict, slower: float, same_device: bool = False) -> RowChange:
    change = RowChange(id=base_row["id"], base_us=base_row.get("median_us"), new_us=new_row.get("median_us"),
                       time_ratio=None, ratio=None, verdict="")
    if not _passed(base_row):
        return change  # nothing to regress from
    if not _passed(new_row):
        check = new_row.get("check")
        change.verdict = "broken" if check and not check.get("passed") else "not run"  # wrong, or no time
        return change
    change.time_ratio = _ratio(change.new_us, change.base_us)
    change.ratio = _ratio(new_row.get("time_over_floor"), base_row.get("time_over_floor")) or change.time_ratio
    if change.ratio is not None:
        # On one device the raw time must agree: its ceilings moved by measurement alone.
        ratios = [change.ratio] + ([change.time_ratio] if same_device and change.time_ratio is not None else [])
        change.verdict = "slower" if min(ratios) > slower else "faster" if max(ratios) < 1 / slower else ""
    return change


def _same_device(base: dict, new: dict) -> bool:
    return base.get("device") is not None and base.get("device") == new.get("device")


def compare(base: dict, new: dict, slower: float = DEFAULT_SLOWER) -> Comparison:
    if not slower > 1:
        raise BadInput(f"--slower {slower}: must be > 1")
    base_rows = {r["id"]: r for r in base["rows"]}
    new_rows = {r["id"]: r for r in new["rows"]}
    common = [i for i in base_rows if i in new_rows]
    if not common:
        raise BadInput("the two runs share no row id: nothing to compare")
    rows = [compare_rows(base_rows[i], new_rows[i], slower, _same_device(base, new)) for i in common]
    bars = []
    for name, b in (base.get("bars") or {}).items():
        n = (new.get("bars") or {}).get(name)
        if n is None or set(b.get("rows") or ()) != set(n.get("rows") or ()):
            continue  # a bar over other rows (a filtered run) is another measurement
        if not b.get("rows"):
            continue  # a bar over no row (filtered out of both runs) measured nothing
        bars.append(BarChange(name, f"{b['comparison']} {b['target']:g}", b.get("measured"), bool(b.get("met")),
                              n.get("measured"), bool(n.get("met"))))
    return Comparison(base=base, new=new, slower=slower, rows=rows, bars=bars,
                      only_base=[i for i in base_rows if i not in new_rows],
                      only_new=[i for i in new_rows if i not in base_rows])


# ----------------------------------------------------------------------------- output
def _label(run: dict) -> str:
    commit = str(run.get("commit") or "?")[:12]
    kernel = f"{run['kernel']} at " if run.get("kernel") else ""  # runs before --kernel name none
    return f"{kernel}{commit}{' (kernel modified)' if run.get('kernel_modified') else ''} on {run.get('device', '?')}"


def _row_table(c: Comparison) -> tuple:
    order = sorted(c.rows, key=lambda r: (r.verdict == "", -(r.ratio or 0)))
    return (["row", "base us", "new us", "x time", "x floor-relative", "verdict"],
            [[r.id, fmt(r.base_us, ".1f"), fmt(r.new_us, ".1f"), fmt(r.time_ratio, ".3f"), fmt(r.ratio, ".3f"), r.verdict]
             for r in order])


def _bar_table(c: Comparison) -> tuple:
    return (["bar", "target", "base", "new", "change"],
            [[b.name, b.target, f"{fmt(b.base, '.3f')} {'met' if b.base_met else 'missed'}",
              f"{fmt(b.new, '.3f')} {'met' if b.new_met else 'missed'}",
              "LOST" if b.lost else "gained" if b.new_met and not b.base_met else ""] for b in c.bars])


def summary_line(c: Comparison) -> str:
    count = lambda v: sum(r.verdict == v for r in c.rows)  # noqa: E731
    lost = [b.name for b in c.bars if b.lost]
    return (f"{'REGRESSED' if c.regressed else 'OK'}: {len(c.rows)} rows compared, {count('slower')} slower than "
            f"{c.slower:g}x, {count('faster')} faster, {count('broken')} broken, {count('not run')} not run; "
            f"bars lost: {', '.join(lost) if lost else 'none'}")


def _notes(c: Comparison) -> List[str]:
    notes = []
    if not _same_device(c.base, c.new):
        notes.append("The devices differ: compare the floor-relative column, which divides each time by its "
                     "own run's floor.")
    else:
        notes.append("One device: a row is slower or faster only where its time and its floor-relative time "
                     "both say so (the ceilings of two runs differ by measurement).")
    sha = c.base.get("kernel_sha256")
    if sha and sha == c.new.get("kernel_sha256"):
        notes.append(f"Both runs timed the same kernel source (sha256 {sha}): what differs is the machine or "
                     "the run, not the kernel.")
    for label, ids in (("only in base", c.only_base), ("only in new", c.only_new)):
        if ids:
            notes.append(f"{len(ids)} rows {label}, not compared: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}")
    return notes


def render_terminal(c: Comparison) -> str:
    from tabulate import tabulate
    out = [f"base: {_label(c.base)}", f"new:  {_label(c.new)}", ""]
    out.append(tabulate(_row_table(c)[1], headers=_row_table(c)[0], disable_numparse=True))
    if c.bars:
        out += ["", tabulate(_bar_table(c)[1], headers=_bar_table(c)[0], disable_numparse=True)]
    out += ["", *_notes(c), summary_line(c)]
    return "\n".join(out) + "\n"


def render_markdown(c: Comparison) -> str:
    from tabulate import tabulate
    out = [f"# Kernel speed: {'REGRESSED' if c.regressed else 'OK'}", "",
           f"base `{_label(c.base)}`, new `{_label(c.new)}`; a row is slower or faster beyond {c.slower:g}x "
           f"of its time over its own run's floor{', and of its time, on one device' if _same_device(c.base, c.new) else ''}.",
           "", summary_line(c), ""]
    out += [tabulate(_row_table(c)[1], headers=_row_table(c)[0], tablefmt="github", disable_numparse=True), ""]
    if c.bars:
        out += [tabulate(_bar_table(c)[1], headers=_bar_table(c)[0], tablefmt="github", disable_numparse=True), ""]
    return "\n".join(out + _notes(c)) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="bench.run JSON of the base (e.g. results/h200/bench.json)")
    parser.add_argument("new", help="bench.run JSON of the change")
    parser.add_argument("--slower", type=float, default=DEFAULT_SLOWER,
                        help=f"flag a row whose floor-relative time (and, on one device, time) grew by this factor "
                             f"(default {DEFAULT_SLOWER})")
    parser.add_argument("--markdown", help="also write the comparison as markdown here (e.g. a CI job summary)")
    args = parser.parse_args(argv)
    try:
        c = compare(load_run(args.base), load_run(args.new), args.slower)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(render_terminal(c), end="")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(c), encoding="utf-8")
        print(f"markdown: {args.markdown}")
    return EXIT_REGRESSED if c.regressed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
