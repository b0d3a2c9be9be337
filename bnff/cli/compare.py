"""`bnff compare A B [--fail PCT]`: two result CSVs of `bnff bench` or `bnff micro`, row by
row, across commits or machines.

Rows are matched and pooled as bnff/measure/rowmatch.py describes. For each matched row it
prints both medians, each side's spread and the ratio B/A (> 1: B is slower), marked `noise`
when inside the larger spread (a row over --fail fails even then, marked so); the slowest
rows first, `--top` of them, and every row slower
than --fail. It warns when the machine columns differ (the clock in a CPU model is ignored)
and when the software differs. Exit status: 1 when a matched row of B is more than PCT %
slower than A, 2 for bad input, else 0.
"""
from __future__ import annotations

import argparse
import math

from tabulate import tabulate

from bnff.cli.args import UserError, nonneg_int
from bnff.measure import rowmatch


def percent(text: str) -> float:
    try:
        v = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, e.g. 10, got {text!r}") from None
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"expected a percentage >= 0, got {text!r}")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare two bench or micro CSVs row by row (across commits or machines)",
        description="Match the rows of two `bnff bench` or two `bnff micro` CSVs (plain or "
                    ".gz) by (network, schedule, batch, image, threads, stage) or (stage, "
                    "descriptor, variant, threads), and print the ratio of medians B/A with "
                    "each side's spread; differences inside the larger spread are marked "
                    "`noise`. Warns when the machines differ. Exits 1 when a row of B is more "
                    "than --fail percent slower than A. "
                    "Example: bnff compare old/bench.csv new/bench.csv --fail 15")
    p.add_argument("a", metavar="A", help="baseline CSV")
    p.add_argument("b", metavar="B", help="CSV compared with A")
    p.add_argument("--fail", type=percent, metavar="PCT",
                   help="exit 1 when a matched row of B is more than PCT %% slower than A")
    p.add_argument("--top", type=nonneg_int, default=30,
                   help="rows printed, slowest first (default 30; rows over --fail always)")
    p.set_defaults(func=run)


def compare(a_path: str, b_path: str, fail_pct=None) -> tuple:
    """(kind, [(key, Side A, Side B, ratio, verdict)] slowest first, only-A count, only-B
    count, rows of A, rows of B)."""
    kind_a, _, rows_a = rowmatch.read(a_path)
    kind_b, _, rows_b = rowmatch.read(b_path)
    if kind_a != kind_b:
        raise UserError(f"{a_path} is a {kind_a} CSV but {b_path} a {kind_b} one")
    sa, sb = rowmatch.sides(kind_a, rows_a), rowmatch.sides(kind_b, rows_b)
    matched = []
    for key in sa.keys() & sb.keys():
        a, b = sa[key], sb[key]
        if a.median > 0:
            ratio = b.median / a.median
            matched.append((key, a, b, ratio, rowmatch.verdict(ratio, a, b, fail_pct)))
    if not matched:
        raise UserError(f"no rows of {a_path} and {b_path} match on "
                        f"({', '.join(rowmatch.KEYS[kind_a])})")
    matched.sort(key=lambda m: -m[3])
    return kind_a, matched, len(sa.keys() - sb.keys()), len(sb.keys() - sa.keys()), rows_a, rows_b


def run(args) -> int:
    kind, matched, only_a, only_b, rows_a, rows_b = compare(args.a, args.b, args.fail)
    hw, sw = rowmatch.machine_differences(rows_a, rows_b)
    for what, diffs in (("machines differ", hw), ("software differs", sw)):
        for col, va, vb in diffs:
            print(f"warning: {what}: {col} {' | '.join(va)} (A) vs {' | '.join(vb)} (B)")
    failed = [m for m in matched if m[4].startswith("FAIL")]
    shown = [m for i, m in enumerate(matched) if i < args.top or m in failed]
    table = [list(key) + [1e3 * a.median, 100 * a.spread, 1e3 * b.median, 100 * b.spread,
                          ratio, v] for key, a, b, ratio, v in shown]
    print(tabulate(table, headers=list(rowmatch.KEYS[kind]) + [
        "A ms", "A spread %", "B ms", "B spread %", "B/A", ""], floatfmt=".3f"))
    count = {v: sum(m[4] == v for m in matched) for v in ("noise", "slower", "faster")}
    print(f"{len(matched)} matched rows ({len(matched) - len(shown)} not shown): "
          f"{count['noise']} inside the noise, {count['slower']} slower, {count['faster']} "
          f"faster, {len(failed)} over --fail; {only_a} only in A, {only_b} only in B")
    if failed:
        print(f"FAIL: {len(failed)} rows of {args.b} more than {args.fail:g} % slower than "
              f"in {args.a}")
        return 1
    return 0
