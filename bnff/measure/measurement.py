"""Measurement shared by the commands and the kernel modules' own timing `main`s: validation
into fresh outputs, interleaved timing, best-of and median, paired speedups with their
intervals, gradient comparison, summary tables of bench rows.

Validation. Every variant writes into fresh outputs filled with NaN (integers with -1), so a
variant that leaves an element unwritten fails even when a correct variant ran before it.

Timing. Callables are warmed up once each (compiling), then timed interleaved, round after
round, so drift on a shared machine hits them alike; a figure is the median over rounds (the
best-of rule, `best_of`, only for a machine's limits, as STREAM reports them).

Speedups. Schedules run interleaved in rounds, so round k of schedule A and of schedule B
saw the same machine state: a speedup is taken from the per-round paired ratios
r_k = t_base,k / t_k, as their geometric mean, with a 95 % percentile-bootstrap interval of
that mean (10 000 resamples of the rounds, fixed seed 0, so a rerun on the same times
reproduces it). An interval that contains 1.0 is reported as no difference. With very few
rounds the bootstrap cannot show all the spread (3 rounds have 10 distinct resamples), which
is why `bench` can add rounds until the intervals are narrower than a target.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from tabulate import tabulate

from bnff.errors import RunFailed
from bnff.lowering.schedules import PYTORCH, TORCH_MISSING

CONFIDENCE = 0.95
RESAMPLES = 10_000


class ValidationError(Exception):
    """A variant's output differs from the float64 reference by more than its tolerance."""


def fresh_outputs(stage, inputs=None) -> dict:
    """The stage's outputs, newly allocated and filled with NaN (integer arrays with -1),
    except those it adds into (stage.accumulates), which start as their input's values."""
    out = stage.allocate_outputs()
    for name, a in out.items():
        if name in stage.accumulates:
            a[...] = inputs[stage.accumulates[name]]
        else:
            a.fill(np.nan if a.dtype.kind == "f" else -1)
    return out


def validate(stage, variants, inputs, run=None) -> dict:
    """{variant: max relative error}, each variant run into fresh NaN outputs (by
    run(variant, inputs, outputs), default stage.run); raises ValidationError on the first one
    out of the stage's tolerance. An output the reference gives that holds NaN or Inf after
    the run (not written, or written wrong) is named; an output the reference does not give
    is a buffer of which the stage writes only a view (concat_copy_into's y, whose y_slice is
    checked)."""
    ref = stage.reference(inputs)
    run = run or stage.run
    errors = {}
    for v in variants:
        outputs = fresh_outputs(stage, inputs)
        run(v, inputs, outputs)
        for name in ref:
            o = outputs[name]
            if o.dtype.kind == "f" and not np.isfinite(o).all():
                raise ValidationError(f"{stage.name} variant {v} at {stage.descriptor()}: "
                                      f"output {name} holds NaN or Inf")
        errors[v] = stage.max_rel_error(outputs, ref)
        if not errors[v] <= stage.tolerance:
            raise ValidationError(f"{stage.name} variant {v} at {stage.descriptor()}: max relative "
                                  f"error {errors[v]:.3g} > tolerance {stage.tolerance:.3g}")
    return errors


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(calls: dict, reps: int, min_time: float = 0.0, max_rounds: int | None = None) \
        -> dict:
    """{name: [seconds per call]}: one warm-up call each, then interleaved rounds, at least
    `reps` and until each callable has run `min_time` seconds (at most max_rounds, default
    50 * reps)."""
    first = {k: seconds(fn) for k, fn in calls.items()}
    cap = max_rounds or 50 * reps
    rounds = int(min(cap, max(reps, min_time / max(min(first.values()), 1e-7))))
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            times[k].append(seconds(fn))
    return times


def best_of(fn, reps: int) -> float:
    """Fastest of `reps` timed calls after a warm-up call (for a machine's limits)."""
    fn()
    return min(seconds(fn) for _ in range(reps))


def median_min_max(times) -> tuple:
    return statistics.median(times), min(times), max(times)


@dataclass(frozen=True)
class Speedup:
    """t_base / t from paired rounds: geometric mean and its 95 % bootstrap interval."""

    ratio: float
    low: float
    high: float
    rounds: int

    @property
    def no_difference(self) -> bool:
        return self.low <= 1.0 <= self.high

    @property
    def half_width(self) -> float:
        """Half the interval's width relative to the ratio (0.03 is +-3 %)."""
        return (self.high - self.low) / 2 / self.ratio

    def __str__(self):
        tag = ", no difference" if self.no_difference else ""
        return f"{self.ratio:.3f}x [{self.low:.3f}, {self.high:.3f}{tag}]"


