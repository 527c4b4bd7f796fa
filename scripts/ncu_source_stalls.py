"""Where a kernel's warps wait, per SASS instruction, from Nsight Compute's source page (no GPU needed).

    python scripts/ncu_source_stalls.py SOURCE.csv [--top 25]

SOURCE.csv is `ncu -i REPORT --page source --csv --print-source sass` of a report collected with
`--section SourceCounters` (scripts/ncu_profile.sh's `source` mode does both). Prints the stall
reasons' shares of all warp samples, the shares per opcode, and the instructions holding the most
samples, each with its offset in the kernel, its two main reasons and the instruction before it
(a barrier that waits on the long scoreboard is waiting for what the instruction before it
ordered, e.g. the cp.async group of the tile being consumed).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"


def read_source_page(path) -> list:
    """The rows of the CSV's instruction table (ncu prints the kernel's name on a line above it)."""
    lines = Path(path).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), None)
    if start is None:
        raise SystemExit(f"{path}: no instruction table (expected a header line starting with \"Address\")")
    return list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))


def _n(row, key) -> float:
    try:
        return float(row.get(key) or 0)
    except ValueError:
        return 0.0


def opcode(source: str) -> str:
    """`@!P0 BRA 0x...` -> `BRA`; `IMAD.WIDE.U32 R1, ...` -> `IMAD.WIDE.U32`."""
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].rstrip(";") if words else "?"


def summarize(rows, top: int) -> str:
    reasons = [k for k in rows[0] if k.startswith("stall_") and not k.endswith("(Not Issued)")] if rows else []
    total = sum(_n(r, SAMPLES) for r in rows)
    if not total:
        return "no warp samples in this report (collected without --section SourceCounters?)"
    base = int(rows[0]["Address"], 16)
    out = [f"{len(rows)} instructions, {total:.0f} warp samples"]
    mix = Counter({k[len("stall_"):]: sum(_n(r, k) for r in rows) for k in reasons})
    out.append("reasons: " + ", ".join(f"{k} {v / total:.3f}" for k, v in mix.most_common() if v / total >= 0.01))
    by_op = Counter()
    for r in rows:
        by_op[opcode(r["Source"])] += _n(r, SAMPLES)
    out.append("opcodes: " + ", ".join(f"{k} {v / total:.3f}" for k, v in by_op.most_common(12)))
    out.append(f"{'offset':>7} {'share':>6}  {'instruction':58s} main reasons | instruction before")
    order = sorted(range(len(rows)), key=lambda i: -_n(rows[i], SAMPLES))
    for i in order[:top]:
        r = rows[i]
        main = sorted(((_n(r, k), k[len("stall_"):]) for k in reasons), reverse=True)[:2]
        why = ", ".join(f"{name} {n / _n(r, SAMPLES):.2f}" for n, name in main if n)
        before = rows[i - 1]["Source"].strip() if i else ""
        out.append(f"{int(r['Address'], 16) - base:7x} {_n(r, SAMPLES) / total:6.3f}  "
                   f"{r['Source'].strip()[:58]:58s} {why} | {before[:48]}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=25, help="instructions to list (default 25)")
    args = parser.parse_args(argv)
    print(summarize(read_source_page(args.csv), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
