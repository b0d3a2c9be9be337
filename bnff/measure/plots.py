"""PNG plots of bench rows (needs the optional matplotlib: pip install 'bnff-bench[plot]'):
speedup per thread count per network, time breakdown by kind per schedule, and a roofline
chart of the stages (under the roofs measured in the run, when given)."""
from __future__ import annotations

import os
from collections import defaultdict

from bnff.errors import UserError

KINDS = ["conv", "bn", "relu", "concat", "pool", "other"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: .venv/bin/pip install matplotlib "
                        "(or the project's [plot] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _iterations(rows):
    return [r for r in rows if r["stage"] == "iteration"]


def plot_bench(rows, outdir, roofline=None, speedups=None) -> list:
    """Writes the three plots per network into outdir; returns their paths. `roofline` is
    an optional {threads: bnff.measure.roofline.measure() row} of this machine's measured
    limits; the roofline chart of the top thread count draws its roofs (draw_roofs);
    `speedups` ({(network, threads, schedule, ref): Speedup}, bench's paired rounds) puts the
    speedup points at their paired estimate with their 95 % intervals as error bars, as the
    tables print them; without, a point is a ratio of medians."""
    plt = _pyplot()
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for net in dict.fromkeys(r["network"] for r in _iterations(rows)):
        its = [r for r in _iterations(rows) if r["network"] == net]
        ref = "caffe" if any(r["schedule"] == "caffe" for r in its) else its[0]["schedule"]
        base = {int(r["threads"]): float(r["median_s"]) for r in its if r["schedule"] == ref}
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in dict.fromkeys(r["schedule"] for r in its):
            pts = sorted(_speedup_point(r, base, ref, speedups)
                         for r in its if r["schedule"] == s and int(r["threads"]) in base)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                        yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                        marker="o", capsize=3, label=s)
        ax.set(xlabel="threads", ylabel=f"speedup over {ref}", title=f"{net}: iteration speedup")
        ax.set_xticks(sorted(base))
        ax.legend()
        paths.append(_save(fig, plt, outdir, f"{net}-speedup.png"))

        top = max(int(r["threads"]) for r in its)
        per = defaultdict(lambda: defaultdict(float))
        for r in rows:
            if r["network"] == net and int(r["threads"]) == top and r["stage"] != "iteration":
                per[r["schedule"]][r["kind"]] += float(r["median_s"])
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(per)
        bottom = [0.0] * len(names)
        for k in KINDS:
            vals = [per[s][k] for s in names]
            ax.bar(names, vals, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set(ylabel="seconds per iteration", title=f"{net}: time by kind, {top} threads")
        ax.legend()
        paths.append(_save(fig, plt, outdir, f"{net}-breakdown.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        for s in names:
            pts = [(float(r["flops"]) / float(r["bytes"]), float(r["flops"]) / float(r["median_s"]) / 1e9)
                   for r in rows if r["network"] == net and r["schedule"] == s
                   and int(r["threads"]) == top and r["stage"] != "iteration"
                   and r["bytes"] != "" and float(r["bytes"]) > 0 and float(r["flops"]) > 0
                   and float(r["median_s"]) > 0]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, label=s)
        if roofline and top in roofline:
            draw_roofs(ax, roofline[top])
        ax.set(xscale="log", yscale="log", xlabel="FLOP per byte",
               ylabel="GFLOP/s", title=f"{net}: stages against the roofline, {top} threads")
        ax.legend()
        paths.append(_save(fig, plt, outdir, f"{net}-roofline.png"))
    return paths


def draw_roofs(ax, roof) -> list:
    """The measured roofs on a log-log FLOP/byte - GFLOP/s chart, as labelled lines (returned):
    memory, STREAM triad GB/s times the intensity up to the ridge with the FMA peak; compute,
    the FMA peak from there; and numpy sgemm's GFLOP/s (dashed) from its own ridge, what a
    tuned GEMM attains."""
    bw, peak, gemm = roof["triad_gbps"], roof["fma_gflops"], roof["sgemm_gflops"]
    lo, hi = 2.0 ** -6, 2.0 ** 12
    ridge, gemm_ridge = peak / bw, gemm / bw
    return [ax.plot([lo, ridge], [bw * lo, peak], color="black", lw=1,
                    label=f"memory roof: triad {bw:.1f} GB/s")[0],
            ax.plot([ridge, max(hi, 2 * ridge)], [peak, peak], color="black", lw=2,
                    label=f"compute roof: FMA peak {peak:.0f} GFLOP/s")[0],
            ax.plot([gemm_ridge, max(hi, 2 * gemm_ridge)], [gemm, gemm], color="gray", lw=1,
                    ls="--", label=f"numpy sgemm {gemm:.0f} GFLOP/s")[0]]


def _speedup_point(r, base, ref, speedups) -> tuple:
    """(threads, speedup, interval low, interval high) of an iteration row over `ref`."""
    t = int(r["threads"])
    sp = (speedups or {}).get((r["network"], r["threads"], r["schedule"], ref))
    if sp is not None:
        return t, sp.ratio, sp.low, sp.high
    ratio = base[t] / float(r["median_s"])
    return t, ratio, ratio, ratio


def _save(fig, plt, outdir, name):
    path = os.path.join(outdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
