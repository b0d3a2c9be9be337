"""Measurement shared by the commands: comparing gradients, summary tables of bench rows."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from tabulate import tabulate


def max_rel_grad_diff(grads: dict, ref: dict) -> tuple:
    """(largest ||g - ref|| / ||ref|| over parameters, the parameter where it occurs). Norms
    rather than elementwise maxima: a ReLU mask or a max-pool choice that flips on a float32
    rounding moves single elements a lot and the whole gradient very little."""
    worst, where = 0.0, ""
    for k, r in ref.items():
        d = float(np.linalg.norm(np.asarray(grads[k], np.float64) - r))
        d /= max(float(np.linalg.norm(r)), 1e-30)
        if d >= worst:
            worst, where = d, k
    return worst, where


def summary_tables(rows) -> str:
    """One table per network (seconds, images/s, speedups, bytes, peak memory) and the time
    breakdown by kind per schedule."""
    out = []
    iters = [r for r in rows if r["stage"] == "iteration"]
    for net in dict.fromkeys(r["network"] for r in iters):
        table = []
        for r in (r for r in iters if r["network"] == net):
            same = {q["schedule"]: q["median_s"] for q in iters
                    if q["network"] == net and q["threads"] == r["threads"]}
            speed = lambda ref: f"{same[ref] / r['median_s']:.3f}x" if ref in same else "-"
            table.append([r["schedule"], r["threads"], f"{r['median_s']:.3f}",
                          f"{r['batch'] / r['median_s']:.1f}", speed("caffe"), speed("baseline"),
                          f"{r['bytes'] / 1e9:.2f}", f"{r['peak_mem_bytes'] / 2**30:.2f}",
                          f"{r['compile_s']:.1f}"])
        out.append(f"{net}, batch {iters[0]['batch']}, image {iters[0]['image']}\n" + tabulate(
            table, headers=["schedule", "threads", "s/iter", "images/s", "vs caffe",
                            "vs baseline", "GB moved", "peak GiB", "compile s"],
            disable_numparse=True))
        kinds = ["conv", "bn", "relu", "concat", "pool", "other"]
        breakdown = []
        for r in (r for r in iters if r["network"] == net):
            per = defaultdict(float)
            for q in rows:
                if (q["network"], q["schedule"], q["threads"]) == (net, r["schedule"],
                                                                   r["threads"]) \
                        and q["stage"] != "iteration":
                    per[q["kind"]] += q["median_s"]
            total = sum(per.values()) or 1.0
            breakdown.append([r["schedule"], r["threads"]] +
                             [f"{per[k]:.3f} ({100 * per[k] / total:.0f}%)" for k in kinds])
        out.append("time by kind, seconds (share)\n" + tabulate(
            breakdown, headers=["schedule", "threads"] + kinds, disable_numparse=True))
    return "\n\n".join(out)
