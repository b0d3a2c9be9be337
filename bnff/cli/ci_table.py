"""`bnff ci-table`: the variants of each stage shape against the stage's default, from one
pytest-benchmark JSON of the CI benchmarks (tests/benchmarks, `make bench-ci`).

Per group (stage and shape) and variant: the median, its ratio to the default variant's median
of the same run (< 1: faster than the default), GB/s and GFLOP/s from the bytes and FLOPs the
benchmark stored in extra_info, the interquartile range as % of the median and the rounds.
Only ratios within the run are compared; absolute times mean something only against a run of
the same machine (pytest-benchmark's --benchmark-compare does that).
"""
from __future__ import annotations

import glob
import json
import os

from tabulate import tabulate

from bnff.cli.args import UserError

NEEDED = ("stage", "descriptor", "variant", "default", "bytes", "flops", "threads")


def newest_json(path: str) -> str:
    """`path` itself, or the newest pytest-benchmark save under the directory `path` (saves are
    named NNNN_commit_date.json, numbered in order)."""
    if not os.path.isdir(path):
        return path
    found = glob.glob(os.path.join(path, "**", "*.json"), recursive=True)
    if not found:
        raise UserError(f"no pytest-benchmark JSON under {path}; run `make bench-ci` first")
    return max(found, key=os.path.basename)


def load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise UserError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def rows(data: dict, path: str) -> list:
    """[[group, variant, median ms, vs default, GB/s, GFLOP/s, IQR %, rounds, threads]]."""
    groups = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        missing = [k for k in NEEDED if k not in info]
        if missing:
            raise UserError(f"{path}: benchmark {b.get('name')} lacks extra_info "
                            f"{', '.join(missing)}; not a bnff CI benchmark run")
        groups.setdefault(b.get("group") or info["stage"], []).append(b)
    out = []
    for group, benches in groups.items():
        default = next((b for b in benches
                        if b["extra_info"]["variant"] == b["extra_info"]["default"]), None)
        for i, b in enumerate(sorted(benches, key=lambda b: b["stats"]["median"])):
            info, med = b["extra_info"], b["stats"]["median"]
            mark = "*" if b is default else ""
            ratio = f"{med / default['stats']['median']:.2f}" if default else "no default"
            out.append(["" if i else group, info["variant"] + mark, 1e3 * med, ratio,
                        info["bytes"] / med / 1e9, info["flops"] / med / 1e9,
                        100 * b["stats"]["iqr"] / med, b["stats"]["rounds"], info["threads"]])
    return out


def header(data: dict, path: str) -> str:
    cpu = data.get("machine_info", {}).get("cpu", {})
    commit = data.get("commit_info", {})
    return (f"{path}: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores, commit "
            f"{str(commit.get('id', '?'))[:10]}{' (dirty)' if commit.get('dirty') else ''}, "
            f"{data.get('datetime', '?')}")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ci-table", help="each variant of a CI benchmark run against its stage's default",
        description="Read one pytest-benchmark JSON of the CI benchmarks (make bench-ci) and "
                    "print, per stage and shape, each variant's median, its ratio to the "
                    "default variant's median in the same run (* marks the default), GB/s, "
                    "GFLOP/s, IQR as %% of the median and rounds. "
                    "Example: bnff ci-table results/ci/znver4-2c")
    p.add_argument("json", metavar="JSON|DIR",
                   help="a pytest-benchmark JSON, or a storage directory (its newest save)")
    p.set_defaults(func=run)


def run(args) -> int:
    path = newest_json(args.json)
    data = load(path)
    table = rows(data, path)
    if not table:
        raise UserError(f"{path} holds no benchmarks")
    print(header(data, path))
    print(tabulate(table, headers=["group", "variant", "median ms", "vs default", "GB/s",
                                   "GFLOP/s", "IQR %", "rounds", "threads"],
                   floatfmt=".3g", disable_numparse=False))
    return 0
