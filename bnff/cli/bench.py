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
after the timed ones, and it has no byte model or planned peak (those cells stay empty).

Schedules whose plans do not fit in memory together run in the largest groups that do
(memory_groups), each group interleaved and checked against one baseline iteration; speedups
between groups are ratios of medians, not paired. The rows of each (network, threads) are
appended to --csv as soon as they are measured, --resume skips the points the file holds for
this machine, commit and settings, and the final tables are read back from the file, so an
interrupted and resumed run ends with the tables of an uninterrupted one.

Every row records the settings that change its numbers and are not columns of their own
(`settings`: --seed, which draws the parameters and batch, and --repeat, --ci-target and
--budget, which decide the rounds), as the options that give them. A point held with other
settings is measured again, not taken as done, and the final tables keep only the rows of
this run's settings; a file written before this column existed has another header and is
refused (CsvLog), since nothing in it can say with which settings its rows were measured.

--plot DIR draws the plots of bnff/measure/plots.py; for its roofline chart the run measures
this machine's roofs at its largest thread count after the sweep (STREAM triad, FMA peak,
numpy sgemm: bnff/measure/roofline.py, ROOF_REPS and ROOF_GEMM_N), prints them and appends them to
DIR/roofline.csv in the format of `bnff roofline --csv`; the iteration rows are unchanged."""
from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np
from tqdm import tqdm

from bnff.cli.args import (RunFailed, UserError, available_bytes, check_memory, nonneg_float,
                           nonneg_int, positive_float, positive_int, thread_list,
                           writable_folder)
from bnff.lowering.executor import Executor
from bnff.lowering.schedules import (FLOAT32, GRAD_TOLERANCE, PYTORCH, SCHEDULES, TORCH_MISSING,
                                     torch_available)
from bnff.measure.machine import CsvLog, latest, machine_info, same_machine
from bnff.measure import roofline
from bnff.measure.measurement import (max_rel_grad_diff, median_min_max, paired_speedup,
                                      summary_tables)
from bnff.suites import networks
from bnff.suites.problem import make_batch, make_params

COLUMNS = ["network", "schedule", "batch", "image", "threads", "stage", "kind", "phase",
           "median_s", "min_s", "max_s", "repeats", "bytes", "flops", "peak_mem_bytes",
           "compile_s", "settings"]

# The roofs --plot draws, measured after the sweep at its largest thread count: STREAM over
# arrays of 8x the LLC, as `bnff roofline` and `bnff micro` measure them, but 3 repetitions
# and sgemm at n = 1024: 2.2 s at 2 threads on the 2-vCPU EPYC (znver5), plus about 7 s to
# compile the STREAM and FMA kernels in a fresh process.
ROOF_REPS, ROOF_GEMM_N = 3, 1024

# PyTorch against `baseline`: two independent float32 computations (other algorithms and
# summation orders), so the rounding that deep networks amplify counts twice: ResNet-50 at
# batch 16, 224x224 put layer1.0.bn3.weight 5.2e-2 apart (each side ~1e-2 from float64 at
# batch 2, 64x64). A dropped or doubled term is off by O(1).
PYTORCH_TOLERANCE = 2 * GRAD_TOLERANCE


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="time whole training iterations per schedule and thread count",
        description="Time whole training iterations (forward, loss, backward) of one or more "
                    "networks under several schedules and thread counts; write one CSV row per "
                    "(network, schedule, threads, stage) and one `iteration` row, and print "
                    "speedups, bytes, peak memory and the time breakdown by kind.")
    p.add_argument("networks", nargs="+", metavar="NET",
                   help="built-in network names or paths to .json graphs or .onnx models")
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
    p.add_argument("--budget", type=nonneg_float, default=0.0,
                   help="seconds of rounds per network and thread count after which no more "
                        "are added (default 0: exactly --repeat rounds)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of parameters and batch")
    p.add_argument("--csv", metavar="FILE",
                   help="append the rows of each (network, threads) to this CSV file as soon as "
                        "they are measured; the final tables are read back from it")
    p.add_argument("--resume", action="store_true",
                   help="skip the (network, threads) points the --csv file already holds for "
                        "this machine, commit and settings (after an interrupted run)")
    p.add_argument("--memory-gib", type=positive_float, default=None,
                   help="memory the run may use (default: what is available now); schedules "
                        "that do not fit together run in groups")
    p.add_argument("--plot", metavar="DIR",
                   help="write PNG plots here (needs matplotlib), the roofline chart under the "
                        "roofs measured after the sweep (appended to DIR/roofline.csv)")
    p.set_defaults(func=run)


def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return v


def default_schedules() -> list:
    return list(SCHEDULES.values()) + [PYTORCH] * torch_available()


def _schedule_list(text):
    """'caffe,bnff' -> [Schedule, ...]: names are resolved here, at the edge, once."""
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
                f"{g0.graph.name} at batch {g0.batch}, image {g0.image}: schedule "
                f"{ex.schedule.name} alone needs {ex.peak_bytes() / 2**30:.2f} GiB but "
                f"{available / 2**30:.1f} GiB are available; use a smaller --batch or --image")
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
    where = f"{ex.schedule.name} on {ex.graph.name}"
    if not np.isfinite(ex.loss()):
        raise RunFailed(f"{where}: the loss is {ex.loss()}")
    for k, g in ex.grads().items():
        if not np.isfinite(g).all():
            raise RunFailed(f"{where}: the gradient of {k} holds NaN or Inf")


def validate(executors, reference=None) -> dict:
    """Largest relative gradient difference of each schedule against `reference` = (name, loss,
    grads), by default `baseline` among the executors (else the first); RunFailed on a NaN or
    Inf or a difference beyond GRAD_TOLERANCE (PYTORCH_TOLERANCE for pytorch)."""
    for ex in executors:
        check_finite(ex)
    if reference is None:
        ref = next((ex for ex in executors if ex.schedule.name == "baseline"), executors[0])
        reference = (ref.schedule.name, ref.loss(), ref.grads())
    ref_name, ref_loss, ref_grads = reference
    out = {}
    for ex in executors:
        diff, where = max_rel_grad_diff(ex.grads(), ref_grads)
        loss_diff = abs(ex.loss() - ref_loss) / abs(ref_loss)
        tol = PYTORCH_TOLERANCE if ex.schedule is PYTORCH else GRAD_TOLERANCE
        if diff > tol or loss_diff > tol:
            raise RunFailed(f"{ex.schedule.name} disagrees with {ref_name} on {ex.graph.name}: "
                            f"loss {ex.loss():.6f} vs {ref_loss:.6f}, gradient of {where} off by "
                            f"{diff:.1e} (tolerance {tol:.0e}); not timing it")
        out[ex.schedule.name] = diff
    return out


def baseline_result(graph, args, problem) -> tuple:
    """("baseline", loss, grads) of one baseline iteration: what every group is checked against
    (allocated only for this, then released)."""
    ex = Executor(graph, SCHEDULES["baseline"], args.batch, args.image)
    ex.load(*problem)
    ex.run()
    check_finite(ex)
    out = ("baseline", ex.loss(), ex.grads())
    ex.release()
    return out


def speedups_of(network, threads, iter_times) -> dict:
    """{(network, threads, schedule, ref): Speedup} over `caffe`, `baseline` and `pytorch`
    when run in the same rounds."""
    return {(network, threads, s, ref): paired_speedup(iter_times[ref], ts)
            for ref in ("caffe", "baseline", PYTORCH.name) if ref in iter_times
            for s, ts in iter_times.items() if s != ref}


def time_group(executors, threads, args, bar, reference) -> tuple:
    """({schedule: (warm-up seconds, [iteration seconds], [[step seconds]] per round)},
    speedups, why the rounds stopped): a warm-up iteration each (it compiles), validation
    against `reference`, then rounds interleaving the schedules: --repeat, and more until every
    speedup's interval is within --ci-target or --budget seconds have passed."""
    numba.set_num_threads(threads)
    warm = {}
    for ex in executors:
        t = time.perf_counter()
        ex.run()
        warm[ex.schedule.name] = time.perf_counter() - t
        bar.update(1)
    validate(executors, reference)
    out = {ex.schedule.name: (warm[ex.schedule.name], [], []) for ex in executors}
    iter_times = {name: v[1] for name, v in out.items()}
    start, rounds = time.perf_counter(), 0
    while True:
        for ex in executors:
            steps = []
            t = time.perf_counter()
            ex.run(steps)
            out[ex.schedule.name][1].append(time.perf_counter() - t)
            out[ex.schedule.name][2].append(steps)
            bar.update(1)
        rounds += 1
        if rounds < args.repeat:
            continue
        here = speedups_of(executors[0].graph.name, threads, iter_times)
        widest = max((sp.half_width for sp in here.values()), default=0.0)
        if widest <= args.ci_target:
            return out, here, (f"{rounds} rounds, stopped: every speedup interval within "
                               f"+-{100 * args.ci_target:g}%")
        if time.perf_counter() - start >= args.budget:
            ended = (f"time budget of {args.budget:g} s reached" if args.budget
                     else "--repeat rounds done (no --budget)")
            return out, here, (f"{rounds} rounds, stopped: {ended}; widest speedup interval "
                               f"+-{100 * widest:.1f}% (target +-{100 * args.ci_target:g}%)")


