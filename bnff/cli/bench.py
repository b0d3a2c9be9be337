"""`bnff bench`: whole training iterations of networks under several schedules, per thread
count. Every schedule is allocated once and checked against `baseline` (loss and gradients)
before it is timed; a warm-up iteration compiles, and its excess over the median is reported
as compile time; repeats interleave the schedules so machine drift hits them alike.

Schedules whose plans do not fit in memory together run in the largest groups that do
(memory_groups), each group interleaved and checked against one baseline iteration. The rows
of each (network, threads) are appended to --csv as soon as they are measured, --resume skips
the points the file holds for this machine and commit, and the final tables are read back
from the file, so an interrupted and resumed run ends with the tables of an uninterrupted one."""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numba
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from bnff.cli.args import (RunFailed, UserError, available_bytes, nonneg_int, positive_float,
                           positive_int, thread_list, writable_folder)
from bnff.cli.check import max_rel_grad_diff
from bnff.lowering.executor import Executor
from bnff.measure.machine import CsvLog, latest, machine_info, same_machine
from bnff.suites.problem import make_batch, make_params
from bnff.lowering.schedules import FLOAT32, GRAD_TOLERANCE
from bnff.suites import networks

COLUMNS = ["network", "schedule", "batch", "image", "threads", "stage", "kind", "phase",
           "median_s", "min_s", "max_s", "repeats", "bytes", "flops", "peak_mem_bytes",
           "compile_s"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="time whole training iterations per schedule and thread count",
        description="Time whole training iterations (forward, loss, backward) of one or more "
                    "networks under several schedules and thread counts; write one CSV row per "
                    "(network, schedule, threads, stage) and one `iteration` row, and print "
                    "speedups, bytes, peak memory and the time breakdown by kind.")
    p.add_argument("networks", nargs="+", metavar="NET",
                   help="built-in network names or paths to .json graphs")
    p.add_argument("--batch", type=positive_int, default=16, help="mini-batch (default 16)")
    p.add_argument("--image", type=positive_int, default=224, help="image size (default 224)")
    p.add_argument("--threads", type=thread_list, default=thread_list("all"),
                   help="thread counts, e.g. 1,2 or 1-4 or all (default: 1 to all cores)")
    p.add_argument("--schedules", type=_schedule_list, default=list(FLOAT32),
                   help=f"comma-separated schedules (default: {','.join(FLOAT32)})")
    p.add_argument("--repeat", type=positive_int, default=5,
                   help="timed iterations per schedule and thread count (default 5)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of parameters and batch")
    p.add_argument("--csv", metavar="FILE",
                   help="append the rows of each (network, threads) to this CSV file as soon as "
                        "they are measured; the final tables are read back from it")
    p.add_argument("--resume", action="store_true",
                   help="skip the (network, threads) points the --csv file already holds for "
                        "this machine and commit (after an interrupted run)")
    p.add_argument("--memory-gib", type=positive_float, default=None,
                   help="memory the run may use (default: what is available now); schedules "
                        "that do not fit together run in groups")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots here (needs matplotlib)")
    p.set_defaults(func=run)


def _schedule_list(text):
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in FLOAT32]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown schedule(s) {', '.join(bad) or text!r}; known: {', '.join(FLOAT32)}")
    return names


def memory_groups(executors, available=None) -> list:
    """Schedules in the largest groups that fit in memory together (first fit, largest plan
    first; each group keeps the run's schedule order), planned before anything is allocated
    (plan.peak_bytes). Refuses only a schedule that does not fit alone."""
    available = available_bytes() if available is None else available
    budget = 0.9 * available
    g0 = executors[0]
    for ex in executors:
        if ex.peak_bytes() > budget:
            raise UserError(
                f"{g0.graph.name} at batch {g0.batch}, image {g0.image}: schedule {ex.schedule} "
                f"alone needs {ex.peak_bytes() / 2**30:.2f} GiB but {available / 2**30:.1f} GiB "
                "are available; use a smaller --batch or --image")
    groups = []
    for ex in sorted(executors, key=lambda e: -e.peak_bytes()):
        fit = next((g for g in groups if sum(e.peak_bytes() for e in g) + ex.peak_bytes()
                    <= budget), None)
        if fit is None:
            groups.append([ex])
        else:
            fit.append(ex)
    order = {ex.schedule: i for i, ex in enumerate(executors)}
    return sorted((sorted(g, key=lambda e: order[e.schedule]) for g in groups),
                  key=lambda g: order[g[0].schedule])


