"""What the three conv kernels share: shapes, the weight layout, the hook API, and the
implicit-GEMM engine used by conv forward and conv backward-data.

Layouts. Activations NHWC float32. Conv weights OHWI: w[oc, kh, kw, ic] (oneDNN "ohwi"), the
layout conv backward-weights produces natively (a row of dW per output channel);
`to_ohwi` / `from_ohwi` convert from / to the [O, I, KH, KW] layout of `reference.py`.

Implicit GEMM. A conv is a GEMM whose A operand is never materialized (im2col): a row of A is
one destination pixel, a column one (tap, source channel), tap = (kh, kw):

    dst[pix(n, i, j), d] = sum_{t, c} src[n, ss*i + ty[t], ss*j + tx[t], c] * B[t*CS + c, d]

over the grid 0 <= i < GH, 0 <= j < GW with pix(n, i, j) = (n, dy0 + ds*i, dx0 + ds*j), and
zero where the source pixel falls in the padding. Forward is the grid of output pixels with
ss = stride, ty = kh - pad; backward-data is one such GEMM per stride phase (conv_bwd_data).
`igemm` packs row blocks of A (applying the prologue on the way) row by row, KC floats apart,
and runs the gemm.py micro-kernel against B packed in NR-wide panels.

Hooks, specialized in at compile time: the `make_*` factories return a plain function (pack
weights, then call an @njit engine that closes over the hooks and is compiled once per hook
combination, memoized and cached on disk); identity hooks by default. Hook signatures:

    prologue(v, idx, c, args) -> float32
        applied to every source element the kernel loads: v = src_flat[idx], c its channel
        (idx and c are uint64, so array indexing by them needs no wraparound and vectorizes).
        A second tensor read at idx must have the source's layout (same shape and strides).
        Padding is zero *after* the prologue (it pads the transformed tensor).
    epilogue(d, ldc, rows, mr, c0, nc, tid, args)
        called once per finished MR x NR output tile, while it is in L1: element (pixel p,
        channel c) of the output is d[p * ldc + c] (d flat), rows[0:mr] are the tile's pixels,
        its channels c0 .. c0+nc-1. tid in [0, ntasks) is the task running it: reductions go
        to partials[tid, ...]. A full tile (nc == NR) is worth a vector path (bnff/engine/vec.py):
        a scalar epilogue costs as much as the tile's GEMM when K is a few hundred.
`args` are tuples the kernels pass through untouched (use () for none). Hooked kernels take a
last argument `ntasks`, the number of parallel tasks (default numba.get_num_threads()); per-task
partials have leading dimension ntasks. Real hooks here: `bn_relu_prologue` (args = (a, b):
max(a[c]*v + b[c], 0)), `bn_grad_prologue` (args = (x flat, a, p, q): a[c]*v + p[c]*x[idx] +
q[c], reading a second tensor), `channel_sums_epilogue` (args = (s1, s2), float64
[ntasks, C], C-contiguous: per-task sum and sum of squares of the output), `bias_epilogue`
(args = (bias,): a conv's bias added to the output) and `bias_sums_epilogue` (args =
(bias, s1, s2): the bias added, then the sums of the biased output). The bias costs no pass
of its own: it is added while the tile is in L1, from one C-vector.

Channel slices. Sources and destinations are NHWC tensors whose pixels may lie further apart
than their channel count: a channel slice `buf[..., c0:c1]` of a wider buffer (DenseNet's
block buffer), read and written in place through `pixels` (flat view, pixel stride).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit, prange
from numba.core.dispatcher import Dispatcher

from bnff.engine.gemm import KC, MC, MR, NR, tile
from bnff.engine.vec import W, vadd, vfma, vload, vstore, vwiden, vzero64
from bnff.kernels.stage import F32

JB_FLOATS = 32 * 1024  # B panel slices visited per row of tiles: 128 KiB, within L2

# --- shapes and weights ------------------------------------------------------------------


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def to_ohwi(w_oihw: np.ndarray) -> np.ndarray:
    """[O, I, KH, KW] -> contiguous float32 [O, KH, KW, I]."""
    return np.ascontiguousarray(np.transpose(w_oihw, (0, 2, 3, 1)), dtype=np.float32)


def from_ohwi(w_ohwi: np.ndarray) -> np.ndarray:
    """[O, KH, KW, I] -> [O, I, KH, KW] (a view)."""
    return np.transpose(w_ohwi, (0, 3, 1, 2))


def pixels(a: np.ndarray) -> tuple[np.ndarray, int]:
    """A float32 array whose last axis (channels) is contiguous and whose rows (pixels: all
    other axes) are evenly spaced, possibly further apart than its channel count (a channel
    slice `buf[..., c0:c1]` of a wider buffer), as (flat, ps): element (row p, channel c) is
    flat[p * ps + c], flat a 1-D C-contiguous view from a's first to its last element (writes
    go to a's memory)."""
    c, isz = a.shape[-1], a.itemsize
    m = a.size // c if c else 0
    ps = a.strides[-2] // isz if a.size else c
    even = all(a.strides[i] == a.strides[i + 1] * a.shape[i + 1] or a.shape[i] == 1
               for i in range(a.ndim - 2))
    if a.dtype != np.float32 or a.ndim < 2 or (c > 1 and a.strides[-1] != isz) or ps < c or \
            not even:
        raise ValueError(f"not a channel slice of a contiguous float32 buffer: "
                         f"shape {a.shape}, strides {a.strides}, {a.dtype}")
    span = (m - 1) * ps + c if a.size else 0
    return np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(isz,)), ps


