"""`bnff micro`: every distinct (stage, shape) of one training iteration of a network, timed.

stages_of(graph, batch, image) -> [(Stage, count)] lowers the graph under every float32
schedule and keeps the steps that run a registered stage (bnff/lowering/plan.py StageCall,
bnff/kernels/registry.py), deduplicated by (stage, descriptor): the kernels `bench` runs, at
the shapes it runs them, with the cost it counts; count is the most times one schedule's plan
runs the shape. Steps that compose kernels (convs with BN hooks, the per-channel coefficient
merges) run no registered stage and are reported, not timed. `--stage S --descriptor D`
without NET times that one stage alone: a descriptor parses back into its stage.

For each stage: inputs are made once, every selected variant is run into fresh NaN-filled
outputs and checked against the float64 reference (bnff/measure/measurement.py;
ValidationError if one misses the stage's tolerance or an output holds a NaN or Inf), then per
thread count each variant is warmed up and the variants are timed interleaved, round after
round, so drift hits them alike. The rows of each (stage, shape) are appended to --csv as soon
as it is measured (--resume skips those the file holds for this machine, commit and settings),
so the roofline (bnff/measure/roofline.py) they carry is the one measured at the start of the
run, at each thread count. Each row records, as the options that give them, the settings that
change its numbers and are not columns of their own (`settings`: --seed, --reps, --min-time,
--array-mib, --gemm-n); rows held with other settings are measured again and left out of the
tables (a file written before this column existed is refused: its header differs).
pct_roofline is GB/s over triad for a memory-bound row and GFLOP/s over the FMA peak for a
compute-bound one (bound: flops/bytes against the ridge fma/triad).

pct_sgemm (conv rows only) is GFLOP/s over numpy sgemm's at the same thread count.

Variant `torch` (when torch is installed) is PyTorch's kernel for the same work at the same
shape (bnff/torchref/stages.py says which), validated and timed the same way, at the same
thread count (torch.set_num_threads); its rows carry the default variant's byte and FLOP
model, so GB/s and GFLOP/s compare times at equal work. `--variant default,torch` prints,
per thread count, each stage's iteration total (count-weighted over the network's shapes)
beside PyTorch's (bn_stats and bn_normalize together against PyTorch's one BN forward op).

Target checks (printed), per thread count:
- memory: the byte-weighted mean pct_roofline of the default variants of memory-bound stages
  whose footprint (the bytes of all their inputs and outputs) exceeds twice the LLC. At batch
  16, 224x224 no single activation is larger than 64 MiB, so the footprint, not one tensor, is
  what is compared with the LLC.
- conv: per conv direction, the default variants' FLOP-weighted GFLOP/s over the network's
  conv shapes, sum(count * flops) / sum(count * median_s) (the rate of the whole iteration's
  convs of that direction; equivalently the FLOP-weighted harmonic mean of the rows' GFLOP/s),
  as % of sgemm.
"""
from __future__ import annotations

import sys
from functools import partial

import numba
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from bnff.cli.args import (UserError, add_network_args, check_memory, nonneg_float, nonneg_int,
                           positive_float, positive_int, thread_list)
from bnff.kernels import registry
from bnff.lowering.dispatch import lower
from bnff.lowering.plan import distinct_stage_calls, unstaged
from bnff.lowering.schedules import SCHEDULES
from bnff.measure import roofline
from bnff.measure.machine import CsvLog, latest, llc_bytes, machine_info, same_machine
from bnff.measure.measurement import (ValidationError, fresh_outputs, interleaved, median_min_max,
                                      validate)
from bnff.suites import networks

COLUMNS = ["network", "batch", "image", "stage", "variant", "is_default", "descriptor", "count",
           "threads", "median_s", "min_s", "reps", "bytes", "flops", "gbps", "gflops", "bound",
           "pct_roofline", "triad_gbps", "fma_gflops", "sgemm_gflops", "pct_sgemm",
           "footprint_bytes", "max_rel_error", "reproducer", "settings"]
CONV_DIRECTIONS = ["conv_fwd", "conv_bwd_data", "conv_bwd_weights"]


def check_batch_norm(graph, batch: int, image: int) -> None:
    """UserError when a BN sees one value per channel (training-mode BN is undefined)."""
    shapes = graph.infer_shapes(batch, image)
    for node in graph.nodes:
        x = node.inputs[0]
        if node.op == "batchnorm" and shapes[x][0] * shapes[x][2] * shapes[x][3] == 1:
            raise UserError(f"node {node.name}: training-mode batch norm needs more than one "
                            f"value per channel, got {shapes[x]}; use a larger --batch "
                            "or --image")


