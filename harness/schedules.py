"""Schedules by name. A schedule is a callable (graph, params, input, labels) -> (loss, grads)
that runs one training iteration; `reference` is the float64 NumPy one, which the float32
Numba schedules are checked against."""
from __future__ import annotations

from harness.reference_step import train_step as reference

SCHEDULES = {
    "reference": reference,
}
