"""`bnff micro`: every distinct (stage, shape) of one training iteration of a network, timed.

stages_of(graph, batch, image) -> [(Stage, count)] is the one list of what a training
iteration runs in a framework's layer-by-layer order (forward, loss, backward, the gradient
sums where a tensor feeds several nodes), deduplicated by (stage, descriptor); count is how
often the shape occurs. Conv stages come from kernels/conv_*.py when those modules exist.

For each stage: inputs are made once, every selected variant is run and checked against the
float64 reference (ValidationError if one misses the stage's tolerance or an output holds a
NaN or Inf), then per thread count each variant is warmed up and the variants are timed
interleaved, round after round, so drift hits them alike. The rows of each (stage, shape) are
appended to --csv as soon as it is measured (--resume skips those the file holds for this
machine and commit), so the roofline (bnff/cli/roofline.py) they carry is the one measured at
the start of the run, at each thread count.
pct_roofline is GB/s over triad for a memory-bound row and GFLOP/s over the FMA peak for a
compute-bound one (bound: flops/bytes against the ridge fma/triad).

pct_sgemm (conv rows only) is GFLOP/s over numpy sgemm's at the same thread count.

The bnff forms of a BN site's convs are stages of their own, each with a `separate` variant
(the passes fission runs) beside the `fused` one, so bytes and time of both sit side by side:
conv_fwd_bn_relu and conv_bwd_data_relu_sums (bnff/kernels/conv/conv_fused.py) for every conv fed by
BN -> ReLU, and conv_bwd_1x1 with the BN gradient formed in its prologue (two_kernels vs
one_pass, bnff/kernels/conv/conv_bwd_fused.py) for every 1x1 conv.

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

import importlib
import importlib.util
import statistics
import sys
import time
from functools import partial

import numba
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from bnff.cli import roofline
from bnff.cli.args import (UserError, add_network_args, check_memory, nonneg_float, nonneg_int,
                           positive_float, positive_int, thread_list)
from bnff.measure.machine import CsvLog, latest, llc_bytes, machine_info, same_machine
from bnff.kernels.elementwise.add import Add
from bnff.kernels.bn.bn_backward import BNBackward
from bnff.kernels.bn.bn_normalize import BNNormalize
from bnff.kernels.bn.bn_fused import BN2AddReLU, BNAddReLU, BNDx, BNReLU, BNReLUDx, ReLUMaskSums
from bnff.kernels.bn.bn_stats import BNStats
from bnff.kernels.elementwise.concat import ConcatBackward, ConcatForward
from bnff.kernels.conv.conv_bwd_fused import ConvBackward1x1
from bnff.kernels.conv.conv_fused import ConvBwdDataReLUSums, ConvFwdBNReLU
from bnff.kernels.linear import LinearBackward, LinearForward
from bnff.kernels.loss import SoftmaxCrossEntropy
from bnff.kernels.pool import (AvgPoolBackward, AvgPoolForward, GlobalAvgPoolBackward,
                          GlobalAvgPoolForward, MaxPoolBackward, MaxPoolForward)
from bnff.kernels.elementwise.relu import ReLUBackward, ReLUForward
from bnff.suites import networks
from bnff.suites.graph import INPUT

CONV_STAGES = {"fwd": ("bnff.kernels.conv.conv_fwd", "ConvForward"),
               "bwd_data": ("bnff.kernels.conv.conv_bwd_data", "ConvBackwardData"),
               "bwd_weights": ("bnff.kernels.conv.conv_bwd_weights", "ConvBackwardWeights")}

COLUMNS = ["network", "batch", "image", "stage", "variant", "is_default", "descriptor", "count",
           "threads", "median_s", "min_s", "reps", "bytes", "flops", "gbps", "gflops", "bound",
           "pct_roofline", "triad_gbps", "fma_gflops", "sgemm_gflops", "pct_sgemm",
           "footprint_bytes", "max_rel_error", "reproducer"]
CONV_DIRECTIONS = ["conv_fwd", "conv_bwd_data", "conv_bwd_weights"]


class ValidationError(Exception):
    """A variant's output differs from the float64 reference by more than its tolerance."""