def bench_network(graph, groups, args, todo, bar, machine, emit) -> tuple:
    """Times `graph`'s schedule groups at each thread count in `todo`, validating each group
    against one baseline iteration first; emit(rows) gets the rows of each (network, threads)
    as soon as all its groups have run. A single group stays allocated across thread counts.
    Returns (speedups, one note per thread count and group saying why its rounds stopped).
    `machine` holds the columns every row carries: the machine's and `settings`."""
    problem = (make_params(graph, args.seed), *make_batch(graph, args.batch, args.image,
                                                          args.seed))
    reference = baseline_result(graph, args, problem) if todo else None
    speedups, notes = {}, []
    try:
        for threads in todo:
            rows = []
            for group in groups:
                for ex in group:
                    if not ex.loaded:
                        ex.load(*problem)
                times, sp, why = time_group(group, threads, args, bar, reference)
                speedups.update(sp)
                which = (f" ({','.join(ex.schedule.name for ex in group)})"
                         if len(groups) > 1 else "")
                notes.append(f"{graph.name}, {threads} threads: {why}{which}")
                for ex in group:
                    warm, iters, steps = times[ex.schedule.name]
                    rows += _rows(ex, threads, steps, iters, warm, machine)
                    if ex.schedule is PYTORCH:
                        notes.append(profile_note(graph.name, threads, ex.profiled_s, iters))
                if len(groups) > 1:
                    for ex in group:
                        ex.release()
            emit(rows)
    finally:
        for group in groups:
            for ex in group:
                ex.release()
    return speedups, notes