def plans_of(graph, batch: int, image: int) -> dict:
    """{schedule: Plan} of every float32 schedule."""
    check_batch_norm(graph, batch, image)
    return {name: lower(graph, batch, image, s)[0] for name, s in SCHEDULES.items()}


def stages_of(graph, batch: int, image: int, plans=None) -> list:
    """[(Stage, count)] of the lowered plans' steps, in first-use order, deduplicated."""
    plans = plans if plans is not None else plans_of(graph, batch, image)
    found = {}
    for call, count in distinct_stage_calls(plans.values()):
        key = (call.stage, call.descriptor)
        if key in found:
            found[key][1] = max(found[key][1], count)
        else:
            found[key] = [registry.make(*key), count]
    return [(st, count) for st, count in found.values()]


def untimed(plans) -> str:
    """One line per schedule: the plan steps that run no registered stage, and their bytes."""
    lines = []
    for name, plan in plans.items():
        steps = unstaged(plan)
        if steps:
            b = sum(s.cost.bytes for s in steps)
            lines.append(f"{name}: {len(steps)} of {len(plan.steps)} steps "
                         f"({100 * b / max(plan.cost().bytes, 1):.0f}% of its bytes) run no "
                         "registered stage (coefficient merges, statistics, residual add "
                         "backward): not timed")
    return "\n".join(lines)


def footprint(arrays: dict) -> int:
    return sum(a.nbytes for a in arrays.values())


TORCH = "torch"


def run_variant(stage, variant, inputs, outputs) -> None:
    """One call of the variant into `outputs` (PyTorch's op, then its result copied in)."""
    if variant == TORCH:
        from bnff.torchref.stages import TorchOp
        op = TorchOp(stage, inputs)
        op()
        op.fill(outputs)
    else:
        stage.run(variant, inputs, outputs)


def timed_calls(stage, variants, inputs, outputs) -> dict:
    """{variant: the call timed}: PyTorch's op alone, without copying its result."""
    out = {}
    for v in variants:
        if v == TORCH:
            from bnff.torchref.stages import TorchOp
            out[v] = TorchOp(stage, inputs)
        else:
            out[v] = partial(stage.run, v, inputs, outputs)
    return out


def _variants(st, wanted: list) -> list:
    """The stage's variants among `wanted` (names, `default`, `torch`), in that order."""
    out = []
    for w in wanted:
        v = st.default if w == "default" else w
        if v == TORCH:
            from bnff.torchref.stages import TorchOp
            ok = TorchOp.supports(st)
        else:
            ok = v in st.variants
        if ok and v not in out:
            out.append(v)
    return out


def select(items: list, stage: str | None, variant: str | None, descriptor: str | None) -> list:
    """[(Stage, count, [variants])] after the --stage, --variant and --descriptor filters;
    `variant` is a comma-separated list of names, `default` and `torch`."""
    if variant is not None and TORCH in variant.split(","):
        from bnff.lowering.schedules import TORCH_MISSING, torch_available
        if not torch_available():
            raise UserError(f"--variant torch: {TORCH_MISSING}")
    names = sorted({st.name for st, _ in items})
    wanted = None if stage is None else stage.split(",")
    for w in wanted or []:
        if w not in names:
            raise UserError(f"unknown stage {w!r} for this network; stages: {', '.join(names)}")
    out = []
    for st, count in items:
        if wanted is not None and st.name not in wanted:
            continue
        if descriptor is not None and st.descriptor() != descriptor:
            continue
        vs = list(st.variants) if variant is None else _variants(st, variant.split(","))
        if not vs and wanted is not None and len(wanted) == 1:
            raise UserError(f"stage {stage} has no variant {variant!r}; variants: "
                            f"{', '.join(st.variants)}, default or torch")
        if not vs:
            continue
        out.append((st, count, vs))
    if not out:
        raise UserError("nothing to time: no stage matches "
                        f"--stage {stage} --variant {variant} --descriptor {descriptor}")
    return out


def reproducer(st, variant, threads) -> str:
    """The standalone command that times this row again (no network needed)."""
    return (f"bnff micro --stage {st.name} --descriptor {st.descriptor()} --variant {variant} "
            f"--threads {threads}")