def check_finite(ex) -> None:
    """RunFailed naming the tensor if the loss or a gradient holds a NaN or an Inf."""
    where = f"{ex.schedule} on {ex.graph.name}"
    if not np.isfinite(ex.loss()):
        raise RunFailed(f"{where}: the loss is {ex.loss()}")
    for k, g in ex.grads().items():
        if not np.isfinite(g).all():
            raise RunFailed(f"{where}: the gradient of {k} holds NaN or Inf")


def validate(executors, reference=None) -> dict:
    """Largest relative gradient difference of each schedule against `reference` = (name, loss,
    grads), by default `baseline` among the executors (else the first); RunFailed on a NaN or
    Inf or a difference beyond GRAD_TOLERANCE."""
    for ex in executors:
        check_finite(ex)
    if reference is None:
        ref = next((ex for ex in executors if ex.schedule == "baseline"), executors[0])
        reference = (ref.schedule, ref.loss(), ref.grads())
    ref_name, ref_loss, ref_grads = reference
    out = {}
    for ex in executors:
        diff, where = max_rel_grad_diff(ex.grads(), ref_grads)
        loss_diff = abs(ex.loss() - ref_loss) / abs(ref_loss)
        if diff > GRAD_TOLERANCE or loss_diff > GRAD_TOLERANCE:
            raise RunFailed(f"{ex.schedule} disagrees with {ref_name} on {ex.graph.name}: "
                            f"loss {ex.loss():.6f} vs {ref_loss:.6f}, gradient of {where} off by "
                            f"{diff:.1e} (tolerance {GRAD_TOLERANCE:.0e}); not timing it")
        out[ex.schedule] = diff
    return out


def baseline_result(graph, args, problem) -> tuple:
    """("baseline", loss, grads) of one baseline iteration: what every group is checked against
    (allocated only for this, then released)."""
    ex = Executor(graph, "baseline", args.batch, args.image)
    ex.load(*problem)
    ex.run()
    check_finite(ex)
    out = ("baseline", ex.loss(), ex.grads())
    ex.release()
    return out


def time_group(executors, threads, repeat, bar, reference) -> dict:
    """{schedule: (warm-up seconds, [iteration seconds], [[step seconds]] per repeat)}: a warm-up
    iteration each (it compiles), validation of its results against `reference`, then `repeat`
    rounds interleaving the schedules."""
    numba.set_num_threads(threads)
    warm = {}
    for ex in executors:
        t = time.perf_counter()
        ex.run()
        warm[ex.schedule] = time.perf_counter() - t
        bar.update(1)
    validate(executors, reference)
    out = {ex.schedule: (warm[ex.schedule], [], []) for ex in executors}
    for _ in range(repeat):
        for ex in executors:
            steps = []
            t = time.perf_counter()
            ex.run(steps)
            out[ex.schedule][1].append(time.perf_counter() - t)
            out[ex.schedule][2].append(steps)
            bar.update(1)
    return out


def bench_network(graph, groups, args, todo, bar, machine, emit) -> None:
    """Times `graph`'s schedule groups at each thread count in `todo`, validating each group
    against one baseline iteration first; emit(rows) gets the rows of each (network, threads)
    as soon as all its groups have run. A single group stays allocated across thread counts."""
    problem = (make_params(graph, args.seed), *make_batch(graph, args.batch, args.image,
                                                          args.seed))
    reference = baseline_result(graph, args, problem) if todo else None
    try:
        for threads in todo:
            rows = []
            for group in groups:
                for ex in group:
                    if ex.arrays is None:
                        ex.load(*problem)
                times = time_group(group, threads, args.repeat, bar, reference)
                for ex in group:
                    warm, iters, steps = times[ex.schedule]
                    rows += _rows(ex, threads, steps, iters, warm, machine)
                if len(groups) > 1:
                    for ex in group:
                        ex.release()
            emit(rows)
    finally:
        for group in groups:
            for ex in group:
                ex.release()


