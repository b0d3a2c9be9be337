"""Matching the rows of two result CSVs of this suite (`bnff bench`, `bnff micro`; plain or
.gz) and the statistics `bnff compare` prints.

A file's kind follows from its header: bench rows are keyed by (network, schedule, batch,
image, threads, stage), micro rows by (stage, descriptor, variant, threads); the batch is in a
micro descriptor, and a bench key carries batch and image because the same stage name at
another batch is another problem. A file may hold several runs (the commands append): the
rows of one key are pooled into a Side:

- median: the median of the rows' median_s (one per run);
- spread: (highest - lowest) / median over every repetition the rows summarize: max_s and
  min_s where the file has both (bench), else (median_s - min_s), the only spread a micro
  row records, so a micro spread is one-sided and smaller than a bench one.

Two sides differ by more than noise when their ratio of medians lies outside 1 +- the larger
of the two spreads.
"""
from __future__ import annotations

import csv
import gzip
import io
import re
import statistics
import zlib
from dataclasses import dataclass

from bnff.errors import UserError

KEYS = {"bench": ("network", "schedule", "batch", "image", "threads", "stage"),
        "micro": ("stage", "descriptor", "variant", "threads")}
# columns that name the machine (machine_info in bnff/measure/machine.py); software versions
# are reported apart, and clock figures are not compared at all (they jitter run to run)
MACHINE = ("cpu_model", "cpu_arch", "cores", "l1d_bytes", "l2_bytes", "l3_bytes")
SOFTWARE = ("python", "numpy", "numba", "threading_layer")
CLOCK = re.compile(r"\s*@\s*[0-9.]+\s*[GM]Hz", re.IGNORECASE)


@dataclass
class Side:
    median: float
    spread: float  # (highest - lowest) / median, see the module docstring
    runs: int


def read(path: str) -> tuple:
    """(kind, header, rows as dicts) of one result CSV."""
    try:
        raw = open(path, "rb").read()
        text = gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError):
        raise UserError(f"{path} is neither a CSV nor a gzipped CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    kind = next((k for k, cols in KEYS.items() if set(cols) <= set(header)), None)
    if kind is None or "median_s" not in header or "min_s" not in header:
        raise UserError(f"{path} is not a `bnff bench` or `bnff micro` CSV (header: "
                        f"{', '.join(header[:6]) or 'none'}...)")
    rows = list(reader)
    for i, r in enumerate(rows, start=2):
        try:
            for c in ("median_s", "min_s") + (("max_s",) if "max_s" in header else ()):
                r[c] = float(r[c])
        except (TypeError, ValueError):
            raise UserError(f"{path} line {i}: median_s/min_s/max_s are not numbers") from None
    if not rows:
        raise UserError(f"{path} has a header but no rows")
    return kind, header, rows


def sides(kind: str, rows: list) -> dict:
    """{key tuple: Side} with the rows of each key pooled."""
    by_key = {}
    for r in rows:
        by_key.setdefault(tuple(r[c] for c in KEYS[kind]), []).append(r)
    out = {}
    for key, rs in by_key.items():
        med = statistics.median(r["median_s"] for r in rs)
        hi = max(r.get("max_s", r["median_s"]) for r in rs)
        lo = min(r["min_s"] for r in rs)
        out[key] = Side(med, (hi - lo) / med if med > 0 else 0.0, len(rs))
    return out


def verdict(ratio: float, a: Side, b: Side, fail_pct: float | None) -> str:
    """'noise' inside the larger spread, else 'slower' / 'faster'; 'FAIL' when slower than
    the threshold (B/A > 1 + fail_pct/100), 'FAIL (noise)' if that is inside the spread."""
    noise = abs(ratio - 1) <= max(a.spread, b.spread)
    if fail_pct is not None and ratio > 1 + fail_pct / 100:
        return "FAIL (noise)" if noise else "FAIL"
    if noise:
        return "noise"
    return "slower" if ratio > 1 else "faster"


def _values(rows: list, column: str) -> set:
    return {CLOCK.sub("", r[column]).strip() for r in rows if column in r}


def machine_differences(rows_a: list, rows_b: list) -> tuple:
    """([machine column: (A values, B values)], [same for software]) for columns that differ,
    clock figures in the CPU model ignored."""
    def diff(columns):
        out = []
        for c in columns:
            va, vb = _values(rows_a, c), _values(rows_b, c)
            if va and vb and va != vb:
                out.append((c, sorted(va), sorted(vb)))
        return out
    return diff(MACHINE), diff(SOFTWARE)