def row_for(args, st, count, variant, threads, times, roof, errors, fp) -> dict:
    cost = st.cost(st.default if variant == TORCH else variant)
    med, fastest, _ = median_min_max(times)
    gbps, gflops = cost.bytes / med / 1e9, cost.flops / med / 1e9
    ridge = roof["fma_gflops"] / roof["triad_gbps"]
    bound = "compute" if cost.bytes == 0 or cost.flops / cost.bytes > ridge else "memory"
    pct = 100 * (gflops / roof["fma_gflops"] if bound == "compute" else gbps / roof["triad_gbps"])
    return {"network": args.network or "", "batch": args.batch, "image": args.image,
            "stage": st.name, "variant": variant, "is_default": variant == st.default,
            "descriptor": st.descriptor(), "count": count, "threads": threads,
            "median_s": med, "min_s": fastest, "reps": len(times), "bytes": cost.bytes,
            "flops": cost.flops, "gbps": gbps, "gflops": gflops, "bound": bound,
            "pct_roofline": pct, "triad_gbps": roof["triad_gbps"],
            "fma_gflops": roof["fma_gflops"], "sgemm_gflops": roof["sgemm_gflops"],
            "pct_sgemm": 100 * gflops / roof["sgemm_gflops"] if st.name in CONV_DIRECTIONS
            else None, "footprint_bytes": fp,
            "max_rel_error": errors[variant], "reproducer": reproducer(st, variant, threads)}


def memory_target(rows: list, llc: int) -> list:
    """Per thread count: byte-weighted pct of triad over default memory-bound rows whose
    stage footprint (all tensors it touches) exceeds twice the LLC."""
    out = []
    for t in sorted({r["threads"] for r in rows}):
        sel = [r for r in rows if r["threads"] == t and r["is_default"] and
               r["bound"] == "memory" and r["footprint_bytes"] > 2 * llc]
        w = sum(r["bytes"] * r["count"] for r in sel)
        if w:
            pct = sum(r["pct_roofline"] * r["bytes"] * r["count"] for r in sel) / w
            out.append((t, len(sel), w, pct))
    return out


def conv_target(rows: list) -> list:
    """[(threads, stage, shapes, GFLOP, GFLOP/s, sgemm GFLOP/s, % of sgemm)] per thread count
    and conv direction: default rows, GFLOP/s = sum(count * flops) / sum(count * median_s)."""
    out = []
    for t in sorted({r["threads"] for r in rows}):
        for s in CONV_DIRECTIONS:
            sel = [r for r in rows if r["threads"] == t and r["is_default"] and r["stage"] == s]
            if sel:
                flops = sum(r["flops"] * r["count"] for r in sel)
                rate = flops / sum(r["median_s"] * r["count"] for r in sel) / 1e9
                sgemm = sel[0]["sgemm_gflops"]
                out.append((t, s, len(sel), flops / 1e9, rate, sgemm, 100 * rate / sgemm))
    return out


def print_tables(rows: list, top: int, llc: int) -> None:
    rows = sorted(rows, key=lambda r: -r["median_s"] * r["count"])
    table = [[r["stage"], r["variant"] + ("*" if r["is_default"] else ""), r["descriptor"],
              r["count"], r["threads"], 1e3 * r["median_s"], 1e3 * r["median_s"] * r["count"],
              r["gbps"], r["gflops"], r["bound"], r["pct_roofline"], r["pct_sgemm"]]
             for r in rows[:top]]
    print(tabulate(table, headers=["stage", "variant", "descriptor", "count", "threads",
                                   "median ms", "total ms", "GB/s", "GFLOP/s", "bound", "% roof",
                                   "% sgemm"], floatfmt=".2f", missingval=""))
    if len(rows) > top:
        print(f"... {len(rows) - top} more rows (--top, or --csv for all)")
    by_stage = {}
    for r in rows:
        if r["is_default"]:
            k = (r["threads"], r["stage"])
            t, b = by_stage.get(k, (0.0, 0))
            by_stage[k] = (t + r["median_s"] * r["count"], b + r["bytes"] * r["count"])
    summary = [[t, s, 1e3 * tt, bb / tt / 1e9] for (t, s), (tt, bb) in
               sorted(by_stage.items(), key=lambda kv: (kv[0][0], -kv[1][0]))]
    print("\ndefault variants, per stage and thread count (* marks the default above)")
    print(tabulate(summary, headers=["threads", "stage", "total ms", "GB/s"], floatfmt=".2f"))
    for t, n, w, pct in memory_target(rows, llc):
        print(f"threads {t}: memory-bound default stages touching > 2x LLC ({n} shapes, "
              f"{w / 1e9:.2f} GB per iteration): {pct:.1f}% of triad, byte-weighted")
    parity = [[t, g, 1e3 * d, 1e3 * p, d / p if p else None] for t, g, d, p in torch_parity(rows)]
    if parity:
        print("\ndefault variants against PyTorch, ms per iteration over the network's shapes")
        print(tabulate(parity, headers=["threads", "stage", "default ms", "torch ms",
                                        "default / torch"], floatfmt=".2f", missingval=""))
    for t, s, n, gflop, rate, sgemm, pct in conv_target(rows):
        print(f"threads {t}: {s} default ({n} shapes, {gflop:.1f} GFLOP per iteration): "
              f"{rate:.1f} GFLOP/s, {pct:.1f}% of sgemm ({sgemm:.1f} GFLOP/s), FLOP-weighted")