def profile_note(network, threads, profiled, iter_times) -> str:
    """How long PyTorch's profiled iterations, which its time by kind comes from, took against
    its timed ones: a disturbed profiling pass shows as a ratio far from 1 (on ResNet-50 at 1
    thread PyTorch's kinds once summed to 4.57 s against 3.25 s timed, with nothing to tell)."""
    median = median_min_max(iter_times)[0]
    return (f"{network}, {threads} threads: pytorch's time by kind is from profiled iterations "
            f"of {profiled:.4g} s against {median:.4g} s timed ({profiled / median:.2f}x)")


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
        med, smin, smax = median_min_max([rep[i] for rep in step_times])
        rows.append({**base, "stage": s.name, "kind": s.kind, "phase": s.phase,
                     "median_s": med, "min_s": smin, "max_s": smax,
                     "bytes": s.cost.bytes, "flops": s.cost.flops, "peak_mem_bytes": "",
                     "compile_s": ""})
    cost = ex.plan.cost()
    rows.append({**base, "stage": "iteration", "kind": "all", "phase": "all",
                 "median_s": median, "min_s": lo, "max_s": hi,
                 "bytes": cost.bytes, "flops": cost.flops, "peak_mem_bytes": ex.peak_bytes(),
                 "compile_s": max(warm - median, 0.0)})
    return rows


def settings_of(args) -> str:
    """The options of a run that change its numbers, other than the columns (the rows'
    `settings`)."""
    return (f"--seed {args.seed} --repeat {args.repeat} --ci-target {args.ci_target:g} "
            f"--budget {args.budget:g}")


def _run_key(r) -> tuple:
    return (r["network"], r["batch"], r["image"], r["threads"])


