"""`bnff check`: one seeded training iteration of a network under a schedule, its loss, and
its gradients against the float64 reference, judged by how far an independent float32
computation of the same gradients (the `baseline` schedule) is from that reference.

Why not a fixed tolerance: at random initialization some gradients are ill-conditioned for
every float32 computation. In ResNet-50 at batch 4, 64x64, seed 7, three pre-activations of
the last block end lie within 1e-4 standard deviations of zero, so which side of the ReLU each
lands on is decided by rounding anywhere upstream: multiplying the input by (1 + 2^-23)
moves `baseline`'s layer4.2 gradients from 8e-5 to 1.6e-2 off float64 (`bnff`'s from 6.7e-3
to 1.4e-3). A parameter is therefore flagged only when its error exceeds FACTOR times the
largest error of `baseline` over the input and the input multiplied by 1 +- 2^-23 (the float32
noise of that gradient; FLOOR when that is smaller), and relative errors are taken against
max(||ref||, ZERO * rms of all gradients * sqrt(size)), so a gradient that is zero in exact
arithmetic is judged by its absolute size.
"""
from __future__ import annotations

import time

import numpy as np
from tabulate import tabulate

from bnff.cli.args import (RunFailed, UserError, add_network_args, check_memory, nonneg_int,
                           writable_file)
from bnff.lowering.executor import Executor, train_step
from bnff.lowering.reference_step import train_step as reference_step
from bnff.lowering.schedules import FLOAT32, PYTORCH, SCHEDULES, TORCH_MISSING, torch_available
from bnff.measure.measurement import check_finite, rel_errors
from bnff.suites import networks
from bnff.suites.problem import make_batch, make_params

FACTOR = 10.0  # allowed error over the float32 noise of the same gradient
FLOOR = 1e-5  # float32 noise assumed at least this (a well-conditioned gradient: ~1e-7)
NOISE_INPUTS = (1.0, 1.0 + 2.0 ** -23, 1.0 - 2.0 ** -24)  # input scalings of the baseline runs


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check", help="run one training iteration and compare it with the reference",
        description="Run one training iteration (forward, softmax cross-entropy, backward) "
                    "with seeded input, labels and parameters; print the loss and, for a "
                    "schedule other than `reference`, each gradient's relative difference "
                    "from the float64 reference against that of `baseline` (float32) on the "
                    "same input and on the input times 1 +- 2^-23; exit 1 if a gradient is "
                    f"more than {FACTOR:g}x further off than that. Example: "
                    "bnff check densenet121 --batch 2 --image 64 --schedule bnff")
    add_network_args(p, batch=2, image=64)
    p.add_argument("--schedule", default="reference", choices=["reference"] + FLOAT32 + [PYTORCH.name],
                   help="schedule to run (default reference)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed (default 0)")
    p.add_argument("--dump", metavar="FILE.npz",
                   help="write input, labels, loss, param:<name> and grad:<name> to an .npz")
    p.set_defaults(func=run)


def judge(errors: dict, noise: dict) -> list:
    """[(ratio, parameter, error, noise)] of the parameters whose error exceeds FACTOR times
    max(noise, FLOOR), worst first."""
    out = [(e / max(noise[k], FLOOR), k, e, noise[k]) for k, e in errors.items()]
    return sorted((t for t in out if t[0] > FACTOR), reverse=True)


def float32_noise(graph, params, x, labels, ref_at) -> dict:
    """{parameter: largest baseline error against the reference over NOISE_INPUTS}."""
    noise = {}
    for s in NOISE_INPUTS:
        xs = x if s == 1.0 else x * np.float32(s)
        ref_loss, ref = ref_at(xs)
        _, grads = train_step(graph, params, xs, labels, SCHEDULES["baseline"])
        for k, e in rel_errors(grads, ref).items():
            noise[k] = max(noise.get(k, 0.0), e)
    return noise


def run(args) -> int:
    graph = networks.load(args.network)
    if args.dump:
        if not args.dump.endswith(".npz"):
            raise UserError(f"--dump needs a file name ending in .npz, got {args.dump!r}")
        writable_file(args.dump, "--dump")
    need = Executor(graph, SCHEDULES["baseline"], args.batch, args.image).peak_bytes()
    check_memory(3 * need, f"{graph.name} at batch {args.batch}, image {args.image} (a float32 "
                           "schedule and the float64 reference)")
    params = make_params(graph, args.seed)
    x, labels = make_batch(graph, args.batch, args.image, args.seed)
    t = time.perf_counter()
    if args.schedule == "reference":
        loss, grads = reference_step(graph, params, x, labels)
    elif args.schedule == PYTORCH.name:
        if not torch_available():
            raise UserError(TORCH_MISSING)
        from bnff.torchref.model import train_step as torch_step
        loss, grads = torch_step(graph, params, x, labels)
    else:
        loss, grads = train_step(graph, params, x, labels, SCHEDULES[args.schedule])
    seconds = time.perf_counter() - t
    check_finite(loss, grads, f"{args.schedule} on {graph.name}")
    row = [graph.name, args.schedule, args.batch, args.image, args.seed, f"{loss:.6f}",
           f"{seconds:.3f}"]
    headers = ["network", "schedule", "batch", "image", "seed", "loss", "seconds"]
    flagged = []
    if args.schedule != "reference":
        refs = {}

        def ref_at(xs):
            key = xs.tobytes()
            if key not in refs:
                refs[key] = reference_step(graph, params, xs, labels)
            return refs[key]

        ref_loss, ref_grads = ref_at(x)
        errors = rel_errors(grads, ref_grads)
        noise = float32_noise(graph, params, x, labels, ref_at)
        worst = max(errors, key=errors.get)
        ratio = max(errors, key=lambda k: errors[k] / max(noise[k], FLOOR))
        flagged = judge(errors, noise)
        row += [f"{abs(loss - ref_loss) / abs(ref_loss):.2e}",
                f"{errors[worst]:.2e} ({worst})",
                f"{errors[ratio] / max(noise[ratio], FLOOR):.1f}x ({ratio})"]
        headers += ["loss rel diff", "max grad rel diff", "worst vs float32 noise"]
    print(tabulate([row], headers=headers, disable_numparse=True))
    if args.dump:
        dtype = next(iter(grads.values())).dtype
        arrays = {"input": x, "labels": labels, "loss": np.array(loss, dtype=dtype)}
        arrays.update({f"param:{k}": v.astype(dtype) for k, v in params.items()})
        arrays.update({f"grad:{k}": np.asarray(v, dtype) for k, v in grads.items()})
        try:
            np.savez(args.dump, **arrays)
        except OSError as e:
            raise UserError(f"cannot write {args.dump}: {e.strerror}") from None
        print(f"wrote {args.dump} ({len(arrays)} arrays)")
    if flagged:
        print(tabulate([[k, f"{e:.2e}", f"{n:.2e}", f"{r:.1f}x"] for r, k, e, n in flagged[:10]],
                       headers=["parameter", "rel error", "baseline's (float32 noise)",
                                "ratio"], disable_numparse=True))
        r, k, e, n = flagged[0]
        raise RunFailed(f"{args.schedule}: {len(flagged)} gradient(s) more than {FACTOR:g}x "
                        f"further from float64 than float32 noise; worst {k}: {e:.2e} against "
                        f"{max(n, FLOOR):.2e}")
    return 0
