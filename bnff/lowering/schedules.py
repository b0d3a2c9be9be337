"""Schedules by name. `reference` is the float64 NumPy iteration every other schedule is
checked against; the float32 schedules are lowered to Numba kernel calls (`bnff/lowering/lower.py`
says what each does); `pytorch` is the same graph as a PyTorch module (bnff/torchref/), there
when the optional extra `torch` is installed."""
from __future__ import annotations

import importlib.util
from functools import partial

from bnff.lowering.executor import train_step
from bnff.lowering.lower import Options
from bnff.lowering.reference_step import train_step as reference

OPTIONS = {
    "caffe": Options(bn="caffe"),
    "baseline": Options(bn="framework"),
    "fission": Options(bn="split"),
    "bnff-fwd": Options(bn="split", fuse_forward=True),
    "bnff": Options(bn="split", fuse_forward=True, fuse_backward=True),
    "bnff+": Options(bn="split", fuse_forward=True, fuse_backward=True, blocks=True),
}
FLOAT32 = list(OPTIONS)

# Largest relative gradient difference (||g - ref|| / ||ref||, worst parameter) accepted
# between two float32 schedules at benchmark sizes. It is loose because deep networks at a
# random initialization amplify rounding: in float64, perturbing DenseNet-121's parameters
# by 1e-7 (relative) at batch 2, 64x64 moved a gradient by 2.8e-3, and `baseline` differs
# from the float64 reference by up to 1.9e-2 (median 4e-3) at batch 8, 64x64. A schedule
# that drops or doubles a term is off by O(1). The tests check every schedule against the
# reference tightly on shallower networks, where rounding is not amplified.
GRAD_TOLERANCE = 5e-2

PYTORCH = "pytorch"
TORCH_MISSING = ("PyTorch is not installed: `pip install '.[torch]'` (or `make` without "
                 "BNFF_NO_TORCH=1) adds the pytorch schedule")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def pytorch(graph, params, x, labels):
    """(loss, grads) of one float32 PyTorch iteration (in this process)."""
    if not torch_available():
        from bnff.cli.args import UserError
        raise UserError(TORCH_MISSING)
    from bnff.torchref.model import train_step as torch_step
    return torch_step(graph, params, x, labels)


SCHEDULES = {"reference": reference, **{s: partial(train_step, schedule=s) for s in OPTIONS},
             PYTORCH: pytorch}
