"""Schedules by name, each resolved once, at the command line, into the one frozen value that
describes it completely; the lowering (bnff/lowering/dispatch.py, lower*.py) and the executor
receive that value, never a name. `reference`, the float64 NumPy iteration every schedule is
checked against (bnff/lowering/reference_step.py), is not lowered and has no value here.
`pytorch` is the same graph as a PyTorch module (bnff/torchref/), there when the optional
extra `torch` is installed: its value only names it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Every flag that makes a float32 schedule what it is (bnff/lowering/lower.py and
    lower_bnff.py say what each does at a BN site)."""

    name: str
    bn: str                        # "caffe", "framework" or "split" (fission)
    fuse_forward: bool = False     # split only: sub-BN1 into conv epilogues, sub-BN2 into
                                   # prologues
    fuse_backward: bool = False    # split only: mask and sums into backward-data epilogues,
                                   # dx into the producing conv's backward prologues
    blocks: bool = False           # split only: concatenations as block buffers (lower_blocks)
    conv_data_native: bool = False  # backward-data adds into a started gradient itself
                                    # (no temporary and add pass)


SCHEDULES = {s.name: s for s in (
    Schedule("caffe", bn="caffe"),
    Schedule("baseline", bn="framework"),
    Schedule("fission", bn="split"),
    Schedule("bnff-fwd", bn="split", fuse_forward=True),
    Schedule("bnff", bn="split", fuse_forward=True, fuse_backward=True),
    Schedule("bnff+", bn="split", fuse_forward=True, fuse_backward=True, blocks=True,
             conv_data_native=True),
)}
FLOAT32 = list(SCHEDULES)


class UnknownSchedule(ValueError):
    """A schedule name that is not in SCHEDULES."""


def resolve(name: str) -> Schedule:
    """The Schedule called `name` (UnknownSchedule, with the known names, if none is)."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise UnknownSchedule(f"unknown schedule {name!r}; known: {', '.join(FLOAT32)}") from None


# Largest relative gradient difference (||g - ref|| / ||ref||, worst parameter) accepted
# between two float32 schedules at benchmark sizes. It is loose because deep networks at a
# random initialization amplify rounding: in float64, perturbing DenseNet-121's parameters
# by 1e-7 (relative) at batch 2, 64x64 moved a gradient by 2.8e-3, and `baseline` differs
# from the float64 reference by up to 1.9e-2 (median 4e-3) at batch 8, 64x64. A schedule
# that drops or doubles a term is off by O(1). The tests check every schedule against the
# reference tightly on shallower networks, where rounding is not amplified.
GRAD_TOLERANCE = 5e-2

@dataclass(frozen=True)
class External:
    """A schedule that is not lowered: the same graph run by a framework (bnff/torchref/)."""

    name: str


PYTORCH = External("pytorch")
TORCH_MISSING = ("PyTorch is not installed: `pip install '.[torch]'` (or `make` without "
                 "BNFF_NO_TORCH=1) adds the pytorch schedule")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None
