"""`bnff bench`: whole training iterations of networks under several schedules, per thread
count. Every schedule is allocated once and checked against `baseline` (loss and gradients)
before it is timed; a warm-up iteration compiles, and its excess over the median is reported
as compile time; repeats interleave the schedules so machine drift hits them alike.

`pytorch` (when torch is installed, in the default list) is the same graph, parameters and
batch as a PyTorch module in a child process (bnff/torchref/schedule.py), validated and timed
in the same rounds; its per-kind rows (stage `pytorch:<kind>`) come from torch.profiler runs
after the timed ones, and it has no byte model or planned peak (those cells stay empty)."""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numba
import psutil
from tabulate import tabulate
from tqdm import tqdm

from bnff.cli.args import UserError, positive_int, thread_list
from bnff.cli.check import max_rel_grad_diff
from bnff.lowering.executor import Executor
from bnff.measure.machine import append_csv, machine_info
from bnff.suites.problem import make_batch, make_params
from bnff.lowering.schedules import (FLOAT32, GRAD_TOLERANCE, PYTORCH, TORCH_MISSING,
                                     torch_available)
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
    p.add_argument("--schedules", type=_schedule_list, default=default_schedules(),
                   help=f"comma-separated schedules of {','.join(FLOAT32 + [PYTORCH])} "
                        "(default: all; pytorch only when torch is installed)")
    p.add_argument("--repeat", type=positive_int, default=5,
                   help="timed iterations per schedule and thread count (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of parameters and batch")
    p.add_argument("--csv", metavar="FILE", help="append rows to this CSV file")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots here (needs matplotlib)")
    p.set_defaults(func=run)


def default_schedules() -> list:
    return FLOAT32 + [PYTORCH] * torch_available()


