"""Concat along channels of NHWC tensors, and its backward (the split of the gradient).

On [M, C] views (M = N*H*W), input k owns channels [off_k, off_k + C_k) of every row:

    forward:   Y[:, off_k:off_k+C_k] = X_k          reads S, writes S (S = all of Y)
    backward:  dX_k = dY[:, off_k:off_k+C_k]        reads S, writes S

The numpy variant makes one strided slice copy per input, on one thread. Every other copy is
one shared loop (_copy_parts), in either direction: per block of rows of Y (CHUNK floats, in
L2), each input's rows copied by W-lane vector loads and stores (a row of a 32-channel feature
is two vectors at W = 16), every operand indexed through its row span so a channel slice of a
wider buffer vectorizes too. prange calls it once per input, rows once per concatenation (the
default; each input fetched from the typed list once per block). The loop it replaced, one
scalar copy per row, and an L1-tiled one-call variant with scalar loops that fetched every
input from the list for every 32 KiB tile (an atomic reference count, bounced between the
threads), took 242 / 144 ms per iteration over DenseNet-121's concatenations at batch 16,
224x224 (2-vCPU AMD EPYC znver5) at 1 / 2 threads, rows 69 / 45 ms, PyTorch's cat 53 / 43 ms.
Writing the producers straight into their slice of Y, as BNFF does, removes the stage
altogether. The default, stream, is rows with non-temporal stores (vec.vstore_nt: no read for
ownership of Y's lines, which are not kept in the caches) when Y is at least the last-level
cache, so its next reader finds it in DRAM either way. Over DenseNet-121's concatenations at
batch 16, 224x224 (same machine), `bnff micro densenet121 --stage concat_fwd --variant
rows,stream`: 38.3 -> 37.0 ms at 1 thread, 25.6 -> 24.4 at 2 (the shapes with Y >= LLC 8.6 ->
7.5 and 6.9 -> 5.8); in the iteration (`bnff bench densenet121 --schedules baseline --repeat
5`, runs alternated), the concat kind 0.147 / 0.141 s with rows against 0.122 with stream at
1 thread, 0.079 / 0.089 against 0.091 / 0.080 at 2 (no difference).

Kernels ([M, C_k] and [M, C] float32 views; outputs written):
    copy_into(X, Y, off)                Y[:, off:off+C_k] = X
    copy_out(Y, off, X)                 X = Y[:, off:off+C_k]
    add_out(Y, off, A, X)               X = A + Y[:, off:off+C_k]   (A is X: a gradient summed
                                        at a fork, into X, which may be a channel slice too)
    concat_numpy(xs, Y)   concat_prange(xs, Y)   concat_rows(xs, Y)   concat_stream(xs, Y)
                                        xs: list of [M, C_k]
    split_numpy(dY, dxs)  split_prange(dY, dxs)  split_rows(dY, dxs)    dxs: list of [M, C_k]
"""
from __future__ import annotations

import re

import numpy as np
from numba import njit, prange
from numba.typed import List

from bnff.engine.vec import (W, aligned_empty, row_span, store_fence, vadd, vload, vstore,
                             vstore_nt)
from bnff.kernels import reference as ref
from bnff.kernels.rows import BLOCKS, block_rows
from bnff.kernels.stage import F32, Cost, DescriptorError, Stage
from bnff.measure.machine import llc_bytes

CHUNK = 65536  # floats per row block of the copies and add_out (256 KiB: in L2)
# a concatenation at least the LLC streams its stores: its next reader finds it in DRAM anyway
STREAM_BYTES = llc_bytes()


@njit(inline="always")
def _copy_rows(src, si, ss, dst, di, ds, r0, r1, ck):
    """dst.flat[di + r*ds : +ck] = src.flat[si + r*ss : +ck] for rows r0..r1-1, by W-lane
    vectors and a scalar tail (flat indices into C-contiguous arrays)."""
    if ck == 2 * W:  # DenseNet's growth-rate features at W = 16: two vectors, no loop
        a, b = si + r0 * ss, di + r0 * ds
        for r in range(r0, r1):
            vstore(dst, b, vload(src, a))
            vstore(dst, b + W, vload(src, a + W))
            a += ss
            b += ds
        return
    nv = ck // W * W
    for r in range(r0, r1):
        a, b = si + r * ss, di + r * ds
        for j in range(0, nv, W):
            vstore(dst, b + j, vload(src, a + j))
        for j in range(nv, ck):
            dst.flat[b + j] = src.flat[a + j]