def add_parser(sub) -> None:
    p = sub.add_parser("micro", help="time every stage shape of a network's training iteration",
                       description="Time every distinct (stage, shape) the schedules' plans run in "
                                   "one training iteration of NET (steps with no registered "
                                   "stage are counted and reported), each "
                                   "variant validated against the float64 reference first; "
                                   "roofline figures are measured in "
                                   "the same run. Run it with nothing else busy on the machine. "
                                   "Example: bnff micro resnet50 --batch 16 --image 224 --threads 1,2 "
                                   "--variant default --csv micro.csv. Without NET, --stage S "
                                   "--descriptor D times that one stage alone (the reproducer "
                                   "column of every row).")
    add_network_args(p, optional=True)
    p.add_argument("--threads", type=thread_list, default=None,
                   help="thread counts, e.g. 1,2 or 1-4 or all (default all)")
    p.add_argument("--stage", help="only these stages, comma-separated (e.g. bn_stats,conv_fwd)")
    p.add_argument("--variant", help="only these variants, comma-separated: names, `default`, "
                                     "`torch` (PyTorch's kernel; default: all the suite's "
                                     "variants)")
    p.add_argument("--descriptor", help="only this shape, e.g. mb16ic256ih56iw56eps1e-05; "
                                        "without NET, the one shape to time")
    p.add_argument("--csv", metavar="FILE",
                   help="append one row per (stage, variant, shape, threads) to FILE, those of "
                        "each (stage, shape) as soon as it is measured; the final tables are "
                        "read back from it")
    p.add_argument("--reps", type=positive_int, default=5,
                   help="minimum timed rounds per variant (default 5)")
    p.add_argument("--min-time", type=nonneg_float, default=0.2,
                   help="seconds each variant is timed at least, up to 50x --reps rounds "
                        "(default 0.2)")
    p.add_argument("--top", type=nonneg_int, default=40,
                   help="rows of the console table (default 40)")
    p.add_argument("--array-mib", type=positive_float, default=None,
                   help="roofline STREAM array MiB (default 8x the LLC)")
    p.add_argument("--gemm-n", type=positive_int, default=2048,
                   help="roofline sgemm size (default 2048)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="skip the (stage, shape)s the --csv file already holds for this "
                        "machine, commit and settings (after an interrupted run)")
    p.set_defaults(func=run)


def standalone(args):
    """The one stage --stage and --descriptor name (no network)."""
    if not args.stage or not args.descriptor or "," in args.stage:
        raise UserError("give NET, or one --stage and its --descriptor to time that stage alone")
    try:
        st = registry.make(args.stage, args.descriptor)
    except (registry.UnknownStage, registry.DescriptorError) as e:
        raise UserError(str(e)) from None
    args.batch, args.image = st.shape.get("mb", ""), st.shape.get("ih", "")
    return st


def set_threads(threads: int, variants) -> None:
    numba.set_num_threads(threads)
    if TORCH in variants:
        import torch
        torch.set_num_threads(threads)


def torch_parity(rows: list) -> list:
    """[(threads, stage group, default total s, torch total s)] per iteration, count-weighted,
    for the stage groups PyTorch has (bn_stats and bn_normalize form one group, bn_fwd)."""
    group = lambda s: "bn_fwd" if s in ("bn_stats", "bn_normalize") else s
    have = {(r["threads"], group(r["stage"])) for r in rows if r["variant"] == TORCH}
    tot = {}
    for r in rows:
        key = (r["threads"], group(r["stage"]))
        if key in have and (r["is_default"] or r["variant"] == TORCH):
            d, t = tot.get(key, (0.0, 0.0))
            s = r["median_s"] * r["count"]
            tot[key] = (d, t + s) if r["variant"] == TORCH else (d + s, t)
    return [(th, g, d, t) for (th, g), (d, t) in sorted(tot.items())]


