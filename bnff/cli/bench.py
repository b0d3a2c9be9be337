"""`bnff bench`: whole training iterations of networks under several schedules, per thread
count. Every schedule is allocated once and checked against `baseline` (loss and gradients)
before it is timed; a warm-up iteration compiles, and its excess over the median is reported
as compile time; rounds interleave the schedules so machine drift hits them alike, and each
speedup is taken from the per-round paired ratios with a 95 % interval
(bnff/measure/measurement.py). After --repeat rounds, rounds are added until every speedup's
interval is within +-(--ci-target) or --budget seconds have passed, and the run says which.

`pytorch` (when torch is installed, in the default list) is the same graph, parameters and
batch as a PyTorch module in a child process (bnff/torchref/schedule.py), validated and timed
in the same rounds; its per-kind rows (stage `pytorch:<kind>`) come from torch.profiler runs
after the timed ones, and it has no byte model or planned peak (those cells stay empty)."""
from __future__ import annotations

import argparse
import time

import numba
import psutil
from tqdm import tqdm

from bnff.cli.args import UserError, positive_int, thread_list
from bnff.lowering.executor import Executor
from bnff.measure.machine import append_csv, machine_info
from bnff.measure.measurement import (max_rel_grad_diff, median_min_max, paired_speedup,
                                      summary_tables)
from bnff.suites.problem import make_batch, make_params
from bnff.lowering.schedules import (FLOAT32, GRAD_TOLERANCE, PYTORCH, SCHEDULES, TORCH_MISSING,
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
                   help="built-in network names, or paths to .json graphs or .onnx models")
    p.add_argument("--batch", type=positive_int, default=16, help="mini-batch (default 16)")
    p.add_argument("--image", type=positive_int, default=224, help="image size (default 224)")
    p.add_argument("--threads", type=thread_list, default=thread_list("all"),
                   help="thread counts, e.g. 1,2 or 1-4 or all (default: 1 to all cores)")
    p.add_argument("--schedules", type=_schedule_list, default=default_schedules(),
                   help=f"comma-separated schedules of {','.join(FLOAT32 + [PYTORCH.name])} "
                        "(default: all; pytorch only when torch is installed)")
    p.add_argument("--repeat", type=positive_int, default=5,
                   help="timed rounds (one iteration of every schedule each) per thread count, "
                        "at least (default 5)")
    p.add_argument("--ci-target", type=_fraction, default=0.03,
                   help="add rounds until every speedup's 95%% interval is within +- this "
                        "fraction (default 0.03), unless --budget ends first")
    p.add_argument("--budget", type=_seconds, default=0.0,
                   help="seconds of rounds per network and thread count after which no more "
                        "are added (default 0: exactly --repeat rounds)")
    p.add_argument("--seed", type=int, default=0, help="seed of parameters and batch")
    p.add_argument("--csv", metavar="FILE", help="append rows to this CSV file")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots here (needs matplotlib)")
    p.set_defaults(func=run)


def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return v


def _seconds(text):
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return v


def default_schedules() -> list:
    return list(SCHEDULES.values()) + [PYTORCH] * torch_available()