@njit(inline="always")
def _stream_rows(src, si, ss, dst, di, ds, r0, r1, ck):
    """As _copy_rows by non-temporal vector stores (vstore_nt): every dst row start aligned to
    a vector, ck a multiple of W."""
    for r in range(r0, r1):
        a, b = si + r * ss, di + r * ds
        for j in range(0, ck, W):
            vstore_nt(dst, b + j, vload(src, a + j))


@njit(parallel=True, cache=True)
def _copy_parts(parts, Y, off, into, stream=False):
    """Part k of the list owns Y's channels [o_k, o_k + C_k), o_0 = off: into, Y's channels =
    the parts (concat); else the parts = Y's channels (split). Per block of rows of Y (CHUNK
    floats of the parts), each part's rows by W-lane vectors, the part fetched from the list
    once per block. stream (into only): the parts whose rows of Y start vector-aligned and
    hold whole vectors are stored non-temporally, then fenced."""
    m = Y.shape[0]
    y, ys = row_span(Y)
    width = 0
    for k in range(len(parts)):
        width += parts[k].shape[1]
    vb = W * 4
    stream = stream and into and ys * 4 % vb == 0
    nblk = max(BLOCKS, (m * width + CHUNK - 1) // CHUNK)
    for blk in prange(nblk):
        r0, r1 = block_rows(blk, nblk, m)
        o = off
        for k in range(len(parts)):
            x, xs = row_span(parts[k])
            ck = parts[k].shape[1]
            if not into:
                _copy_rows(y, o, ys, x, 0, xs, r0, r1, ck)
            elif stream and ck % W == 0 and (Y.ctypes.data + o * 4) % vb == 0:
                _stream_rows(x, 0, xs, y, o, ys, r0, r1, ck)
            else:
                _copy_rows(x, 0, xs, y, o, ys, r0, r1, ck)
            o += ck
        if stream:
            store_fence()


def copy_into(X, Y, off):
    """Y[:, off:off+C_k] = X by W-lane vectors over row blocks (X, Y may be channel slices)."""
    _copy_parts(List([X]), Y, off, True)


def copy_out(Y, off, X):
    """X = Y[:, off:off+C_k] by W-lane vectors over row blocks (X, Y may be channel slices)."""
    _copy_parts(List([X]), Y, off, False)


# Each operand may be a channel slice (rows strided): indexed through its row span, so the
# row loop is W-lane vectors. Indexed as 2-D strided arrays, LLVM left it scalar: over
# DenseNet-121's accumulations (batch 16, 224x224, 2-vCPU AMD EPYC znver5) 207 / 119 ms at
# 1 / 2 threads against PyTorch's add of the view, 56 / 38 ms.
@njit(parallel=True, fastmath=True, cache=True)
def add_out(Y, off, A, X):
    """X = A + Y[:, off:off+C_k] by vectors over row blocks (A is X in a plan: accumulation)."""
    if X.strides[1] != 4 or A.strides[1] != 4 or Y.strides[1] != 4:
        raise ValueError("add_out: columns must be contiguous")
    m, ck = X.shape
    y, ys = row_span(Y)
    a, sa = row_span(A)
    x, sx = row_span(X)
    nv = ck // W * W
    nblk = max(BLOCKS, (m * ck + CHUNK - 1) // CHUNK)
    for blk in prange(nblk):
        r0, r1 = block_rows(blk, nblk, m)
        for r in range(r0, r1):
            yi, ai, xi = r * ys + off, r * sa, r * sx
            for j in range(0, nv, W):
                vstore(x, xi + j, vadd(vload(a, ai + j), vload(y, yi + j)))
            for j in range(nv, ck):
                x[xi + j] = a[ai + j] + y[yi + j]


# 1. numpy: a framework-style strided slice assignment per input, one thread.
def concat_numpy(xs, Y):
    """Y[:, off:off+C_k] = X_k by numpy slice assignment."""
    off = 0
    for x in xs:
        Y[:, off:off + x.shape[1]] = x
        off += x.shape[1]


# 2. prange: one parallel copy call per input.
def concat_prange(xs, Y):
    """copy_into per input, rows split over the threads."""
    off = 0
    for x in xs:
        copy_into(x, Y, off)
        off += x.shape[1]


# 3. rows: one call; per block of rows of Y (CHUNK floats), each input's rows copied in by
#    vectors, the input fetched from the list once per block.
def concat_rows(xs, Y):
    """Per row block of Y, each input's rows copied into its channels by W-lane vectors."""
    _copy_parts(List(xs), Y, 0, True)


# 4. stream: rows, with the stores non-temporal when Y is larger than the last-level cache
#    (Y's rows vector-aligned: the plan's buffers start 64-byte aligned).
def concat_stream(xs, Y):
    """concat_rows, storing past the caches when Y is at least the LLC (STREAM_BYTES)."""
    _copy_parts(List(xs), Y, 0, True, Y.nbytes >= STREAM_BYTES)


# 1. numpy: slice copies out of the gradient, one thread.
def split_numpy(dY, dxs):
    """dX_k[...] = dY[:, off:off+C_k] by numpy."""
    off = 0
    for dx in dxs:
        dx[...] = dY[:, off:off + dx.shape[1]]
        off += dx.shape[1]


# 2. prange: one parallel copy call per input.
def split_prange(dY, dxs):
    """copy_out per input, rows split over the threads."""
    off = 0
    for dx in dxs:
        copy_out(dY, off, dx)
        off += dx.shape[1]


# 3. rows: one call; per block of rows of dY, each slice copied out by vectors.
def split_rows(dY, dxs):
    """Per row block of dY, each input's channels copied out to its dX_k by W-lane vectors."""
    _copy_parts(List(dxs), dY, 0, False)


def _runs(ics):
    """(64, 32, 32, 32) -> '64+32x3'."""
    parts, i = [], 0
    while i < len(ics):
        j = i
        while j < len(ics) and ics[j] == ics[i]:
            j += 1
        parts.append(f"{ics[i]}x{j - i}" if j - i > 1 else f"{ics[i]}")
        i = j
    return "+".join(parts)


class _Concat(Stage):
    """Shape keys: mb, ics (tuple of input channel counts), ih, iw."""

    examples = ("mb2ic64+32ih7iw7", "mb2ic128+32x3ih7iw7", "mb2ic3+5ih7iw7")

    def descriptor(self):
        s = self.shape
        return f"mb{s['mb']}ic{_runs(s['ics'])}ih{s['ih']}iw{s['iw']}"

    @classmethod
    def from_descriptor(cls, text):
        """'mb2ic64+32x3ih7iw7' -> ics (64, 32, 32, 32)."""
        m = re.fullmatch(r"mb(\d+)ic((?:\d+(?:x\d+)?\+)*\d+(?:x\d+)?)ih(\d+)iw(\d+)", text)
        if m is None:
            raise DescriptorError(f"descriptor {text!r} does not fit stage {cls.name} "
                                  "(mb<N>ic<C>+<C>x<repeats>...ih<H>iw<W>)")
        ics = []
        for part in m[2].split("+"):
            c, _, k = part.partition("x")
            ics += [int(c)] * int(k or 1)
        return cls(dict(mb=int(m[1]), ics=tuple(ics), ih=int(m[3]), iw=int(m[4])))

    def _m(self):
        s = self.shape
        return s["mb"] * s["ih"] * s["iw"]

    def _nhwc(self, c):
        s = self.shape
        return (s["mb"], s["ih"], s["iw"], c)

    def cost(self, variant):
        n = self._m() * sum(self.shape["ics"])
        return Cost(flops=0, bytes_read=n * F32, bytes_written=n * F32)


class ConcatForward(_Concat):
    """Inputs x0 .. x{k-1} [mb, ih, iw, ics[k]]; output y [mb, ih, iw, sum(ics)]."""

    name = "concat_fwd"
    variants = {"numpy": concat_numpy, "prange": concat_prange, "rows": concat_rows,
                "stream": concat_stream}
    default = "stream"

    def make_inputs(self, rng):
        return {f"x{k}": rng.standard_normal(self._nhwc(c), dtype=np.float32)
                for k, c in enumerate(self.shape["ics"])}

    def allocate_outputs(self):  # aligned as the plan's buffers (Plan.allocate)
        return {"y": aligned_empty(self._nhwc(sum(self.shape["ics"])), np.float32)}

    def run(self, variant, inputs, outputs):
        m = self._m()
        xs = [inputs[f"x{k}"].reshape(m, c) for k, c in enumerate(self.shape["ics"])]
        self.variants[variant](xs, outputs["y"].reshape(m, -1))

    def reference(self, inputs):
        xs = [np.moveaxis(inputs[f"x{k}"], 3, 1).astype(np.float64)
              for k in range(len(self.shape["ics"]))]
        return {"y": np.moveaxis(ref.concat_forward(xs), 1, 3)}


class ConcatBackward(_Concat):
    """Input dy [mb, ih, iw, sum(ics)]; outputs dx0 .. dx{k-1} [mb, ih, iw, ics[k]]."""

    name = "concat_bwd"
    variants = {"numpy": split_numpy, "prange": split_prange, "rows": split_rows}
    default = "rows"

    def make_inputs(self, rng):
        return {"dy": rng.standard_normal(self._nhwc(sum(self.shape["ics"])), dtype=np.float32)}

    def allocate_outputs(self):
        return {f"dx{k}": np.empty(self._nhwc(c), np.float32)
                for k, c in enumerate(self.shape["ics"])}

    def run(self, variant, inputs, outputs):
        m = self._m()
        dxs = [outputs[f"dx{k}"].reshape(m, c) for k, c in enumerate(self.shape["ics"])]
        self.variants[variant](inputs["dy"].reshape(m, -1), dxs)

    def reference(self, inputs):
        dy = np.moveaxis(inputs["dy"], 3, 1).astype(np.float64)
        parts = ref.concat_backward(dy, list(self.shape["ics"]))
        return {f"dx{k}": np.moveaxis(p, 1, 3) for k, p in enumerate(parts)}


class _Slice(Stage):
    """One input of a concatenation as the schedules run it, a step per input: shape keys
    mb, ic (the input's channels), ih, iw, oc (the concatenation's), off (the input's first
    channel in it). Each moves the input's elements once each way."""

    examples = ("mb2ic16ih3iw5oc48off8", "mb1ic3ih4iw4oc7off4", "mb2ic32ih7iw7oc96off64")

    def _nhwc(self, c):
        s = self.shape
        return (s["mb"], s["ih"], s["iw"], c)

    def _rows(self, a):
        return a.reshape(-1, a.shape[3])

    def _slice(self, a):
        s = self.shape
        return a[..., s["off"]:s["off"] + s["ic"]]

    def cost(self, variant):
        n = self.shape["mb"] * self.shape["ih"] * self.shape["iw"] * self.shape["ic"] * F32
        return Cost(flops=0, bytes_read=n, bytes_written=n)


class ConcatCopyInto(_Slice):
    """Input x; output y[..., off:off+ic] = x (the rest of y is not this step's)."""

    name = "concat_copy_into"
    variants = {"rows": copy_into}
    default = "rows"

    def make_inputs(self, rng):
        return {"x": rng.standard_normal(self._nhwc(self.shape["ic"]), dtype=np.float32)}

    def allocate_outputs(self):
        y = np.empty(self._nhwc(self.shape["oc"]), np.float32)
        return {"y": y, "y_slice": self._slice(y)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](self._rows(inputs["x"]), self._rows(outputs["y"]),
                               self.shape["off"])

    def reference(self, inputs):
        return {"y_slice": inputs["x"].astype(np.float64)}


class ConcatCopyOut(_Slice):
    """Input dy; output dx = dy[..., off:off+ic]."""

    name = "concat_copy_out"
    variants = {"rows": copy_out}
    default = "rows"

    def make_inputs(self, rng):
        return {"dy": rng.standard_normal(self._nhwc(self.shape["oc"]), dtype=np.float32)}

    def allocate_outputs(self):
        return {"dx": np.empty(self._nhwc(self.shape["ic"]), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](self._rows(inputs["dy"]), self.shape["off"],
                               self._rows(outputs["dx"]))

    def reference(self, inputs):
        return {"dx": self._slice(inputs["dy"]).astype(np.float64)}


class ConcatAddOut(ConcatCopyOut):
    """dx = dx0 + dy[..., off:off+ic]: in a schedule dx0 is dx, the gradient other consumers
    started, accumulated in place; here a separate input, so each timed call does the same
    work. The kernel reads dx0 besides the slice."""

    name = "concat_add_out"
    variants = {"rows": add_out}
    default = "rows"

    def make_inputs(self, rng):
        i = super().make_inputs(rng)
        i["dx0"] = rng.standard_normal(self._nhwc(self.shape["ic"]), dtype=np.float32)
        return i

    def run(self, variant, inputs, outputs):
        self.variants[variant](self._rows(inputs["dy"]), self.shape["off"],
                               self._rows(inputs["dx0"]), self._rows(outputs["dx"]))

    def reference(self, inputs):
        return {"dx": super().reference(inputs)["dx"] + inputs["dx0"]}

    def cost(self, variant):
        c = super().cost(variant)
        n = c.bytes_read // F32
        return Cost(flops=n, bytes_read=2 * n * F32, bytes_written=c.bytes_written)
