"""`bnff report`: results/REPORT.md from the CSVs under results/ (one folder per machine, named
by bnff.measure.machine.machine_name): per folder, every run it holds (bench.csv and
bench.csv.gz alike), newest first, each with the machine it ran on (CPU model, LLVM CPU name,
cores, caches, versions) and its tables; plots of the newest run. A folder whose runs come
from different machines (folders named before the LLVM CPU name was part of the name) says so."""
from __future__ import annotations

import csv
import glob
import gzip
import os

from bnff.cli.args import UserError, writable_file
from bnff.measure.measurement import summary_tables

NUMERIC = ("batch", "image", "threads", "median_s", "min_s", "max_s", "repeats", "bytes",
           "flops", "peak_mem_bytes", "compile_s")
MACHINE_KEYS = ("cpu_model", "cpu_arch", "cores", "l2_bytes", "l3_bytes", "python", "numpy", "numba",
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


def runs(rows) -> list:
    """[(run key, rows)], newest first; a run is one `bnff bench` invocation (its machine
    columns and timestamp)."""
    key = lambda r: (r.get("timestamp", ""), r.get("git_commit", ""), r.get("cpu_model", ""),
                     r.get("cpu_arch", ""), str(r.get("cores", "")))
    out = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return sorted(out.items(), key=lambda kv: kv[0], reverse=True)


def machine_table(r) -> list:
    keys = [k for k in MACHINE_KEYS if k in r]
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            "| " + " | ".join(str(r[k]) for k in keys) + " |", ""]


def run(args) -> int:
    out = args.out or os.path.join(args.results, "REPORT.md")
    writable_file(out, "report")
    folders = sorted({os.path.dirname(p) for p in
                      glob.glob(os.path.join(args.results, "*", "bench.csv*"))})
    if not folders:
        raise UserError(f"no {args.results}/<machine>/bench.csv found; run `make bench` first")
    parts = ["# bnff-bench results", "",
             "Written by `bnff report` from the CSVs beside it; every figure was measured by "
             "`bnff bench` on the machine named above its table. Speedups are ratios of "
             "medians taken in the same run.", ""]
    for folder in folders:
        rows = [r for name in ("bench.csv.gz", "bench.csv")
                if os.path.exists(os.path.join(folder, name))
                for r in read_rows(os.path.join(folder, name))]
        found = runs(rows)
        parts += [f"## {os.path.basename(folder)}", "",
                  f"{len(found)} run(s), newest first."]
        if len({k[2:] for k, _ in found}) > 1:
            parts += ["**This folder holds runs from different machines** (see each run's "
                      "machine); `make bench` now names folders by machine_name()."]
        parts.append("")
        for (stamp, commit, *_), run_rows in found:
            parts += [f"### run {stamp or '?'} at {commit or '?'}", ""] + \
                machine_table(run_rows[-1]) + ["```", summary_tables(run_rows), "```", ""]
        try:
            from bnff.measure.plots import plot_bench
            plots = plot_bench(found[0][1], os.path.join(folder, "plots"))
            parts += [f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(out))})"
                      for p in plots] + [""]
        except UserError as e:
            parts += [f"(plots skipped: {e})", ""]
    with open(out, "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {out}")
    return 0