def conv_flops(mb, ic, oh, ow, oc, kh, kw) -> int:
    """One multiply-add counted as 2 FLOPs; the same count for all three directions."""
    return 2 * mb * oh * ow * oc * ic * kh * kw


# --- hooks -------------------------------------------------------------------------------


@njit(inline="always", cache=True)
def identity_prologue(v, idx, c, args):
    return v


@njit(inline="always", cache=True)
def identity_epilogue(d, ldc, rows, mr, c0, nc, tid, args):
    return


@njit(inline="always", cache=True, fastmath=True)
def bn_relu_prologue(v, idx, c, args):
    """z = max(a[c] * x + b[c], 0): BN normalize + ReLU applied as the conv loads x."""
    return max(args[0][c] * v + args[1][c], np.float32(0.0))


@njit(inline="always", cache=True, fastmath=True)
def bn_grad_prologue(v, idx, c, args):
    """dx = a[c] * dy + p[c] * x + q[c]: the BN input gradient formed as the conv loads dy;
    args = (x, a, p, q) with x flat (x.reshape(-1)), same shape as dy."""
    x, a, p, q = args
    return a[c] * v + p[c] * x[idx] + q[c]


@njit(inline="always", cache=True, fastmath=True)
def tile_sums(d, ldc, x, xps, rows, mr, c0, nc, tid, s1, s2):
    """s1[tid, c] += sum_r d[r, c], s2[tid, c] += sum_r d[r, c] * x[r, c] over a tile, in
    float64 (products of float32 values are exact in it); a full tile in vector registers."""
    o = tid * s1.shape[1] + c0
    if nc == NR:
        for h in range(0, NR, W):
            a1 = vzero64()
            a2 = vzero64()
            for r in range(mr):
                g = vwiden(vload(d, rows[r] * ldc + c0 + h))
                a1 = vadd(a1, g)
                a2 = vfma(g, vwiden(vload(x, rows[r] * xps + c0 + h)), a2)
            vstore(s1, o + h, vadd(vload(s1, o + h), a1))
            vstore(s2, o + h, vadd(vload(s2, o + h), a2))
        return
    for j in range(nc):
        a1 = 0.0
        a2 = 0.0
        for r in range(mr):
            g = np.float64(d[rows[r] * ldc + c0 + j])
            a1 += g
            a2 += g * x[rows[r] * xps + c0 + j]
        s1.flat[o + j] += a1
        s2.flat[o + j] += a2


@njit(inline="always", cache=True, fastmath=True)
def channel_sums_epilogue(d, ldc, rows, mr, c0, nc, tid, args):
    """Per-channel float64 sum and sum of squares of the output tile into args[0/1][tid, c]."""
    tile_sums(d, ldc, d, ldc, rows, mr, c0, nc, tid, args[0], args[1])


@njit(inline="always", cache=True, fastmath=True)
def tile_bias(d, ldc, rows, mr, c0, nc, bias):
    """d[r, c] += bias[c] over a finished tile (a conv's bias); a full tile in vectors."""
    if nc == NR:
        for h in range(0, NR, W):
            bv = vload(bias, c0 + h)
            for r in range(mr):
                i = rows[r] * ldc + c0 + h
                vstore(d, i, vadd(vload(d, i), bv))
        return
    for r in range(mr):
        for j in range(nc):
            d[rows[r] * ldc + c0 + j] += bias[c0 + j]


@njit(inline="always", cache=True, fastmath=True)
def bias_epilogue(d, ldc, rows, mr, c0, nc, tid, args):
    """The conv's bias args[0][c] added to the output tile."""
    tile_bias(d, ldc, rows, mr, c0, nc, args[0])


