"""`bnff report`: results/REPORT.md from the CSVs under results/ (one folder per machine):
per machine, its description, the bench tables and plots, and the paper's comparison."""
from __future__ import annotations

import csv
import glob
import gzip
import os

from bnff.cli.args import UserError, writable_file
from bnff.cli.bench import summary_tables

NUMERIC = ("batch", "image", "threads", "median_s", "min_s", "max_s", "repeats", "bytes",
           "flops", "peak_mem_bytes", "compile_s")
MACHINE_KEYS = ("cpu_model", "cores", "l2_bytes", "l3_bytes", "python", "numpy", "numba",
                "threading_layer", "git_commit", "timestamp")


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write results/REPORT.md from the result CSVs",
                       description="Collect every results/<machine>/bench.csv (or .csv.gz) into one "
                                   "Markdown report with tables and plots.")
    p.add_argument("--results", default="results", help="results folder (default results)")
    p.add_argument("--out", help="report path (default RESULTS/REPORT.md)")
    p.set_defaults(func=run)


def read_rows(path) -> list:
    """Rows of a bench CSV, plain or gzipped (results are committed gzipped)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in NUMERIC:
            if r.get(k) not in (None, ""):
                r[k] = float(r[k]) if "." in r[k] or "e" in r[k] else int(r[k])
    return rows


def run(args) -> int:
    out = args.out or os.path.join(args.results, "REPORT.md")
    writable_file(out, "report")
    folders = sorted({os.path.dirname(p) for p in
                      glob.glob(os.path.join(args.results, "*", "bench.csv*"))})
    files = [os.path.join(d, "bench.csv") if os.path.exists(os.path.join(d, "bench.csv"))
             else os.path.join(d, "bench.csv.gz") for d in folders]
    if not files:
        raise UserError(f"no {args.results}/<machine>/bench.csv found; run `make bench` first")
    parts = ["# bnff-bench results", "",
             "Written by `bnff report` from the CSVs beside it; every figure was measured by "
             "`bnff bench` on the machine named above its table. Speedups are ratios of "
             "medians taken in the same run.", ""]
    for path in files:
        rows = read_rows(path)
        folder = os.path.dirname(path)
        last = rows[-1]
        parts += [f"## {os.path.basename(folder)}", "",
                  "| " + " | ".join(k for k in MACHINE_KEYS if k in last) + " |",
                  "|" + "---|" * sum(k in last for k in MACHINE_KEYS),
                  "| " + " | ".join(str(last[k]) for k in MACHINE_KEYS if k in last) + " |", "",
                  "```", summary_tables(rows), "```", ""]
        try:
            from bnff.measure.plots import plot_bench
            plots = plot_bench(rows, os.path.join(folder, "plots"))
            parts += [f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(out))})"
                      for p in plots] + [""]
        except UserError as e:
            parts += [f"(plots skipped: {e})", ""]
    with open(out, "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {out}")
    return 0
