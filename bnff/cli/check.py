"""`bnff check`: one seeded training iteration of a network under a schedule, its loss, and
its largest gradient difference against the float64 reference."""
from __future__ import annotations

import time

import numpy as np
from tabulate import tabulate

from bnff.cli.args import UserError, add_network_args, nonneg_int
from bnff.suites.problem import make_batch, make_params
from bnff.lowering.executor import train_step
from bnff.lowering.reference_step import train_step as reference_step
from bnff.lowering.schedules import FLOAT32, PYTORCH, SCHEDULES, TORCH_MISSING, torch_available
from bnff.measure.measurement import max_rel_grad_diff
from bnff.suites import networks


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check", help="run one training iteration and compare it with the reference",
        description="Run one training iteration (forward, softmax cross-entropy, backward) "
                    "with seeded input, labels and parameters; print the loss and, for a "
                    "schedule other than `reference`, the largest relative gradient difference "
                    "against the float64 reference. Example: "
                    "bnff check densenet121 --batch 2 --image 64")
    add_network_args(p, batch=2, image=64)
    p.add_argument("--schedule", default="reference", choices=["reference"] + FLOAT32 + [PYTORCH.name],
                   help="schedule to run (default reference)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed (default 0)")
    p.add_argument("--dump", metavar="FILE.npz",
                   help="write input, labels, loss, param:<name> and grad:<name> to an .npz")
    p.set_defaults(func=run)


def run(args) -> int:
    graph = networks.load(args.network)
    if args.dump and not args.dump.endswith(".npz"):
        raise UserError(f"--dump needs a file name ending in .npz, got {args.dump!r}")
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
    row = [graph.name, args.schedule, args.batch, args.image, args.seed, f"{loss:.6f}",
           f"{seconds:.3f}"]
    headers = ["network", "schedule", "batch", "image", "seed", "loss", "seconds"]
    if args.schedule != "reference":
        ref_loss, ref_grads = reference_step(graph, params, x, labels)
        diff, where = max_rel_grad_diff(grads, ref_grads)
        row += [f"{abs(loss - ref_loss) / abs(ref_loss):.2e}", f"{diff:.2e} ({where})"]
        headers += ["loss rel diff", "max grad rel diff"]
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
    return 0