def _schedule_list(text):
    names = [s.strip() for s in text.split(",") if s.strip()]
    known = FLOAT32 + [PYTORCH]
    bad = [s for s in names if s not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown schedule(s) {', '.join(bad) or text!r}; known: {', '.join(known)}")
    if PYTORCH in names and not torch_available():
        raise argparse.ArgumentTypeError(TORCH_MISSING)
    return names


def executor(graph, schedule, batch, image):
    if schedule == PYTORCH:
        from bnff.torchref.schedule import TorchExecutor
        return TorchExecutor(graph, batch, image)
    return Executor(graph, schedule, batch, image)


def memory_guard(executors, available=None) -> int:
    """Refuses, before allocating, a run whose schedules would not fit in memory together."""
    need = sum(ex.peak_bytes() for ex in executors)
    available = psutil.virtual_memory().available if available is None else available
    if need > 0.9 * available:
        detail = ", ".join(f"{ex.schedule} {ex.peak_bytes() / 2**30:.2f}" for ex in executors)
        raise UserError(
            f"{executors[0].graph.name} at batch {executors[0].batch}, image "
            f"{executors[0].image} needs {need / 2**30:.1f} GiB for its schedules ({detail} GiB)"
            f" but {available / 2**30:.1f} GiB are available; use a smaller --batch or "
            "--image, or fewer --schedules")
    return need


def validate(executors, reference="baseline") -> dict:
    """Loss and largest relative gradient difference of each schedule against `reference`."""
    ref = next((ex for ex in executors if ex.schedule == reference), executors[0])
    ref_loss, ref_grads = ref.loss(), ref.grads()
    out = {}
    for ex in executors:
        diff, where = max_rel_grad_diff(ex.grads(), ref_grads)
        loss_diff = abs(ex.loss() - ref_loss) / abs(ref_loss)
        if diff > GRAD_TOLERANCE or loss_diff > GRAD_TOLERANCE:
            raise UserError(f"{ex.schedule} disagrees with {ref.schedule} on {ex.graph.name}: "
                            f"loss {ex.loss():.6f} vs {ref_loss:.6f}, gradient of {where} off by "
                            f"{diff:.1e} (tolerance {GRAD_TOLERANCE:.0e}); not timing it")
        out[ex.schedule] = diff
    return out


def bench_network(graph, args, bar, machine) -> list:
    executors = [executor(graph, s, args.batch, args.image) for s in args.schedules]
    memory_guard(executors)
    params = make_params(graph, args.seed)
    x, labels = make_batch(graph, args.batch, args.image, args.seed)
    for ex in executors:
        ex.load(params, x, labels)
    rows = []
    for threads in args.threads:
        numba.set_num_threads(threads)
        warm = {}
        for ex in executors:
            t = time.perf_counter()
            ex.run()
            warm[ex.schedule] = time.perf_counter() - t
            bar.update(1)
        validate(executors)
        step_times = {ex.schedule: [] for ex in executors}
        iter_times = defaultdict(list)
        for _ in range(args.repeat):
            for ex in executors:
                times = []
                t = time.perf_counter()
                ex.run(times)
                iter_times[ex.schedule].append(time.perf_counter() - t)
                step_times[ex.schedule].append(times)
                bar.update(1)
        for ex in executors:
            rows += _rows(ex, threads, step_times[ex.schedule], iter_times[ex.schedule],
                          warm[ex.schedule], machine)
    for ex in executors:
        ex.release()
    return rows


def _rows(ex, threads, step_times, iter_times, warm, machine) -> list:
    base = {"network": ex.graph.name, "schedule": ex.schedule, "batch": ex.batch,
            "image": ex.image, "threads": threads, "repeats": len(iter_times), **machine}
    rows = []
    median = statistics.median(iter_times)
    if ex.schedule == PYTORCH:
        for kind, t in ex.kinds(min(3, len(iter_times))).items():
            rows.append({**base, "stage": f"pytorch:{kind}", "kind": kind, "phase": "all",
                         "median_s": t, "min_s": "", "max_s": "", "bytes": "", "flops": "",
                         "peak_mem_bytes": "", "compile_s": ""})
        rows.append({**base, "stage": "iteration", "kind": "all", "phase": "all",
                     "median_s": median, "min_s": min(iter_times), "max_s": max(iter_times),
                     "bytes": "", "flops": "", "peak_mem_bytes": "",
                     "compile_s": max(warm - median, 0.0)})
        return rows
    for i, s in enumerate(ex.plan.steps):
        ts = [rep[i] for rep in step_times]
        rows.append({**base, "stage": s.name, "kind": s.kind, "phase": s.phase,
                     "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "bytes": s.cost.bytes, "flops": s.cost.flops, "peak_mem_bytes": "",
                     "compile_s": ""})
    cost = ex.plan.cost()
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
            num = lambda v, scale: "-" if v in ("", None) else f"{v / scale:.2f}"
            table.append([r["schedule"], r["threads"], f"{r['median_s']:.3f}",
                          f"{r['batch'] / r['median_s']:.1f}", speed("caffe"), speed("baseline"),
                          speed(PYTORCH), num(r["bytes"], 1e9), num(r["peak_mem_bytes"], 2**30),
                          f"{r['compile_s']:.1f}"])
        out.append(f"{net}, batch {iters[0]['batch']}, image {iters[0]['image']}\n" + tabulate(
            table, headers=["schedule", "threads", "s/iter", "images/s", "vs caffe",
                            "vs baseline", "vs pytorch", "GB moved", "peak GiB", "compile s"],
            disable_numparse=True))
        if not any(q["schedule"] == PYTORCH for q in iters if q["network"] == net):
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


def run(args) -> int:
    graphs = [networks.load(n) for n in args.networks]
    machine = machine_info()
    total = len(graphs) * len(args.threads) * len(args.schedules) * (args.repeat + 1)
    rows = []
    with tqdm(total=total, desc="bench", unit="iter", leave=False) as bar:
        for g in graphs:
            bar.set_postfix_str(g.name)
            rows += bench_network(g, args, bar, machine)
    columns = COLUMNS + [k for k in machine if k not in COLUMNS]
    if args.csv:
        append_csv(args.csv, rows, columns)
    print(summary_tables(rows))
    if args.csv:
        print(f"\nwrote {len(rows)} rows to {args.csv}")
    if args.plot:
        from bnff.measure.plots import plot_bench
        for path in plot_bench(rows, args.plot):
            print(f"wrote {path}")
    return 0
