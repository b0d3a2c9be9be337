"""The contract every stage module in `kernels/` follows.

A *stage* is one kernel call of a training iteration (conv forward, BN statistics, ...).
A stage module holds a float64 reference and numbered variants of one stage, and one
`Stage` subclass that the tests and `bnff micro` drive without knowing the op:

    st = ConvForward(dict(mb=16, ic=64, ih=56, iw=56, oc=64, kh=3, kw=3, sh=1, ph=1))
    ins = st.make_inputs(np.random.default_rng(0))   # float32 arrays, NHWC
    out = st.allocate_outputs()                     # preallocated, reused across calls
    st.run("direct", ins, out)                      # the timed call
    ref = st.reference(ins)                         # float64, same names as `out`
    err = st.max_rel_error(out, ref)

Activations are NHWC float32 (see the README for why), per-channel vectors are [C].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = 4  # bytes per float32


@dataclass(frozen=True)
class Cost:
    """What one call of a variant does: FLOPs, and bytes it reads and writes in main memory
    under the model that every tensor argument streams through DRAM once per pass."""

    flops: int
    bytes_read: int
    bytes_written: int

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes_read + other.bytes_read,
                    self.bytes_written + other.bytes_written)


class Stage:
    """One stage at one shape. Subclasses set `name`, `variants` (name -> callable taking
    the input and output arrays), `default`, and implement the methods below."""

    name: str = ""
    variants: dict = {}
    default: str = ""
    tolerance: float = 1e-4  # max relative error against the float64 reference

    def __init__(self, shape: dict):
        self.shape = dict(shape)

    def descriptor(self) -> str:
        """benchdnn-style shape string, e.g. mb16ic128ih56oc32kh3ph1."""
        return "".join(f"{k}{v}" for k, v in self.shape.items())

    def make_inputs(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def allocate_outputs(self) -> dict:
        raise NotImplementedError

    def run(self, variant: str, inputs: dict, outputs: dict) -> None:
        raise NotImplementedError

    def reference(self, inputs: dict) -> dict:
        raise NotImplementedError

    def cost(self, variant: str) -> Cost:
        raise NotImplementedError

    def max_rel_error(self, outputs: dict, ref: dict) -> float:
        """Largest |out - ref| over all outputs, relative to each output's max |ref|."""
        worst = 0.0
        for k, r in ref.items():
            r = np.asarray(r, dtype=np.float64)
            o = np.asarray(outputs[k], dtype=np.float64)
            scale = max(float(np.max(np.abs(r))), 1e-30) if r.size else 1.0
            worst = max(worst, float(np.max(np.abs(o - r))) / scale if r.size else 0.0)
        return worst
