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

Every subclass that sets `name` registers itself here on definition (`REGISTRY`, read through
bnff/kernels/registry.py, which imports every stage module). A stage's shape is its
descriptor: `descriptor()` formats it, `from_descriptor()` parses it back, so a descriptor
alone rebuilds the stage (`bnff micro --descriptor D`). A stage whose math uses BN's eps
(class attribute `eps` not None) carries it as the shape key `eps`, last, printed with repr
so it parses back exactly: mb16ic64ih56iw56eps1e-05. `examples` are small descriptors the
tests validate every variant at.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

F32 = 4  # bytes per float32

REGISTRY: dict = {}  # stage name -> Stage subclass, filled as stage modules are imported

_TOKEN = re.compile(r"(eps)([0-9.]+(?:e[-+]?[0-9]+)?)|([a-z]+)([0-9]+)")


class DescriptorError(ValueError):
    """A shape descriptor that does not parse, or does not fit the stage."""


def parse_descriptor(text: str) -> dict:
    """'mb2ic8ih5iw5eps1e-05' -> {'mb': 2, 'ic': 8, 'ih': 5, 'iw': 5, 'eps': 1e-05}."""
    shape, pos = {}, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise DescriptorError(f"cannot parse descriptor {text!r} at {text[pos:]!r}")
        key, value = (m[1], float(m[2])) if m[1] else (m[3], int(m[4]))
        if key in shape:
            raise DescriptorError(f"descriptor {text!r} gives {key} twice")
        shape[key] = value
        pos = m.end()
    return shape


def format_descriptor(shape: dict) -> str:
    return "".join(f"{k}{v!r}" if k == "eps" else f"{k}{v}" for k, v in shape.items())


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
    eps: float | None = None  # BN's eps, for stages whose math uses it (then a shape key)
    examples: tuple = ()      # small descriptors every variant is validated at (tests)
    # outputs a variant adds into, each -> the input it starts from (validation and micro set
    # it from that input; every other output starts as NaN, so an unwritten element shows)
    accumulates: dict = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        name = cls.__dict__.get("name")
        if name:
            if name in REGISTRY and REGISTRY[name] is not cls:
                raise TypeError(f"stage {name} defined twice: {REGISTRY[name]} and {cls}")
            REGISTRY[name] = cls

    def __init__(self, shape: dict):
        self.shape = dict(shape)
        if type(self).eps is not None:
            self.shape["eps"] = float(self.shape.pop("eps", type(self).eps))  # kept last
            self.eps = self.shape["eps"]

    def descriptor(self) -> str:
        """benchdnn-style shape string, e.g. mb16ic128ih56iw56oc32kh3kw3sh1ph1."""
        return format_descriptor(self.shape)

    @classmethod
    def from_descriptor(cls, text: str) -> "Stage":
        """The stage at the shape `text` describes (DescriptorError if a key it needs is
        missing; keys it does not use are kept, as stages declare no key list)."""
        shape = parse_descriptor(text)
        try:
            st = cls(shape)
            st.cost(st.default)  # every key the stage needs is there
        except (KeyError, ValueError, TypeError) as e:
            raise DescriptorError(f"descriptor {text!r} does not fit stage {cls.name}: {e}") \
                from None
        return st

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
        """Largest |out - ref| over all outputs, relative to each output's max |ref|; inf when
        an output holds a NaN or Inf (an element left unwritten in a NaN-filled output; a
        plain max() would skip the NaN and pass it)."""
        worst = 0.0
        for k, r in ref.items():
            r = np.asarray(r, dtype=np.float64)
            o = np.asarray(outputs[k], dtype=np.float64)
            if not r.size:
                continue
            if not np.isfinite(o).all():
                return float("inf")
            scale = max(float(np.max(np.abs(r))), 1e-30)
            worst = max(worst, float(np.max(np.abs(o - r))) / scale)
        return worst


class ActivationStage(Stage):
    """A stage over NHWC activations [mb, ih, iw, ic] (shape keys mb, ic, ih, iw), which its
    kernels view as [M, C] rows, M = mb*ih*iw."""

    examples = ("mb2ic256ih7iw7", "mb1ic64ih14iw14", "mb2ic3ih5iw3")

    def _size(self):
        """(M, C) of the [M, C] view."""
        s = self.shape
        return s["mb"] * s["ih"] * s["iw"], s["ic"]

    def _act(self):
        """The NHWC shape."""
        s = self.shape
        return (s["mb"], s["ih"], s["iw"], s["ic"])
