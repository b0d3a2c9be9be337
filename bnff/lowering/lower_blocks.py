"""Lowering of `bnff+`: bnff, and DenseNet's concatenations as one block buffer.

A block is a concat F of features f0 .. fk and the concats of its prefixes f0 .. fj, read
only by BNs (a DenseNet dense block: each layer's BN1 reads the prefix, the transition's BN
reads F). One buffer holds F; every prefix is its channel slice [0, C_j), and every feature
a conv produces for the block alone is written by that conv straight into its slice: no
concat copies. A feature made elsewhere (the block input, from a pool) is copied in once.

Statistics are made once per feature: in the epilogue of the conv writing it (per-task
sums, merged into the block's mean and var vectors), or in one pass over a copied feature.
Every BN over a prefix takes its mean and var from those vectors (its own gamma and beta
make its a and b): no statistics pass over a concatenation.

Backward, the gradient of the block is one buffer too: the BN reading F writes it whole,
each BN over a prefix adds its dx into the prefix slice, each conv reads the gradient of
its feature from its slice, and a copied feature's gradient is copied out once.

Further fusion, in every network (the schedule's conv_data_native): conv backward-data adds
into a gradient that is already started itself (no temporary and add pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnff.kernels.conv.conv_common import CHANNEL_SUMS
from bnff.lowering import ops
from bnff.lowering import ops_bnff as fo
from bnff.lowering.lower_bnff import SplitLowering
from bnff.lowering.plan import RW, R, W
from bnff.suites.graph import INPUT


@dataclass
class Block:
    name: str                                      # the concat of all features: the buffer
    offsets: dict = field(default_factory=dict)    # slice tensor -> channel offset
    written: list = field(default_factory=list)    # features their convs write in place
    copied: dict = field(default_factory=dict)     # feature -> its slice tensor in the buffer
    grad_started: bool = False


class BlockLowering(SplitLowering):
    def __init__(self, *args):
        super().__init__(*args)
        self.blocks, self.member, self.copied = {}, {}, {}  # slice tensor / copied feature -> Block
        concats = [n for n in self.g.nodes if n.op == "concat"]
        for f in sorted(concats, key=lambda n: -len(n.inputs)):
            if f.name not in self.member:
                self.find_block(f, concats)
        for s in self.sites.values():  # a BN reading a copied feature reads its slice
            if s.x in self.copied:
                s.x = self.copied[s.x].copied[s.x]

    def find_block(self, f, concats):
        ins = f.inputs
        if len(set(ins)) != len(ins) or INPUT in ins or \
                any(i in self.member or i in self.copied for i in ins):
            return
        prefixes = [c for c in concats if c is not f and c.inputs == ins[:len(c.inputs)]]
        views = prefixes + [f]
        if not all(c.op == "batchnorm" for v in views for c in self.consumers[v.name]):
            return
        names = {v.name for v in views}
        b = Block(f.name, {v.name: 0 for v in views})
        off = 0
        for t in ins:
            readers = self.consumers[t]
            if self.g.by_name[t].op == "conv2d" and all(c.name in names for c in readers):
                b.written.append(t)
                b.offsets[t] = off
            elif all(c.name in names or c.op == "batchnorm" for c in readers):
                b.copied[t] = f"{f.name}[{t}]"
                b.offsets[b.copied[t]] = off
            else:
                return
            off += self.shapes[t][3]
        self.blocks[f.name] = b
        self.shapes.update({s: self.shapes[t] for t, s in b.copied.items()})
        self.member.update({t: b for t in b.offsets})
        self.copied.update({t: b for t in b.copied})

    # --- tensors -------------------------------------------------------------------------
    def declare_block(self, b):
        """The buffer, its slices, and the block's mean and var vectors (with slices)."""
        if b.name in self.plan.tensors:
            return
        p, c = self.plan, self.shapes[b.name][3]
        p.tensor(b.name, self.shapes[b.name])
        for t, off in b.offsets.items():
            if t != b.name:
                p.tensor(t, self.shapes[t], slice_of=(b.name, off))
        for v in ("mean", "var"):
            p.tensor(f"{b.name}.{v}", (c,))
            for t in b.written + list(b.copied.values()):
                p.tensor(f"{t}.{v}@block", (self.shapes[t][3],),
                         slice_of=(f"{b.name}.{v}", b.offsets[t]))

    def declare_output(self, n):
        if n.name in self.member:
            self.declare_block(self.member[n.name])
        else:
            super().declare_output(n)

    # --- forward -------------------------------------------------------------------------
    def forward(self, n):
        if n.op == "concat" and n.name in self.member:
            return  # a view of the buffer
        super().forward(n)
        b = self.copied.get(n.name)
        if b is not None:
            self.declare_block(b)
            t, shape = b.copied[n.name], self.shapes[n.name]
            self.step(n, f"copy into {b.name}", "concat", "forward", ops.concat_copy_call(
                R(n.name), W(b.name), shape, self.shapes[b.name], b.offsets[t]))
            self.step(n, "stats", "bn", "forward", ops.bn_stats_call(
                R(n.name), W(f"{t}.mean@block"), W(f"{t}.var@block"), shape))

    def forward_epilogue(self, n):
        if n.name not in self.member:
            return super().forward_epilogue(n)
        c = self.shapes[n.name][3]
        return CHANNEL_SUMS, tuple(W(self.plan.tensor(f"{n.name}.{v}", fo.partials_shape(c),
                                                 np.float64)) for v in ("fs1", "fs2"))

    def conv_forward(self, n):
        super().conv_forward(n)
        if n.name in self.member:  # the feature's statistics, merged right after its conv
            self.step(n, "stats merge", "bn", "forward", fo.feature_stats_call(
                R(f"{n.name}.fs1"), R(f"{n.name}.fs2"), W(f"{n.name}.mean@block"),
                W(f"{n.name}.var@block"), self.shapes[n.name]))

    def bn_stats(self, s, coeffs):
        b = self.member.get(s.x)
        if b is None:
            return super().bn_stats(s, coeffs)
        self.step(s.bn, "stats from block", "bn", "forward", fo.gathered_coeffs_call(
            R(f"{b.name}.mean"), R(f"{b.name}.var"), b.offsets[s.x], *coeffs, s.bn["eps"],
            self.shapes[s.x]))

    # --- backward ------------------------------------------------------------------------
    def grad_as_slice(self, x):
        """Not for a block's features: their gradients are slices of the block's already."""
        return x not in self.member and x not in self.copied and super().grad_as_slice(x)

    def contribute(self, n, what, kind, target, make, native=False):
        b = self.member.get(target)
        if b is None:
            return super().contribute(n, what, kind, target, make, native)
        if not b.grad_started:  # d:<buffer> and its slices, mirroring the buffer
            b.grad_started = True
            self.plan.tensor(f"d:{b.name}", self.shapes[b.name])
            for t, off in b.offsets.items():
                if t != b.name:
                    self.plan.tensor(f"d:{t}", self.shapes[t], slice_of=(f"d:{b.name}", off))
            self.seen.update(b.offsets)
            if target == b.name:
                self.step(n, what, kind, "backward", make(W(f"d:{target}"), False))
                return
            self.step(n, f"zero d:{b.name}", "other", "backward",
                      ops.fill_call(W(f"d:{b.name}"), 0.0, self.shapes[b.name]))
        # block members are read by BNs only (find_block), and their dx adds natively
        assert native, f"bnff+: {n.name} cannot add into d:{target}"
        self.step(n, what, kind, "backward", make(RW(f"d:{target}"), True))

    def backward(self, n):
        b = self.member.get(n.name)
        if n.op == "concat" and b is not None:
            return  # the gradients are slices of the block's
        b = self.copied.get(n.name)
        if b is not None:
            t = b.copied[n.name]
            self.contribute(n, f"copy out of d:{b.name}", "concat", n.name,
                            lambda d, acc: ops.concat_split_call(
                                R(f"d:{b.name}"), d, self.shapes[b.name], self.shapes[n.name],
                                b.offsets[t], acc), native=True)
        super().backward(n)