def settings_of(args) -> str:
    """The options that change a row's numbers and are not columns (the rows' `settings`)."""
    mib = args.array_mib if args.array_mib is not None else roofline.default_array_mib()
    return (f"--seed {args.seed} --reps {args.reps} --min-time {args.min_time:g} "
            f"--array-mib {mib:g} --gemm-n {args.gemm_n}")


def _row_key(r) -> tuple:
    return (r["network"], r["batch"], r["image"], r["stage"], r["descriptor"], r["variant"],
            r["threads"], r["settings"])


def micro(args, progress=True, emit=None, held=()) -> list:
    """The rows of one `bnff micro` run (raises UserError, ValidationError). emit(rows) gets the
    rows of each (stage, shape) as soon as they are measured; a (stage, shape) whose every
    (variant, threads) row is in `held` (_row_key) is skipped."""
    threads = args.threads or thread_list("all")
    mib = args.array_mib if args.array_mib is not None else roofline.default_array_mib()
    if args.network is None:
        items = [(standalone(args), 1)]
        args.untimed = ""
    else:
        graph = networks.load(args.network)
        plans = plans_of(graph, args.batch, args.image)
        items, args.untimed = stages_of(graph, args.batch, args.image, plans), untimed(plans)
    work = select(items, args.stage, args.variant, args.descriptor)
    check_memory(max(memory_need(st, vs) for st, _, vs in work) + 3 * int(mib * 2**20),
                 f"{args.network or args.stage} at batch {args.batch}, image {args.image}")
    machine = {**machine_info(), "settings": settings_of(args)}
    keys = lambda st, vs: {(args.network or "", args.batch, args.image, st.name, st.descriptor(),
                            v, t, machine["settings"]) for v in vs for t in threads}
    work = [w for w in work if not keys(w[0], w[2]) <= set(held)]
    roofs, out = {}, []
    with tqdm(total=len(threads) + len(work), desc="micro", unit="step", leave=False,
              disable=not progress) as bar:
        for t in threads if work else ():
            bar.set_postfix_str(f"roofline, {t} threads")
            roofs[t] = roofline.measure(t, mib, args.gemm_n, args.reps)
            bar.update()
        rng = np.random.default_rng(args.seed)
        for st, count, variants in work:
            bar.set_postfix_str(f"{st.name} {st.descriptor()}"[:60])
            inputs = st.make_inputs(rng)
            set_threads(max(threads), variants)
            errors = validate(st, variants, inputs, partial(run_variant, st))
            outputs = fresh_outputs(st, inputs)  # an accumulated output starts from its input
            fp = footprint(inputs) + footprint(outputs)
            calls = timed_calls(st, variants, inputs, outputs)
            rows = []
            for t in threads:
                set_threads(t, variants)
                times = interleaved(calls, args.reps, args.min_time)
                rows += [{**row_for(args, st, count, v, t, times[v], roofs[t], errors, fp),
                          **machine} for v in variants]
            out += rows
            if emit:
                emit(rows)
            bar.update()
            del inputs, outputs
    set_threads(numba.config.NUMBA_NUM_THREADS, variants=())
    return out


def memory_need(st, variants) -> int:
    """Bytes a stage's validation holds, estimated before allocating from the bytes its
    variants declare (each tensor streamed once: its float32 inputs and outputs) and the
    float64 reference (twice that)."""
    return 3 * max(st.cost(st.default if v == TORCH else v).bytes for v in variants)


def run(args) -> int:
    machine = machine_info()
    columns = COLUMNS + [k for k in machine if k not in COLUMNS]
    log = CsvLog(args.csv, columns) if args.csv else None
    if args.resume and log is None:
        raise UserError("--resume needs --csv: it skips what that file already holds")
    held = {_row_key(r) for r in log.read() if same_machine(r, machine)
            and r["settings"] == settings_of(args)} if args.resume else ()
    try:
        rows = micro(args, emit=log.append if log else None, held=held)
    except ValidationError as e:
        print(f"bnff micro: validation failed: {e}", file=sys.stderr)
        return 1
    appended = len(rows)
    if log:  # the tables of everything this run covers, as the CSV holds it
        mine = {_row_key(r) for r in rows} | set(held)
        rows = latest([r for r in log.read() if same_machine(r, machine)
                       and _row_key(r) in mine], key=_row_key)
    if rows:
        print_tables(rows, args.top, llc_bytes())
    if args.untimed:
        print(args.untimed)
    if log:
        print(f"wrote {appended} rows to {args.csv}")
    return 0