def _schedule_list(text):
    """'caffe,bnff' -> [Schedule, ...]: names are resolved here, at the edge, once."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    names = [s.strip() for s in text.split(",") if s.strip()]
    known = {**SCHEDULES, PYTORCH.name: PYTORCH}
    bad = [s for s in names if s not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown schedule(s) {', '.join(bad) or text!r}; known: {', '.join(known)}")
    if PYTORCH.name in names and not torch_available():
        raise argparse.ArgumentTypeError(TORCH_MISSING)
    return [known[s] for s in names]


def executor(graph, schedule, batch, image):
    if schedule is PYTORCH:
        from bnff.torchref.schedule import TorchExecutor
        return TorchExecutor(graph, batch, image)
    return Executor(graph, schedule, batch, image)


def memory_guard(executors, available=None) -> int:
    """Refuses, before allocating, a run whose schedules would not fit in memory together."""
    need = sum(ex.peak_bytes() for ex in executors)
    available = psutil.virtual_memory().available if available is None else available
    if need > 0.9 * available:
        detail = ", ".join(f"{ex.schedule.name} {ex.peak_bytes() / 2**30:.2f}"
                           for ex in executors)
        raise UserError(
            f"{executors[0].graph.name} at batch {executors[0].batch}, image "
            f"{executors[0].image} needs {need / 2**30:.1f} GiB for its schedules ({detail} GiB)"
            f" but {available / 2**30:.1f} GiB are available; use a smaller --batch or "
            "--image, or fewer --schedules")
    return need


def validate(executors, reference="baseline") -> dict:
    """Loss and largest relative gradient difference of each schedule against `reference`."""
    ref = next((ex for ex in executors if ex.schedule.name == reference), executors[0])
    ref_loss, ref_grads = ref.loss(), ref.grads()
    out = {}
    for ex in executors:
        diff, where = max_rel_grad_diff(ex.grads(), ref_grads)
        loss_diff = abs(ex.loss() - ref_loss) / abs(ref_loss)
        if diff > GRAD_TOLERANCE or loss_diff > GRAD_TOLERANCE:
            raise UserError(f"{ex.schedule.name} disagrees with {ref.schedule.name} on "
                            f"{ex.graph.name}: "
                            f"loss {ex.loss():.6f} vs {ref_loss:.6f}, gradient of {where} off by "
                            f"{diff:.1e} (tolerance {GRAD_TOLERANCE:.0e}); not timing it")
        out[ex.schedule.name] = diff
    return out


def speedups_of(network, threads, iter_times) -> dict:
    """{(network, threads, schedule, ref): Speedup} over `caffe`, `baseline` and `pytorch`
    when run."""
    return {(network, threads, s, ref): paired_speedup(iter_times[ref], ts)
            for ref in ("caffe", "baseline", PYTORCH.name) if ref in iter_times
            for s, ts in iter_times.items() if s != ref}


def bench_network(graph, args, bar, machine) -> tuple:
    """(rows, speedups, one line per thread count saying why its rounds stopped)."""
    executors = [executor(graph, s, args.batch, args.image) for s in args.schedules]
    memory_guard(executors)
    params = make_params(graph, args.seed)
    x, labels = make_batch(graph, args.batch, args.image, args.seed)
    for ex in executors:
        ex.load(params, x, labels)
    rows, speedups, notes = [], {}, []
    for threads in args.threads:
        numba.set_num_threads(threads)
        warm = {}
        for ex in executors:
            t = time.perf_counter()
            ex.run()
            warm[ex.schedule.name] = time.perf_counter() - t
            bar.update(1)
        validate(executors)
        step_times = {ex.schedule.name: [] for ex in executors}
        iter_times = {ex.schedule.name: [] for ex in executors}
        start, rounds = time.perf_counter(), 0
        while True:
            for ex in executors:
                times = []
                t = time.perf_counter()
                ex.run(times)
                iter_times[ex.schedule.name].append(time.perf_counter() - t)
                step_times[ex.schedule.name].append(times)
                bar.update(1)
            rounds += 1
            if rounds < args.repeat:
                continue
            here = speedups_of(graph.name, threads, iter_times)
            widest = max((sp.half_width for sp in here.values()), default=0.0)
            if widest <= args.ci_target:
                why = f"every speedup interval within +-{100 * args.ci_target:g}%"
                break
            if time.perf_counter() - start >= args.budget:
                ended = (f"time budget of {args.budget:g} s reached" if args.budget
                         else "--repeat rounds done (no --budget)")
                why = (f"{ended}; widest speedup interval +-{100 * widest:.1f}% "
                       f"(target +-{100 * args.ci_target:g}%)")
                break
        speedups.update(here)
        notes.append(f"{graph.name}, {threads} threads: {rounds} rounds, stopped: {why}")
        for ex in executors:
            name = ex.schedule.name
            rows += _rows(ex, threads, step_times[name], iter_times[name], warm[name], machine)
    for ex in executors:
        ex.release()
    return rows, speedups, notes


def _rows(ex, threads, step_times, iter_times, warm, machine) -> list:
    base = {"network": ex.graph.name, "schedule": ex.schedule.name, "batch": ex.batch,
            "image": ex.image, "threads": threads, "repeats": len(iter_times), **machine}
    rows = []
    median, lo, hi = median_min_max(iter_times)
    if ex.schedule is PYTORCH:
        for kind, t in ex.kinds(min(3, len(iter_times))).items():
            rows.append({**base, "stage": f"pytorch:{kind}", "kind": kind, "phase": "all",
                         "median_s": t, "min_s": "", "max_s": "", "bytes": "", "flops": "",
                         "peak_mem_bytes": "", "compile_s": ""})
        rows.append({**base, "stage": "iteration", "kind": "all", "phase": "all",
                     "median_s": median, "min_s": lo, "max_s": hi,
                     "bytes": "", "flops": "", "peak_mem_bytes": "",
                     "compile_s": max(warm - median, 0.0)})
        return rows
    for i, s in enumerate(ex.plan.steps):
        med, lo, hi = median_min_max([rep[i] for rep in step_times])
        rows.append({**base, "stage": s.name, "kind": s.kind, "phase": s.phase,
                     "median_s": med, "min_s": lo, "max_s": hi,
                     "bytes": s.cost.bytes, "flops": s.cost.flops, "peak_mem_bytes": "",
                     "compile_s": ""})
    cost = ex.plan.cost()
    rows.append({**base, "stage": "iteration", "kind": "all", "phase": "all",
                 "median_s": median, "min_s": lo, "max_s": hi,
                 "bytes": cost.bytes, "flops": cost.flops, "peak_mem_bytes": ex.peak_bytes(),
                 "compile_s": max(warm - median, 0.0)})
    return rows


def run(args) -> int:
    graphs = [networks.load(n) for n in args.networks]
    machine = machine_info()
    total = len(graphs) * len(args.threads) * len(args.schedules) * (args.repeat + 1)
    rows, speedups, notes = [], {}, []
    with tqdm(total=total, desc="bench", unit="iter", leave=False) as bar:
        for g in graphs:
            bar.set_postfix_str(g.name)
            r, sp, n = bench_network(g, args, bar, machine)
            rows, notes = rows + r, notes + n
            speedups.update(sp)
    columns = COLUMNS + [k for k in machine if k not in COLUMNS]
    if args.csv:
        append_csv(args.csv, rows, columns)
    print("\n".join(notes))
    print("speedups: geometric mean of per-round paired ratios [95% bootstrap interval]\n")
    print(summary_tables(rows, speedups))
    if args.csv:
        print(f"\nwrote {len(rows)} rows to {args.csv}")
    if args.plot:
        from bnff.measure.plots import plot_bench
        for path in plot_bench(rows, args.plot, speedups=speedups):
            print(f"wrote {path}")
    return 0
