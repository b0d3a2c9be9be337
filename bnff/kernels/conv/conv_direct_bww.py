"""Direct conv backward-weights: the weight gradient reduced over pixels in registers, straight
from NHWC rows of x and dy, with no im2col copy and no packing of dy.

    dw[oc, kh, kw, ic] = sum_{n, oh, ow} dy[n, oh, ow, oc] * x[n, oh*s - p + kh, ow*s - p + kw, ic]

2*N*OH*OW*OC*IC*KH*KW FLOPs; reads x and dy once, writes dw once (plus per-task partials).

Runs. For one kernel row kh, the taps (kw, ic) a pixel (oh, ow) reads are KW*IC consecutive
floats of a zero-padded x row: band[oh*s + kh, ow*s + kw, ic], j = kw*IC + ic. So per kh, dw is
a product over pixels of dy (rows = pixels, OC columns) and these runs (J = KW*IC columns):

    part[kh, j, oc] += sum_p run_kh(p)[j] * dy[p, oc]

Register tile: R consecutive floats of a run (broadcast) x OB = V*W output channels (V vectors
of dy's row, W = bnff.engine.vec.W lanes): R*V accumulators held over all pixels of a block,
then added into the task's partial. Per pixel, V vector loads and R broadcasts feed R*V FMAs.
OB = 32 output channels (DenseNet's growth rate: the most frequent conv, 3x3 128->32, has no
more), so V = 32/W; R fills the register file: R*V accumulators + V dy vectors + a broadcast
within the host's vector registers (bnff.engine.vec.VREGS), at most 12: R = 12 at 16 lanes
(24 zmm accumulators), 6 at 8 lanes with 32 registers, 2 at 8 lanes with 16 (AVX2). Measured
on the Zen 5 VM below, DenseNet's 3x3 128->32 (batch 16, 56x56, 1 thread): 8 accumulators
(W = 8, R = 2) ran at 44 GFLOP/s, 24 (W = 8, R = 6) at 101-108, 24 zmm (W = 16, R = 12) at 196.

Bands. Per task and per block of rb output rows of one image, x's rows ih = oh0*s - p ..
are copied into a per-task band, zero in the padding, `prologue_x` applied once per element
(the recomputed BN+ReLU of the fused schedules), so the tile has no edge cases. dy's rows are
read in place when no prologue applies and OC is a multiple of OB; otherwise (`prologue_dy`,
the BN input gradient a*dy + p*x' + q formed once per element, or an odd OC) the block's rows
are copied into a dy band with OC padded to OB with zeros. A 1x1 conv without padding or
prologue reads x in place too (its run is one pixel's channels, read with x's pixel stride),
when IC >= R. A run whose length J is not a multiple of R ends with a tail tile read from
J - R (`tail`), so nothing is read past a run (J < R only in a band, which has R floats of
slack).

Blocking. A block has at least PIX = 112 pixels (a dy slab of 32 channels, 14 KiB, stays in
L1 while the tiles of a run sweep it), PIX_BIG = 256 when the task's partial exceeds 512 KiB
(it is swept once per block from L3: 1x1 1024->512 at 14x14 went from 181 to 214 GFLOP/s at
2 threads). Within a block the run is cut into chunks of JC floats (P x JC in L2) taken
outermost, then dy's 32-channel slabs, then the tiles of the chunk.

Tasks split the blocks (contiguous ranges) and reduce into their own partials [KH, jf + R, OCp]
(oc fastest: the tile's vector stores); the partials are summed and transposed into OHWI at the
end. x and dy may be channel slices of wider buffers (conv_common.pixels).

Measured (python -m bnff.kernels.conv.conv_direct_bww_timing --reps 5 under bnff-timed, batch 16,
224x224 networks' shapes, median of 5 interleaved calls, compile excluded): 2-vCPU AMD EPYC
Zen 5 (znver5, AVX-512 with full-width FMA, L1d 48 KiB, L2 1 MiB per core), W = 16, numba
0.68, at b808d08. GFLOP/s direct / im2col (numpy sgemm 2048^3 of the same process: 107 at 1
thread, 201 at 2), and the time of the direct kernel with bnff's two prologues (BN+ReLU of x,
masked BN gradient of dy) over the plain one:

    shape                            1 thread           fused     2 threads          fused
    3x3 128->32 at 56 (DenseNet)     196 / 118          1.08      354 / 198          1.07
    3x3 128->32 at 28                191 / 101          1.07      339 / 201          1.02
    3x3 128->32 at 14                180 / 117          1.05      300 / 197          1.15
    7x7 3->64 s2 stem                136 /  70          (1.35)    230 / 135          (1.26)
    1x1 160->128 at 56               152 /  93          1.33      279 / 189          1.25
    1x1 256->128 at 56               152 / 118          1.21      222 / 175          1.19
    1x1 1024->512 at 14              156 / 145          1.04      192 / 195          1.10
    3x3 64->64 at 56 (ResNet)        192 / 132          1.04      242 / 188          1.01
    1x1 256->64 at 56                155 /  93          1.38      193 / 139          1.25
    1x1 512->128 at 28               157 / 123          1.15      231 / 173          1.21

(the stem has no BN before it: its fused figure only prices the band prologue). The fused 1x1
convs cost 15-38 % more than the plain ones: x goes through a band instead of being read in
place, and the prologues' per-element work (two extra loads, three FMAs, a compare) is large
against 2*OC FLOPs per x element. On this shared VM identical 2-thread runs differ by up to
2x for the same shape (3x3 128->32 at 28: 137 and 275 GFLOP/s minutes apart); ratios of one
run are what to compare.

`make_direct_backward_weights(prologue_x, prologue_dy)` returns
    conv(x, dy, dw, stride, pad, px_args=(), pdy_args=(), ntasks=None)
(conv_common hook signature: prologue_x's idx indexes x's flat view, prologue_dy's dy's).
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from bnff.engine.vec import VREGS, W, vadd, vbroadcast, vfma, vload, vstore, vzero
from bnff.kernels.conv.conv_common import hooked, identity_prologue, pixels

V = max(1, 32 // W)           # dy vectors per tile row: OB = 32 output channels
OB = V * W
R = min(12, (VREGS - V - 1) // V)
PIX = 112                      # pixels per block at least: a dy slab of OB channels in L1
PIX_BIG = 256                  # pixels per block at least when the task's partial exceeds
PART_L2 = 1 << 19              # these bytes (it then streams from L3 once per block)
JC = 16 * R                    # floats of a run per x chunk: P x JC floats in L2


def _tile_source(r_, v_):
    """Source of the R x V register tile (written out: a tile in a loop over a local array
    is split into scalars by LLVM, see bnff/engine/gemm.py)."""
    acc = [[f"c{r}_{v}" for v in range(v_)] for r in range(r_)]
    lines = ["def tile(nrow, ncol, xa, xi, xrs, xcs, ya, yi, yrs, ycs, pt, o, ldo):"]
    lines += [f"    {a} = vzero()" for row in acc for a in row]
    lines += ["    for q in range(nrow):",
              "        xp = xi + q * xrs",
              "        yp = yi + q * yrs",
              "        for _ in range(ncol):"]
    lines += [f"            b{v} = vload(ya, yp + {v * W})" for v in range(v_)]
    for r in range(r_):
        lines.append(f"            a = vbroadcast(xa, xp + {r})")
        lines += [f"            {acc[r][v]} = vfma(a, b{v}, {acc[r][v]})" for v in range(v_)]
    lines += ["            xp += xcs", "            yp += ycs"]
    for r in range(r_):
        for v in range(v_):
            i = f"o + {r} * ldo + {v * W}"
            lines.append(f"    vstore(pt, {i}, vadd(vload(pt, {i}), {acc[r][v]}))")
    ns = dict(vzero=vzero, vload=vload, vbroadcast=vbroadcast, vfma=vfma, vadd=vadd,
              vstore=vstore)
    exec("\n".join(lines), ns)
    return ns["tile"]


tile = njit(fastmath=True, inline="always")(_tile_source(R, V))


def block_rows(oh, ow, part_floats):
    """Output rows per block, no more than the image has: PIX pixels or more, enough that a
    block's FLOPs (2 P per partial float) amortize the sweep of the task's partial (which
    leaves L2 for large dw)."""
    pix = PIX_BIG if part_floats * 4 > PART_L2 else PIX
    return max(1, min(oh, -(-pix // ow)))


@njit(cache=True)
def tail(J):
    """A run of J floats as full R-float tiles over j < jf, then (J % R > 0) a tail tile read
    from js = J - R (J >= R: never past the run's end, so x can be read in place) or from 0
    (J < R: the band's slack is read past the run), held in partial rows jf .. jf + R:
    (jf, js), js = -1 without a tail."""
    jf = J // R * R
    return jf, (-1 if jf == J else max(J - R, 0))


@njit(parallel=True, cache=True)
def merge_partials(part, dw, IC):
    """dw[oc, kh, kw, ic] = sum_t part[t, kh, row(kw*IC + ic), oc], row(j) = j in the full
    tiles, jf + j - js in the tail (see `tail`)."""
    OC, KH, KW, _ = dw.shape
    jf, js = tail(KW * IC)
    for oc in prange(OC):
        for kh in range(KH):
            for j in range(KW * IC):
                row = j if j < jf else jf + j - js
                acc = np.float32(0.0)
                for t in range(part.shape[0]):
                    acc += part[t, kh, row, oc]
                dw[oc, kh, j // IC, j % IC] = acc


@hooked
def make_direct_backward_weights(prologue_x=identity_prologue, prologue_dy=identity_prologue):
    """The direct kernel with both prologues compiled in; memoized."""

    @njit(parallel=True, fastmath=True, cache=True)
    def kernel(x1, N, H, Wd, IC, xps, dy1, OH, OW, OC, yps, KH, KW, s, p, part, rb, direct_x,
               direct_y, px_args, pdy_args, nt):
        J = KW * IC
        jf, js = tail(J)
        JR = jf + R
        OCp = part.shape[3]
        nrb = (OH + rb - 1) // rb
        nblocks = N * nrb
        BW = (OW - 1) * s + KW         # band columns: iw = -p .. BW - 1 - p
        BH = (rb - 1) * s + KH         # band rows of a full block
        for tid in prange(nt):
            pt = part[tid].reshape(part[tid].size)
            pt[:] = 0.0
            xb = np.zeros(1 if direct_x else BH * BW * IC + R, np.float32)
            yb = np.zeros(1 if direct_y else rb * OW * OCp, np.float32)
            for blk in range(tid * nblocks // nt, (tid + 1) * nblocks // nt):
                n = blk // nrb
                oh0 = (blk - n * nrb) * rb
                nr = min(rb, OH - oh0)
                if direct_x:  # 1x1, no padding: x's own pixels
                    xa = x1
                    xi = (n * H + oh0 * s) * Wd * xps
                    xrs = s * Wd * xps
                    xcs = s * xps
                    xks = 0
                else:  # band rows ih = oh0*s - p + b, columns iw = -p .., prologue applied
                    for b in range((nr - 1) * s + KH):
                        ih = oh0 * s - p + b
                        o = b * BW * IC
                        if ih < 0 or ih >= H:
                            xb[o:o + BW * IC] = 0.0
                            continue
                        for bc in range(BW):
                            iw = bc - p
                            if iw < 0 or iw >= Wd:
                                xb[o + bc * IC:o + (bc + 1) * IC] = 0.0
                                continue
                            src = ((n * H + ih) * Wd + iw) * xps
                            d = o + bc * IC
                            for c in range(IC):
                                i = np.uint64(src + c)
                                xb[np.uint64(d + c)] = prologue_x(x1[i], i, np.uint64(c),
                                                                  px_args)
                    xa = xb
                    xi = 0
                    xrs = s * BW * IC
                    xcs = s * IC
                    xks = BW * IC
                if direct_y:
                    ya = dy1
                    yi = (n * OH + oh0) * OW * yps
                    yrs = OW * yps
                    ycs = yps
                else:  # the gradient formed once per element, OC padded to OCp with zeros
                    for q in range(nr * OW):
                        src = ((n * OH + oh0) * OW + q) * yps
                        d = q * OCp
                        for c in range(OC):
                            i = np.uint64(src + c)
                            yb[np.uint64(d + c)] = prologue_dy(dy1[i], i, np.uint64(c),
                                                               pdy_args)
                    ya = yb
                    yi = 0
                    yrs = OW * OCp
                    ycs = OCp
                # x chunks of JC floats of the run (L2) outermost, dy's OB-channel slabs (L1)
                # next: each operand is reused from its cache level
                for kh in range(KH):
                    for jc in range(0, jf + R, JC):
                        for ob in range(0, OCp, OB):
                            for j0 in range(jc, min(jc + JC, jf + R), R):
                                if j0 == jf and js < 0:  # no tail
                                    break
                                j = j0 if j0 < jf else js
                                tile(nr, OW, xa, xi + kh * xks + j, xrs, xcs, ya, yi + ob, yrs,
                                     ycs, pt, (kh * JR + j0) * OCp + ob, OCp)

    def conv_backward_weights_direct(x, dy, dw, stride, pad, px_args=(), pdy_args=(),
                                     ntasks=None):
        nt = ntasks or get_num_threads()
        OC, KH, KW, IC = dw.shape
        n, h, w, _ = x.shape
        _, oh, ow, _ = dy.shape
        (xf, xps), (yf, yps) = pixels(x), pixels(dy)
        direct_x = prologue_x is identity_prologue and KH == KW == 1 and pad == 0 and IC >= R
        direct_y = prologue_dy is identity_prologue and OC % OB == 0
        ocp = -(-OC // OB) * OB
        part = np.empty((nt, KH, tail(KW * IC)[0] + R, ocp), np.float32)
        rb = block_rows(oh, ow, part[0].size)
        kernel(xf, n, h, w, IC, xps, yf, oh, ow, OC, yps, KH, KW, stride, pad, part, rb,
               direct_x, direct_y, px_args, pdy_args, nt)
        merge_partials(part, dw, IC)

    return conv_backward_weights_direct