def run(args) -> int:
    graphs = [networks.load(n) for n in args.networks]
    for g in graphs:
        g.infer_shapes(args.batch, args.image)
    names = [s.name for s in args.schedules]
    available = args.memory_gib * 2**30 if args.memory_gib else available_bytes()
    plans = []
    for g in graphs:
        groups = memory_groups([executor(g, s, args.batch, args.image)
                                for s in args.schedules], available)
        plans.append((g, groups))
    machine = machine_info()
    settings = settings_of(args)
    columns = COLUMNS + [k for k in machine if k not in COLUMNS]
    log = CsvLog(args.csv, columns) if args.csv else None
    roof_log = None
    if args.plot:
        writable_folder(args.plot, "plots")
        roof_log = CsvLog(os.path.join(args.plot, "roofline.csv"),
                          roofline.COLUMNS + list(machine))
        mib = roofline.default_array_mib()
        check_memory(3 * int(mib * 2**20) + 3 * 4 * ROOF_GEMM_N ** 2, "the roofline of --plot")
    if args.resume and log is None:
        raise UserError("--resume needs --csv: it skips what that file already holds")
    held = {}
    for r in (log.read() if log else []):
        if r["stage"] == "iteration" and same_machine(r, machine) and r["settings"] == settings:
            held.setdefault(_run_key(r), set()).add(r["schedule"])
    todo = {g.name: [t for t in args.threads if not (args.resume and set(names) <=
                                                     held.get((g.name, args.batch, args.image,
                                                               t), set()))]
            for g, _ in plans}
    for g, groups in plans:
        if len(groups) > 1:
            print(f"{g.name}: the schedules do not fit in {available / 2**30:.1f} GiB together; "
                  f"running them in {len(groups)} groups, each interleaved and validated against "
                  "baseline: " + " | ".join(",".join(ex.schedule.name for ex in gr)
                                           for gr in groups))
        skipped = [t for t in args.threads if t not in todo[g.name]]
        if skipped:
            print(f"{g.name}: threads {','.join(map(str, skipped))} already in {args.csv} "
                  f"for this machine, commit {machine['git_commit']} and settings {settings} "
                  "(--resume); skipped")
    measured, speedups, notes = [], {}, []

    def emit(rows):
        measured.extend(rows)
        if log:
            log.append(rows)

    total = sum(len(todo[g.name]) for g, _ in plans) * len(args.schedules) * (args.repeat + 1)
    with tqdm(total=total, desc="bench", unit="iter", leave=False) as bar:
        for g, groups in plans:
            bar.set_postfix_str(g.name)
            sp, n = bench_network(g, groups, args, todo[g.name], bar,
                                  {**machine, "settings": settings}, emit)
            speedups.update(sp)
            notes += n
    rows = measured
    if log:  # the tables of everything this run covers, as the CSV holds it
        keys = {(g.name, args.batch, args.image, t) for g, _ in plans for t in args.threads}
        rows = latest([r for r in log.read() if same_machine(r, machine) and _run_key(r) in keys
                       and r["schedule"] in names and r["settings"] == settings],
                      key=lambda r: _run_key(r) + (r["schedule"], r["stage"]))
    if notes:
        print("\n".join(notes))
    print("speedups: geometric mean of per-round paired ratios [95% bootstrap interval] where "
          "measured in this run's rounds, else ratios of medians\n")
    print(summary_tables(rows, speedups))
    if log:
        print(f"\nwrote {len(measured)} rows to {args.csv}")
    if args.plot:
        from bnff.measure.plots import plot_bench
        top = max(args.threads)
        roof = roofline.measure(top, mib, ROOF_GEMM_N, ROOF_REPS)
        roof_log.append([{**roof, **machine}])
        print(f"\nroofline, {top} threads: triad {roof['triad_gbps']:.1f} GB/s, FMA peak "
              f"{roof['fma_gflops']:.1f} GFLOP/s, numpy sgemm {roof['sgemm_gflops']:.1f} GFLOP/s "
              f"(appended to {roof_log.path})")
        for path in plot_bench(rows, args.plot, roofline={top: roof}, speedups=speedups):
            print(f"wrote {path}")
    return 0