@njit(inline="always", cache=True, fastmath=True)
def bias_sums_epilogue(d, ldc, rows, mr, c0, nc, tid, args):
    """bias_epilogue, then channel_sums_epilogue of the biased tile: args = (bias, s1, s2)."""
    tile_bias(d, ldc, rows, mr, c0, nc, args[0])
    tile_sums(d, ldc, d, ldc, rows, mr, c0, nc, tid, args[1], args[2])


@dataclass(frozen=True)
class Hook:
    """A hook as the lowering hands it to a conv kernel: its function (compiled in, signature
    above), how the step's arrays are packed into the args tuple the function reads, and the
    main-memory bytes it adds to the conv's. `reads_x`: the first array is the pre-BN tensor,
    read beside the conv's own operand (one more pass over a tensor of the hooked operand's
    shape). `sums`: the last two arrays are per-task float64 partial sums, zeroed before
    every call.

    For the stages that time a hooked conv on its own (conv_hooked.py): `inputs(rng, shape)`
    makes the float32 arrays the hook reads (all but the partial sums) for a hooked operand of
    NHWC `shape`, and `ref` is the float64 reference: a prologue's ref(v, arrays) is the
    operand as the conv sees it, an epilogue's ref(d, arrays) is (the output as the hook leaves
    it, the merged sums (s1, s2) or () without sums)."""

    name: str
    fn: object
    pack: Callable = tuple
    reads_x: bool = False
    sums: bool = False
    inputs: Callable = lambda rng, shape: ()
    ref: Callable = None

    def args(self, arrays) -> tuple:
        if self.sums:
            for part in arrays[-2:]:
                part[...] = 0.0
        return self.pack(arrays)

    def bytes(self, shape) -> int:
        return int(np.prod(shape)) * F32 if self.reads_x else 0


def flat_first(arrays) -> tuple:
    """A prologue's second tensor indexed like its source: flat."""
    return (arrays[0].reshape(-1),) + tuple(arrays[1:])


def pixels_first(arrays) -> tuple:
    """An epilogue's second tensor as (flat, pixel stride): a channel slice works in place."""
    return pixels(arrays[0]) + tuple(arrays[1:])


def coefficients(rng, c, n):
    """n per-channel float32 vectors: the first in [0.5, 1.5], the others in [-0.5, 0.5]
    (so a*x + b > 0 for about half of a standard-normal x)."""
    return (rng.uniform(0.5, 1.5, c).astype(np.float32),) + tuple(
        rng.uniform(-0.5, 0.5, c).astype(np.float32) for _ in range(n - 1))


def tensor_and_coefficients(n):
    """inputs() of a hook reading a second tensor of the operand's shape and n vectors."""
    return lambda rng, shape: (rng.standard_normal(shape, dtype=np.float32),) + \
        coefficients(rng, shape[3], n)


def sums_of(g, x):
    """Per-channel float64 sums of g and g * x over all pixels."""
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    return g2.sum(0), (g2 * x2).sum(0)


IDENTITY_PROLOGUE = Hook("identity", identity_prologue, ref=lambda v, a: v)
IDENTITY_EPILOGUE = Hook("identity", identity_epilogue, ref=lambda d, a: (d, ()))
BN_RELU = Hook("bn_relu", bn_relu_prologue, inputs=lambda rng, shape: coefficients(rng, shape[3], 2),
               ref=lambda v, a: np.maximum(a[0] * v + a[1], 0))
BN_GRAD = Hook("bn_grad", bn_grad_prologue, flat_first, reads_x=True,
               inputs=tensor_and_coefficients(3),
               ref=lambda v, a: a[1] * v + a[2] * a[0] + a[3])
CHANNEL_SUMS = Hook("stats", channel_sums_epilogue, sums=True,
                    ref=lambda d, a: (d, sums_of(d, d)))
BIAS = Hook("bias", bias_epilogue, inputs=lambda rng, shape: coefficients(rng, shape[3], 2)[1:],
            ref=lambda d, a: (d + a[0], ()))
BIAS_SUMS = Hook("bias+stats", bias_sums_epilogue, sums=True,
                 inputs=lambda rng, shape: coefficients(rng, shape[3], 2)[1:],
                 ref=lambda d, a: (d + a[0], sums_of(d + a[0], d + a[0])))