def conv_classes() -> dict:
    """{'fwd' | 'bwd_data' | 'bwd_weights': Stage class} for the conv modules present."""
    out = {}
    for key, (mod, cls) in CONV_STAGES.items():
        if importlib.util.find_spec(mod) is not None:
            out[key] = getattr(importlib.import_module(mod), cls)
    return out


HOOKED_1X1 = partial(ConvBackward1x1, hooks=True)  # bnff+'s one-pass form, gradient formed


def bn_relu_output(graph, name) -> bool:
    p = graph.by_name.get(name)
    return p is not None and p.op == "relu" and p.inputs[0] in graph.by_name and \
        graph.by_name[p.inputs[0]].op == "batchnorm"


def stages_of(graph, batch: int, image: int) -> list:
    """[(Stage, count)] of one training iteration, in first-use order, deduplicated."""
    shapes = graph.infer_shapes(batch, image)
    conv = conv_classes()
    found = {}

    def add(cls, shape):
        st = cls(shape)
        key = (cls, st.descriptor())
        if key in found:
            found[key][1] += 1
        else:
            found[key] = [st, 1]

    def act(name):
        n, c, h, w = shapes[name]
        return dict(mb=n, ic=c, ih=h, iw=w)

    for node in graph.nodes:
        x = node.inputs[0]
        if node.op == "conv2d":
            s = act(x)
            shape = dict(mb=s["mb"], ic=s["ic"], ih=s["ih"], iw=s["iw"], oc=node["out_channels"],
                         kh=node["kernel"], kw=node["kernel"], sh=node["stride"],
                         ph=node["padding"])
            for key, cls in conv.items():
                if key != "bwd_data" or x != INPUT:  # no gradient for the network input
                    add(cls, shape)
            if bn_relu_output(graph, x):  # bnff's forms of the convs of a BN site
                add(ConvFwdBNReLU, shape)
                add(ConvBwdDataReLUSums, shape)
            if node["kernel"] == 1 and node["padding"] == 0 and x != INPUT:
                add(HOOKED_1X1, shape)
        elif node.op == "batchnorm":
            if shapes[x][0] * shapes[x][2] * shapes[x][3] == 1:
                raise UserError(f"node {node.name}: training-mode batch norm needs more than one "
                                f"value per channel, got {shapes[x]}; use a larger --batch "
                                "or --image")
            for cls in (BNStats, BNNormalize, BNBackward,  # unfused, then the split schedules'
                        BNReLU, ReLUMaskSums, BNDx, BNReLUDx):
                add(cls, act(x))
        elif node.op == "relu":
            add(ReLUForward, act(x))
            add(ReLUBackward, act(x))
        elif node.op == "maxpool2d":
            shape = dict(act(x), kh=node["kernel"], sh=node["stride"], ph=node["padding"])
            add(MaxPoolForward, shape)
            add(MaxPoolBackward, shape)
        elif node.op == "avgpool2d":
            shape = dict(act(x), kh=node["kernel"], sh=node["stride"])
            add(AvgPoolForward, shape)
            add(AvgPoolBackward, shape)
        elif node.op == "global_avgpool":
            add(GlobalAvgPoolForward, act(x))
            add(GlobalAvgPoolBackward, act(x))
        elif node.op == "concat":
            n, _, h, w = shapes[node.name]
            shape = dict(mb=n, ics=tuple(shapes[i][1] for i in node.inputs), ih=h, iw=w)
            add(ConcatForward, shape)
            add(ConcatBackward, shape)
        elif node.op == "add":
            add(Add, act(x))
            bns = sum(graph.by_name[i].op == "batchnorm" for i in node.inputs if i != INPUT)
            if bns:  # a ResNet block end, written once by the split schedules
                add(BN2AddReLU if bns == 2 else BNAddReLU, act(x))
        elif node.op == "linear":
            shape = dict(mb=shapes[x][0], ic=shapes[x][1], oc=node["out_features"])
            add(LinearForward, shape)
            add(LinearBackward, shape)
    add(SoftmaxCrossEntropy, dict(mb=batch, oc=shapes[graph.output][1]))
    for name, users in graph.consumers().items():  # gradient sums at forks
        if name != INPUT and len(users) > 1 and len(shapes[name]) == 4:
            for _ in range(len(users) - 1):
                add(Add, act(name))
    return [(st, count) for st, count in found.values()]


