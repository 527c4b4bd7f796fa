"""Speed of our unified attention kernel, measured against ceilings taken in the same run.

    python -m bench.run [--quick] [--out results/bench.json] [--plot results/bench.png] [--filter SUBSTR]

bench.run holds the shapes, the byte and FLOP counts, the timing loop, the targets ("bars"),
the JSON, the table and the plot; bench.compare sets two runs side by side.
"""


def fmt(x, spec: str) -> str:
    """A number for a table, '-' where there is none."""
    return "-" if x is None else format(x, spec)