def stable(hook):
    """Give a hook dispatcher a deterministic pickling identity (module, name, bytecode) so the
    kernels closing over it hit Numba's on-disk cache in a new process: Numba keys a cached
    closure by pickling its cell contents, and a dispatcher pickles as a random uuid, together
    with the globals it names, so the dispatchers a hook calls get one too, recursively
    (bnff/engine/vec.py gives its intrinsics theirs). A hook that is itself a closure keeps its
    random uuid: correct, only recompiled in every process. Factory kernels therefore close
    over hooks only, never over other factory kernels."""
    f = hook.py_func
    if hook._MemoMixin__uuid is None and f.__closure__ is None:
        h = hashlib.sha256(f.__code__.co_code + repr(f.__code__.co_consts).encode())
        hook._set_uuid(f"bnff:{f.__module__}.{f.__qualname__}:{h.hexdigest()[:20]}")
        for name in f.__code__.co_names:
            if isinstance(f.__globals__.get(name), Dispatcher):
                stable(f.__globals__[name])
    return hook


def hooked(factory):
    """The one memoizing factory of every hooked kernel: `factory(*hooks)` runs once per
    combination of hook functions (defaults filled in, so make() and make(identity) are one
    kernel), each hook made `stable` first so the kernel hits the disk cache; later calls
    return the same kernel."""
    sig, cache = inspect.signature(factory), {}

    @functools.wraps(factory)
    def make(*hooks, **named):
        bound = sig.bind(*hooks, **named)
        bound.apply_defaults()
        key = tuple(bound.arguments.values())
        if key not in cache:
            for hook in key:
                if isinstance(hook, Dispatcher):  # not the plain options (an engine name)
                    stable(hook)
            cache[key] = factory(*key)
        return cache[key]
    return make


def engine_variants(make) -> dict:
    """The stage variants of a hooked conv factory `make` (make_conv_forward,
    make_conv_backward_data) without hooks, one per engine, in the order the stages list them:
    {"im2col": f, "direct": f}, f(src, w, dst, stride, pad) = make(engine=...)(src, w, dst,
    stride, pad); "direct" is the factory's default engine."""
    def variant(engine):
        def conv(src, w, dst, stride, pad):
            make(engine=engine)(src, w, dst, stride, pad)
        conv.__doc__ = f"{make.__name__}(engine={engine!r}) without hooks."
        return conv
    return {engine: variant(engine) for engine in ("im2col", "direct")}


@njit(parallel=True, cache=True)
def add_partials(out, part):
    """out[r, k] += sum_t part[t, r, k]: a weight gradient's per-task partials merged into the
    one the first task accumulated (out [R, K], part [T, R, K]), parallel over rows r."""
    for r in prange(out.shape[0]):
        for t in range(part.shape[0]):
            for k in range(out.shape[1]):
                out[r, k] += part[t, r, k]


# --- the implicit-GEMM engine --------------------------------------------------------------