def _rows(ex, threads, step_times, iter_times, warm, machine) -> list:
    base = {"network": ex.graph.name, "schedule": ex.schedule, "batch": ex.batch,
            "image": ex.image, "threads": threads, "repeats": len(iter_times), **machine}
    rows = []
    for i, s in enumerate(ex.plan.steps):
        ts = [rep[i] for rep in step_times]
        rows.append({**base, "stage": s.name, "kind": s.kind, "phase": s.phase,
                     "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "bytes": s.cost.bytes, "flops": s.cost.flops, "peak_mem_bytes": "",
                     "compile_s": ""})
    cost = ex.plan.cost()
    median = statistics.median(iter_times)
    rows.append({**base, "stage": "iteration", "kind": "all", "phase": "all",
                 "median_s": median, "min_s": min(iter_times), "max_s": max(iter_times),
                 "bytes": cost.bytes, "flops": cost.flops, "peak_mem_bytes": ex.peak_bytes(),
                 "compile_s": max(warm - median, 0.0)})
    return rows


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


def _run_key(r) -> tuple:
    return (r["network"], r["batch"], r["image"], r["threads"])


def run(args) -> int:
    graphs = [networks.load(n) for n in args.networks]
    for g in graphs:
        g.infer_shapes(args.batch, args.image)
    available = args.memory_gib * 2**30 if args.memory_gib else available_bytes()
    plans = []
    for g in graphs:
        groups = memory_groups([Executor(g, s, args.batch, args.image)
                                for s in args.schedules], available)
        plans.append((g, groups))
    machine = machine_info()
    columns = COLUMNS + [k for k in machine if k not in COLUMNS]
    log = CsvLog(args.csv, columns) if args.csv else None
    if args.plot:
        writable_folder(args.plot, "plots")
    if args.resume and log is None:
        raise UserError("--resume needs --csv: it skips what that file already holds")
    held = {}
    for r in (log.read() if log else []):
        if r["stage"] == "iteration" and same_machine(r, machine):
            held.setdefault(_run_key(r), set()).add(r["schedule"])
    todo = {g.name: [t for t in args.threads if not (args.resume and set(args.schedules) <=
                                                     held.get((g.name, args.batch, args.image,
                                                               t), set()))]
            for g, _ in plans}
    for g, groups in plans:
        if len(groups) > 1:
            print(f"{g.name}: the schedules do not fit in {available / 2**30:.1f} GiB together; "
                  f"running them in {len(groups)} groups, each interleaved and validated against "
                  "baseline: " + " | ".join(",".join(ex.schedule for ex in gr) for gr in groups))
        skipped = [t for t in args.threads if t not in todo[g.name]]
        if skipped:
            print(f"{g.name}: threads {','.join(map(str, skipped))} already in {args.csv} "
                  f"for this machine and commit {machine['git_commit']} (--resume); skipped")
    measured = []

    def emit(rows):
        measured.extend(rows)
        if log:
            log.append(rows)

    total = sum(len(todo[g.name]) for g, _ in plans) * len(args.schedules) * (args.repeat + 1)
    with tqdm(total=total, desc="bench", unit="iter", leave=False) as bar:
        for g, groups in plans:
            bar.set_postfix_str(g.name)
            bench_network(g, groups, args, todo[g.name], bar, machine, emit)
    rows = measured
    if log:  # the tables of everything this run covers, as the CSV holds it
        keys = {(g.name, args.batch, args.image, t) for g, _ in plans for t in args.threads}
        rows = latest([r for r in log.read() if same_machine(r, machine) and _run_key(r) in keys
                       and r["schedule"] in args.schedules],
                      key=lambda r: _run_key(r) + (r["schedule"], r["stage"]))
    print(summary_tables(rows))
    if log:
        print(f"\nwrote {len(measured)} rows to {args.csv}")
    if args.plot:
        from bnff.measure.plots import plot_bench
        for path in plot_bench(rows, args.plot):
            print(f"wrote {path}")
    return 0
