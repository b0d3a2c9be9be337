"""A plan: the ordered kernel calls (steps) of one training iteration and the tensors they
read and write, with each tensor's lifetime known so buffers are reused across the iteration
and peak memory is computed before anything is allocated.

A step's arguments are constants or references to tensors: `R(name)` is read, `W(name)` is
written whole, `RW(name)` is read and written (an accumulation or an in-place update). A tensor
declared `inplace_of` another shares its buffer (ReLU in place); one declared `slice_of`
(base, offset) is the channel slice base[..., offset:offset + C] of another (DenseNet's
block buffer and its gradient, written piece by piece). Persistent tensors
(parameters, their gradients, the input, labels and loss) live for the whole iteration; every
other tensor lives from its first step to its last.

A step that runs one registered stage's variant exactly, at the cost that stage declares,
records it (`StageCall`: stage name, shape descriptor, variant), so `bnff micro` times the
distinct steps of a plan from the registry alone (bnff/kernels/registry.py). A conv with
hooks, in any direction and in the one-pass 1x1 backward, records its conv_hooked stage
(bnff/kernels/conv/conv_hooked.py; with identity hooks only, the plain conv stage; adding into
its output, the _acc form); steps that compose kernels otherwise (the per-channel coefficient
merges, fission's statistics, the residual add's backward) record none, and micro counts
them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from bnff.engine.vec import aligned_empty
from bnff.kernels.stage import Cost


@dataclass(frozen=True)
class Ref:
    name: str
    mode: str  # "r", "w" or "rw"


def R(name):
    return Ref(name, "r")


def W(name):
    return Ref(name, "w")


def RW(name):
    return Ref(name, "rw")


@dataclass(frozen=True)
class StageCall:
    """The registered stage a step runs: registry.make(stage, descriptor).run(variant, ...)
    does the step's work, and its cost(variant) is the step's cost."""
    stage: str
    descriptor: str
    variant: str


@dataclass
class TensorSpec:
    shape: tuple
    dtype: type = np.float32
    persistent: bool = False
    inplace_of: str | None = None
    slice_of: tuple | None = None  # (tensor, channel offset)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Step:
    name: str      # node name and what the call does, e.g. "block1.layer1.conv1 fwd"
    kind: str      # conv, bn, relu, concat, pool or other
    phase: str     # forward or backward
    fn: object     # the kernel: fn(*args) with refs replaced by arrays
    args: tuple
    cost: Cost
    stage: StageCall | None = None

    def refs(self, mode=None):
        return [a.name for a in self.args if isinstance(a, Ref) and (mode is None or mode in a.mode)]


@dataclass
class Plan:
    tensors: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)

    def tensor(self, name, shape, dtype=np.float32, persistent=False, inplace_of=None,
               slice_of=None) -> str:
        if name in self.tensors:
            raise ValueError(f"tensor {name} declared twice")
        if slice_of is not None:
            base = self.tensors[slice_of[0]]
            if base.shape[:-1] != tuple(shape[:-1]) or slice_of[1] + shape[-1] > base.shape[-1]:
                raise ValueError(f"tensor {name} {shape} is no channel slice of {slice_of}")
        self.tensors[name] = TensorSpec(tuple(shape), dtype, persistent, inplace_of, slice_of)
        return name

    def step(self, name, kind, phase, fn, args, cost, stage=None) -> None:
        for ref in (a for a in args if isinstance(a, Ref)):
            if ref.name not in self.tensors:
                raise ValueError(f"step {name}: tensor {ref.name} is not declared")
        self.steps.append(Step(name, kind, phase, fn, tuple(args), cost, stage))

    # --- buffers and lifetimes ----------------------------------------------------------
    def base(self, name) -> str:
        t = self.tensors[name]
        while t.inplace_of is not None or t.slice_of is not None:
            name = t.inplace_of or t.slice_of[0]
            t = self.tensors[name]
        return name

    def strided(self, name) -> bool:
        """Whether the tensor is (a view of) a channel slice: no flat view of it exists."""
        t = self.tensors[name]
        if t.inplace_of is not None:
            return self.strided(t.inplace_of)
        if t.slice_of is not None:
            of = t.slice_of[0]
            return t.shape[-1] != self.tensors[of].shape[-1] or self.strided(of)
        return False

    def owns_buffer(self, t) -> bool:
        return t.inplace_of is None and t.slice_of is None

    def lifetimes(self) -> dict:
        """Base tensor -> (first step, last step) for every transient buffer."""
        life = {}
        for i, s in enumerate(self.steps):
            for name in s.refs():
                b = self.base(name)
                if not self.tensors[b].persistent:
                    first, _ = life.get(b, (i, i))
                    life[b] = (first, i)
        for b, (first, _) in life.items():
            writer = self.steps[first]
            if not any(a.mode == "w" and self.base(a.name) == b
                       for a in writer.args if isinstance(a, Ref)):
                raise ValueError(f"{b} is first used by {writer.name}, which does not write it whole")
        return life

    def persistent_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if t.persistent and self.owns_buffer(t))

    def peak_bytes(self) -> int:
        """The most tensor memory live at once: persistent tensors plus live transients."""
        delta = np.zeros(len(self.steps) + 1, dtype=np.int64)
        for b, (first, last) in self.lifetimes().items():
            delta[first] += self.tensors[b].nbytes
            delta[last + 1] -= self.tensors[b].nbytes
        return self.persistent_bytes() + int(np.cumsum(delta).max(initial=0))

    def allocate(self) -> dict:
        """Name -> array for every tensor; a transient buffer is reused (best fit) once its
        last step has run. Allocated once, then reused by every iteration. Every buffer starts
        64-byte aligned (vec.aligned_empty), so rows of a multiple of 64 bytes are aligned for
        non-temporal vector stores."""
        arrays, flats, free = {}, {}, []
        starts, ends = {}, {}
        for b, (first, last) in self.lifetimes().items():
            starts.setdefault(first, []).append(b)
            ends.setdefault(last, []).append(b)
        for name, t in self.tensors.items():
            if t.persistent and self.owns_buffer(t):
                arrays[name] = aligned_empty(t.shape, t.dtype)
                arrays[name][...] = 0
        for i in range(len(self.steps)):
            for b in starts.get(i, ()):
                t = self.tensors[b]
                fits = [f for f in free if f.nbytes >= t.nbytes]
                if fits:
                    flat = min(fits, key=lambda f: f.nbytes)
                    free = [f for f in free if f is not flat]
                else:
                    flat = aligned_empty(t.nbytes, np.uint8)
                flats[b] = flat
                arrays[b] = flat[:t.nbytes].view(t.dtype).reshape(t.shape)
            for b in ends.get(i, ()):
                free.append(flats[b])
        for name, t in self.tensors.items():  # views, declared after what they view
            if t.inplace_of is not None and self.base(name) in arrays:
                arrays[name] = arrays[t.inplace_of].view()
                arrays[name].shape = t.shape  # a view, never a copy
            elif t.slice_of is not None and self.base(name) in arrays:
                of, off = t.slice_of
                arrays[name] = arrays[of][..., off:off + t.shape[-1]]
        return arrays

    def bind(self, arrays) -> list:
        """Zero-argument callables, one per step, with every reference resolved."""
        calls = []
        for s in self.steps:
            args = tuple(arrays[a.name] if isinstance(a, Ref) else a for a in s.args)
            calls.append(lambda fn=s.fn, args=args: fn(*args))
        return calls

    def run(self, calls, times=None) -> None:
        """Runs the bound steps; with `times` (a list), appends each step's seconds."""
        if times is None:
            for c in calls:
                c()
            return
        clock = time.perf_counter
        for c in calls:
            t = clock()
            c()
            times.append(clock() - t)

    def cost(self) -> Cost:
        total = Cost(0, 0, 0)
        for s in self.steps:
            total = total + s.cost
        return total


def distinct_stage_calls(plans) -> list:
    """[(StageCall, count)] over the steps of `plans` that run a registered stage, in first
    use order, deduplicated by (stage, descriptor, variant); count is the most times one plan
    runs it (the plans being alternative schedules of one iteration, not a sequence)."""
    counts = {}
    for plan in plans:
        here = {}
        for s in plan.steps:
            if s.stage is not None:
                here[s.stage] = here.get(s.stage, 0) + 1
        for k, n in here.items():
            counts[k] = max(counts.get(k, 0), n)
    return list(counts.items())


def unstaged(plan) -> list:
    """The steps of a plan that run no registered stage (bnff micro cannot time them alone)."""
    return [s for s in plan.steps if s.stage is None]