def footprint(arrays: dict) -> int:
    return sum(a.nbytes for a in arrays.values())


def validate(stage, variants, inputs, outputs) -> dict:
    """{variant: max relative error}; raises ValidationError on the first one out of tolerance."""
    ref = stage.reference(inputs)
    errors = {}
    for v in variants:
        stage.run(v, inputs, outputs)
        for name, a in outputs.items():
            if not np.isfinite(a).all():
                raise ValidationError(f"{stage.name} variant {v} at {stage.descriptor()}: "
                                      f"output {name} holds NaN or Inf")
        errors[v] = stage.max_rel_error(outputs, ref)
        if not errors[v] <= stage.tolerance:
            raise ValidationError(f"{stage.name} variant {v} at {stage.descriptor()}: max relative "
                                  f"error {errors[v]:.3g} > tolerance {stage.tolerance:.3g}")
    return errors


def time_variants(stage, variants, inputs, outputs, reps: int, min_time: float) -> dict:
    """{variant: [seconds per call]}: one warm-up call each, then interleaved rounds, at least
    `reps` and until each variant has run `min_time` seconds (at most 50 * reps rounds)."""
    t_one = {}
    for v in variants:
        t0 = time.perf_counter()
        stage.run(v, inputs, outputs)
        t_one[v] = time.perf_counter() - t0
    rounds = int(min(50 * reps, max(reps, min_time / max(min(t_one.values()), 1e-7))))
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            t0 = time.perf_counter()
            stage.run(v, inputs, outputs)
            times[v].append(time.perf_counter() - t0)
    return times


def select(items: list, stage: str | None, variant: str | None, descriptor: str | None) -> list:
    """[(Stage, count, [variants])] after the --stage, --variant and --descriptor filters."""
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
        if variant is None:
            vs = list(st.variants)
        elif variant == "default":
            vs = [st.default]
        elif variant in st.variants:
            vs = [variant]
        elif wanted is not None and len(wanted) == 1:
            raise UserError(f"stage {stage} has no variant {variant!r}; variants: "
                            f"{', '.join(st.variants)} or default")
        else:
            continue
        out.append((st, count, vs))
    if not out:
        raise UserError("nothing to time: no stage matches "
                        f"--stage {stage} --variant {variant} --descriptor {descriptor}")
    return out


def reproducer(args, st, variant, threads) -> str:
    return (f"bnff micro {args.network} --batch {args.batch} "
            f"--image {args.image} --threads {threads} --stage {st.name} --variant {variant} "
            f"--descriptor {st.descriptor()}")


def row_for(args, st, count, variant, threads, times, roof, errors, fp) -> dict:
    cost = st.cost(variant)
    med = statistics.median(times)
    gbps, gflops = cost.bytes / med / 1e9, cost.flops / med / 1e9
    ridge = roof["fma_gflops"] / roof["triad_gbps"]
    bound = "compute" if cost.bytes == 0 or cost.flops / cost.bytes > ridge else "memory"
    pct = 100 * (gflops / roof["fma_gflops"] if bound == "compute" else gbps / roof["triad_gbps"])
    return {"network": args.network, "batch": args.batch, "image": args.image,
            "stage": st.name, "variant": variant, "is_default": variant == st.default,
            "descriptor": st.descriptor(), "count": count, "threads": threads,
            "median_s": med, "min_s": min(times), "reps": len(times), "bytes": cost.bytes,
            "flops": cost.flops, "gbps": gbps, "gflops": gflops, "bound": bound,
            "pct_roofline": pct, "triad_gbps": roof["triad_gbps"],
            "fma_gflops": roof["fma_gflops"], "sgemm_gflops": roof["sgemm_gflops"],
            "pct_sgemm": 100 * gflops / roof["sgemm_gflops"] if st.name in CONV_DIRECTIONS
            else None, "footprint_bytes": fp,
            "max_rel_error": errors[variant], "reproducer": reproducer(args, st, variant, threads)}


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
    for t, s, n, gflop, rate, sgemm, pct in conv_target(rows):
        print(f"threads {t}: {s} default ({n} shapes, {gflop:.1f} GFLOP per iteration): "
              f"{rate:.1f} GFLOP/s, {pct:.1f}% of sgemm ({sgemm:.1f} GFLOP/s), FLOP-weighted")