def paired_speedup(base_times, times, seed: int = 0) -> Speedup:
    """Speedup of `times` over `base_times`, both one value per round in the same order."""
    if len(base_times) != len(times) or len(times) == 0:
        raise ValueError("paired speedup needs the same number (> 0) of rounds on both sides")
    logs = np.log(np.asarray(base_times, np.float64) / np.asarray(times, np.float64))
    n = len(logs)
    idx = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))
    means = logs[idx].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return Speedup(math.exp(logs.mean()), math.exp(lo), math.exp(hi), n)


ZERO = 1e-3  # a gradient norm below ZERO * rms * sqrt(size) counts as zero in exact arithmetic


def rel_errors(grads: dict, ref: dict) -> dict:
    """{parameter: ||g - ref|| / max(||ref||, zero level)}: norms rather than elementwise maxima
    (a ReLU mask or max-pool choice that flips on a rounding moves single elements a lot and
    the whole gradient little); the zero level is ZERO * rms of all reference gradients *
    sqrt(size), so a gradient that is zero in exact arithmetic (the bias of a conv feeding a
    BN) is judged by its absolute size."""
    total = sum(float(np.sum(np.square(r))) for r in ref.values())
    rms = np.sqrt(total / max(sum(r.size for r in ref.values()), 1))
    out = {}
    for k, r in ref.items():
        d = float(np.linalg.norm(np.asarray(grads[k], np.float64) - r))
        out[k] = d / max(float(np.linalg.norm(r)), ZERO * rms * np.sqrt(r.size), 1e-30)
    return out


def max_rel_grad_diff(grads: dict, ref: dict) -> tuple:
    """(largest relative gradient difference over parameters (rel_errors), where it occurs)."""
    errs = rel_errors(grads, ref)
    where = max(errs, key=errs.get)
    return errs[where], where


def check_finite(loss, grads: dict, what: str) -> None:
    """RunFailed naming the tensor when the loss or a gradient holds NaN or Inf."""
    if not np.isfinite(loss):
        raise RunFailed(f"{what}: the loss is {loss}")
    for k, g in grads.items():
        if not np.isfinite(g).all():
            raise RunFailed(f"{what}: the gradient of {k} holds NaN or Inf")


def _speedup_cell(speedups, r, same, ref) -> str:
    """r's speedup over schedule ref: with its interval when the run's rounds gave one."""
    if ref not in same:
        return "-"
    key = (r["network"], r["threads"], r["schedule"], ref)
    if speedups and key in speedups:
        return str(speedups[key])
    return f"{same[ref] / r['median_s']:.3f}x"


def summary_tables(rows, speedups=None) -> str:
    """One table per network (seconds, images/s, speedups, bytes, peak memory) and the time
    breakdown by kind per schedule. With `speedups` ({(network, threads, schedule, ref):
    Speedup}, from the paired rounds of one run) the speedups carry their 95 % intervals;
    without (rows read back from a CSV, which holds no rounds) they are ratios of medians."""
    out = []
    iters = [r for r in rows if r["stage"] == "iteration"]
    for net in dict.fromkeys(r["network"] for r in iters):
        table = []
        for r in (r for r in iters if r["network"] == net):
            same = {q["schedule"]: q["median_s"] for q in iters
                    if q["network"] == net and q["threads"] == r["threads"]}
            speed = lambda ref: _speedup_cell(speedups, r, same, ref)
            num = lambda v, scale: "-" if v in ("", None) else f"{v / scale:.2f}"
            table.append([r["schedule"], r["threads"], f"{r['median_s']:.3f}",
                          f"{r['batch'] / r['median_s']:.1f}", speed("caffe"), speed("baseline"),
                          speed(PYTORCH.name), num(r["bytes"], 1e9),
                          num(r["peak_mem_bytes"], 2**30), f"{r['compile_s']:.1f}"])
        out.append(f"{net}, batch {iters[0]['batch']}, image {iters[0]['image']}\n" + tabulate(
            table, headers=["schedule", "threads", "s/iter", "images/s", "vs caffe",
                            "vs baseline", "vs pytorch", "GB moved", "peak GiB", "compile s"],
            disable_numparse=True))
        if not any(q["schedule"] == PYTORCH.name for q in iters if q["network"] == net):
            out.append(f"(no pytorch row: {TORCH_MISSING})")
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