@njit(cache=True)
def row_step(m, t):
    """Rows per block: at most about MC, a multiple of MR, and a multiple of t blocks (when
    there are enough rows) so t tasks get equal work."""
    nb = (m + MC - 1) // MC
    nb = (nb + t - 1) // t * t
    return max(MR, ((m + nb - 1) // nb + MR - 1) // MR * MR)


@njit(cache=True)
def tap_groups(ty, tx):
    """Split taps into groups of consecutive taps with equal ty and tx increasing by one, so
    that a group reads one contiguous run of an NHWC row: (first tap, length, ty, first tx)."""
    if ty.shape[0] == 0:
        return ty.copy(), ty.copy(), ty.copy(), ty.copy()
    gt = [0]
    for t in range(1, ty.shape[0]):
        if ty[t] != ty[t - 1] or tx[t] != tx[t - 1] + 1:
            gt.append(t)
    ng = len(gt)
    first = np.array(gt, np.int64)
    length = np.empty(ng, np.int64)
    for g in range(ng):
        length[g] = (first[g + 1] if g + 1 < ng else ty.shape[0]) - first[g]
    return first, length, ty[first], tx[first]


@njit(parallel=True, cache=True)
def pack_b_rows(b, bp):
    """B^T given as b[d, k] (row d = one destination channel) -> bp[d // NR, k, d % NR]."""
    nd, k = b.shape
    for jp in prange(bp.shape[0]):
        for p in range(k):
            for j in range(NR):
                d = jp * NR + j
                bp[jp, p, j] = b[d, p] if d < nd else 0.0


@hooked
def make_igemm(prologue=identity_prologue, epilogue=identity_epilogue):
    """The implicit-GEMM kernel with `prologue` / `epilogue` compiled in (memoized)."""
    @njit(parallel=True, fastmath=True, cache=True)
    def igemm(src1, SH, SW, CS, sps, dst1, nb_, DH, DW, CD, dps, acc, bp, ss, gt, gl, gy, gx,
              gh, gw, dy0, dx0, ds, pro_args, epi_args, nt):
        """dst[pix(n,i,j), :] (+)= sum_{t,c} src[n, ss*i+ty[t], ss*j+tx[t], c] * B[t*CS+c, :],
        the taps given as groups g of gl[g] taps from tap gt[g] at (gy[g], gx[g] + 0, 1, ...);
        src and dst flat with pixel strides sps, dps (see `pixels`); += when acc."""
        K = bp.shape[1]
        npan = bp.shape[0]
        m = nb_ * gh * gw
        step = row_step(m, nt)
        nblocks = (m + step - 1) // step
        for tid in prange(nt):
            ap = np.empty((step + MR) * KC, np.float32)
            rn = np.empty(step, np.int64)
            ri = np.empty(step, np.int64)
            rj = np.empty(step, np.int64)
            rows = np.empty(MR, np.int64)
            scratch = np.empty(MR * NR, np.float32)
            for blk in range(tid, nblocks, nt):
                r0 = blk * step
                mc = min(step, m - r0)
                for r in range(mc):
                    q = (r0 + r) // gw
                    rj[r] = r0 + r - q * gw
                    rn[r] = q // gh
                    ri[r] = q - rn[r] * gh
                for p0 in range(0, max(K, 1), KC):
                    kc = min(KC, K - p0)
                    last = p0 + KC >= K
                    # pack rows r0 .. r0+mc, columns p0 .. p0+kc of A into ap[r * KC + p]: per
                    # tap group, one contiguous source run, zeros where it leaves the image
                    for r in range(mc):
                        o = r * KC - p0
                        for g in range(gy.shape[0]):
                            k0 = gt[g] * CS
                            ka = max(k0, p0)
                            kb = min(k0 + gl[g] * CS, p0 + kc)
                            if ka >= kb:
                                continue
                            y = ss * ri[r] + gy[g]
                            xs = ss * rj[r] + gx[g]
                            va = max(ka, k0 - xs * CS)
                            vb = min(kb, k0 + (SW - xs) * CS)
                            if y < 0 or y >= SH or va >= vb:
                                ap[o + ka:o + kb] = 0.0
                                continue
                            ap[o + ka:o + va] = 0.0
                            ap[o + vb:o + kb] = 0.0
                            k = va
                            c = (va - k0) % CS
                            if sps == CS and CS < NR:  # few channels (the stem): one flat run
                                base = ((rn[r] * SH + y) * SW + xs) * CS - k0
                                for q in range(vb - va):
                                    i = np.uint64(base + va + q)
                                    ap[np.uint64(o + va + q)] = prologue(src1[i], i, np.uint64(c),
                                                                         pro_args)
                                    c = c + 1 if c + 1 < CS else 0
                                continue
                            # one source pixel at a time, channels c .., pixels sps apart
                            base = ((rn[r] * SH + y) * SW + xs) * sps + (va - k0) // CS * sps
                            while k < vb:
                                e = min(vb, k + CS - c)
                                for q in range(e - k):  # unsigned indices: no wraparound, SIMD
                                    i = np.uint64(base + c + q)
                                    ap[np.uint64(o + k + q)] = prologue(src1[i], i,
                                                                       np.uint64(c + q), pro_args)
                                k = e
                                c = 0
                                base += sps
                    ap[mc * KC:(mc + MR - 1) // MR * MR * KC] = 0.0
                    # panels in groups whose B slices fit in L2 (JB_FLOATS); within a group
                    # the tile rows outermost, so each output row is written in long runs
                    jb = max(1, JB_FLOATS // (max(kc, 1) * NR))
                    for j0 in range(0, npan, jb):
                        for ir in range(0, mc, MR):
                            mr = min(MR, mc - ir)
                            for i in range(MR):
                                r = ir + min(i, mr - 1)
                                rows[i] = (rn[r] * DH + dy0 + ds * ri[r]) * DW + dx0 + ds * rj[r]
                            for jp in range(j0, min(npan, j0 + jb)):
                                nr = min(NR, CD - jp * NR)
                                tile(kc, ap, ir * KC, bp, (jp * K + p0) * NR, dst1, rows, mr,
                                     jp * NR, dps, nr, acc or p0 > 0, scratch)
                                if last:
                                    epilogue(dst1, dps, rows, mr, jp * NR, nr, tid, epi_args)

    return igemm