def add_parser(sub) -> None:
    p = sub.add_parser("micro", help="time every stage shape of a network's training iteration",
                       description="Time every distinct (stage, shape) of one training iteration "
                                   "of NET, convs included, each variant validated against the "
                                   "float64 reference first; roofline figures are measured in "
                                   "the same run. Run it with nothing else busy on the machine. "
                                   "Example: bnff micro resnet50 --batch 16 --image 224 --threads 1,2 "
                                   "--variant default --csv micro.csv")
    add_network_args(p)
    p.add_argument("--threads", type=thread_list, default=None,
                   help="thread counts, e.g. 1,2 or 1-4 or all (default all)")
    p.add_argument("--stage", help="only these stages, comma-separated (e.g. bn_stats,conv_fwd)")
    p.add_argument("--variant", help="only this variant, or `default` (default: all variants)")
    p.add_argument("--descriptor", help="only this shape, e.g. mb16ic256ih56iw56")
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
                   help="skip the (stage, shape)s the --csv file already holds for this machine "
                        "and commit (after an interrupted run)")
    p.set_defaults(func=run)


def _row_key(r) -> tuple:
    return (r["network"], r["batch"], r["image"], r["stage"], r["descriptor"], r["variant"],
            r["threads"])


def micro(args, progress=True, emit=None, held=()) -> list:
    """The rows of one `bnff micro` run (raises UserError, ValidationError). emit(rows) gets the
    rows of each (stage, shape) as soon as they are measured; a (stage, shape) whose every
    (variant, threads) row is in `held` (_row_key) is skipped."""
    threads = args.threads or thread_list("all")
    mib = args.array_mib if args.array_mib is not None else roofline.default_array_mib()
    graph = networks.load(args.network)
    work = select(stages_of(graph, args.batch, args.image), args.stage, args.variant,
                  args.descriptor)
    check_memory(max(memory_need(st, vs) for st, _, vs in work) + 3 * int(mib * 2**20),
                 f"{args.network} at batch {args.batch}, image {args.image}")
    machine = machine_info()
    keys = lambda st, vs: {(args.network, args.batch, args.image, st.name, st.descriptor(), v, t)
                           for v in vs for t in threads}
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
            inputs, outputs = st.make_inputs(rng), st.allocate_outputs()
            numba.set_num_threads(max(threads))
            errors = validate(st, variants, inputs, outputs)
            fp = footprint(inputs) + footprint(outputs)
            rows = []
            for t in threads:
                numba.set_num_threads(t)
                times = time_variants(st, variants, inputs, outputs, args.reps, args.min_time)
                rows += [{**row_for(args, st, count, v, t, times[v], roofs[t], errors, fp),
                          **machine} for v in variants]
            out += rows
            if emit:
                emit(rows)
            bar.update()
            del inputs, outputs
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return out


def memory_need(st, variants) -> int:
    """Bytes a stage's validation holds, estimated before allocating from the bytes its
    variants declare (each tensor streamed once: its float32 inputs and outputs) and the
    float64 reference (twice that)."""
    return 3 * max(st.cost(v).bytes for v in variants)


def run(args) -> int:
    machine = machine_info()
    columns = COLUMNS + [k for k in machine if k not in COLUMNS]
    log = CsvLog(args.csv, columns) if args.csv else None
    if args.resume and log is None:
        raise UserError("--resume needs --csv: it skips what that file already holds")
    held = {_row_key(r) for r in log.read() if same_machine(r, machine)} if args.resume else ()
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
    if log:
        print(f"wrote {appended} rows to {args.csv}")
    return 0
