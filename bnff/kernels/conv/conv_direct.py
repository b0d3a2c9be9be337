"""The direct convolution engine (conv forward, and backward-data of a stride-1 conv), NHWC
activations, weights packed in NR-wide panels of destination channels:

    dst[n, i, j, d] (+)= sum_{kh, kw, c} src[n, i*s - ph + kh, j*s - pw + kw, c] * B[(kh, kw, c), d]

with src zero outside the image. No im2col: the register tile reads its activations straight
from NHWC rows (Georganas et al., SC18; Zhang et al., ICML 2018: a tile of output pixels of
one row x a block of output channels, the reduction over taps and input channels innermost,
the inputs broadcast from the row and the weights loaded as vectors).

Register tile. RP = 7 consecutive output pixels of one row x NR = 2 W output channels
(bnff/engine/vec.py): 14 vector accumulators, 2 weight vectors and one broadcast, 17 of the
32 registers of AVX-512 (W = 16: 7 pixels x 32 channels, zmm). Where the register file holds
fewer than 17 W-lane vectors (AVX2), RP = 6 (the GEMM's 12 accumulators). Seven because every
spatial size of DenseNet-121 and ResNet-50 at 224 (112, 56, 28, 14, 7) is a multiple of it,
so no tile is partial there; a partial tile (odd sizes, other images) runs in full into a
scratch tile and copies its valid part out. Each reduction step (one tap, one input channel)
loads 2 weight vectors and broadcasts RP inputs for 2 RP FMAs.

The band. Per task, the source rows the current block of output rows needs are staged in a
ring of NS rows, each zero-padded left and right to the columns the tiles read (so the
micro-kernel has no edge cases), with the prologue applied as each element is written: once
per element however many taps read it (a 3x3 conv normalizes each element once, not nine
times), and rows shared by consecutive blocks stay in the ring. In a band row the KW taps of
one kernel row are one contiguous run of KW*C floats, so the reduction is KH runs. Plain 1x1
convs use the band too: reading their tiles straight from the source instead was never faster
and up to 17 % slower (DenseNet's 1x1 160->128 at 56x56, batch 16: 137 vs 164 GFLOP/s on one
thread, 205 vs 214 on two; 2-vCPU AMD EPYC znver5).

Loops, per task (a chunk of output rows of one image; tasks are whole images when there are
at least as many images as threads): per block of RB output rows (the band within
BAND_FLOATS), load its new source rows; then per panel of NR destination channels (its
weights, K x NR floats, stay in L2 while the block's rows pass), per row, per tile of RP
pixels. The epilogue runs once per (row, panel), while the row is in L1/L2: the hook's
`rows` are the row's pixels (conv_common's epilogue signature, mr = the row's width).

Measured (`python -m bnff.kernels.conv.conv_direct_timing --reps 7`, NUMBA_NUM_THREADS and
OPENBLAS_NUM_THREADS = 1 or 2, batch 16, every shape validated first; 2-vCPU AMD EPYC, znver5,
AVX-512 with 2 x 512-bit FMA per cycle, so a kernel can pass numpy's OpenBLAS sgemm, which
reached 115 GFLOP/s on 1 thread and 207 on 2 in the same runs). GFLOP/s direct / im2col:

    shape (forward unless noted)            1 thread      2 threads
    DenseNet 3x3 128->32 at 56              213 / 132     330 / 208
      backward-data                         226 / 166     393 / 285
    DenseNet 3x3 128->32 at 28              206 / 126     324 / 114
    DenseNet 3x3 128->32 at 14              217 / 134     276 / 187
    stem 7x7 3->64 stride 2                 211 /  93     339 / 127
    DenseNet 1x1 160->128 at 56             167 / 155     296 / 217
    DenseNet 1x1 256->128 at 56             172 / 124     212 / 151
    ResNet 3x3 64->64 at 56                 211 / 153     361 / 225
    ResNet 1x1 256->64 at 56                146 /  87     227 / 109
    ResNet 1x1 512->128 at 28               165 /  89     320 / 154

The run-to-run spread on this shared VM is 10-20 %; compare within a line.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnff.engine.gemm import NR
from bnff.engine.vec import VREGS, W, vadd, vbroadcast, vfma, vload, vstore, vzero
from bnff.kernels.conv.conv_common import hooked, identity_epilogue, identity_prologue

RP = 7 if VREGS >= 7 * 2 + 3 else 6  # output pixels per register tile (x 2 vectors)
BAND_FLOATS = 64 * 1024  # ring of source rows per task: 256 KiB, in L2 beside the weights
WEIGHT_FLOATS = 128 * 1024  # weights kept in L2 across a pass: 512 KiB


@njit(fastmath=True, inline="always")
def ukernel(s, rb, nk, b0, L, ps, wp, wi, dst, o, dps, acc):
    """dst[o + r*dps + j] (+)= sum_{k < nk, q < L} s[rb[k] + b0 + r*ps + q] * wp[wi + (k*L + q)*NR + j]
    for pixels r < RP, channels j < NR (W = NR/2 lanes per vector)."""
    c00 = vzero(); c01 = vzero(); c10 = vzero(); c11 = vzero(); c20 = vzero(); c21 = vzero()
    c30 = vzero(); c31 = vzero(); c40 = vzero(); c41 = vzero(); c50 = vzero(); c51 = vzero()
    c60 = vzero(); c61 = vzero()
    for k in range(nk):
        p = rb[k] + b0
        for q in range(L):
            w0 = vload(wp, wi)
            w1 = vload(wp, wi + W)
            a = vbroadcast(s, p + q)
            c00 = vfma(a, w0, c00); c01 = vfma(a, w1, c01)
            a = vbroadcast(s, p + ps + q)
            c10 = vfma(a, w0, c10); c11 = vfma(a, w1, c11)
            a = vbroadcast(s, p + 2 * ps + q)
            c20 = vfma(a, w0, c20); c21 = vfma(a, w1, c21)
            a = vbroadcast(s, p + 3 * ps + q)
            c30 = vfma(a, w0, c30); c31 = vfma(a, w1, c31)
            a = vbroadcast(s, p + 4 * ps + q)
            c40 = vfma(a, w0, c40); c41 = vfma(a, w1, c41)
            a = vbroadcast(s, p + 5 * ps + q)
            c50 = vfma(a, w0, c50); c51 = vfma(a, w1, c51)
            if RP == 7:
                a = vbroadcast(s, p + 6 * ps + q)
                c60 = vfma(a, w0, c60); c61 = vfma(a, w1, c61)
            wi += NR
    if acc:
        c00 = vadd(c00, vload(dst, o)); c01 = vadd(c01, vload(dst, o + W))
        c10 = vadd(c10, vload(dst, o + dps)); c11 = vadd(c11, vload(dst, o + dps + W))
        c20 = vadd(c20, vload(dst, o + 2 * dps)); c21 = vadd(c21, vload(dst, o + 2 * dps + W))
        c30 = vadd(c30, vload(dst, o + 3 * dps)); c31 = vadd(c31, vload(dst, o + 3 * dps + W))
        c40 = vadd(c40, vload(dst, o + 4 * dps)); c41 = vadd(c41, vload(dst, o + 4 * dps + W))
        c50 = vadd(c50, vload(dst, o + 5 * dps)); c51 = vadd(c51, vload(dst, o + 5 * dps + W))
        if RP == 7:
            c60 = vadd(c60, vload(dst, o + 6 * dps)); c61 = vadd(c61, vload(dst, o + 6 * dps + W))
    vstore(dst, o, c00); vstore(dst, o + W, c01)
    vstore(dst, o + dps, c10); vstore(dst, o + dps + W, c11)
    vstore(dst, o + 2 * dps, c20); vstore(dst, o + 2 * dps + W, c21)
    vstore(dst, o + 3 * dps, c30); vstore(dst, o + 3 * dps + W, c31)
    vstore(dst, o + 4 * dps, c40); vstore(dst, o + 4 * dps + W, c41)
    vstore(dst, o + 5 * dps, c50); vstore(dst, o + 5 * dps + W, c51)
    if RP == 7:
        vstore(dst, o + 6 * dps, c60); vstore(dst, o + 6 * dps + W, c61)


def pack_panels(b):
    """B^T as b[d, k] (row d = one destination channel) -> [ceil(D / NR), k, NR] float32,
    zero past D: the weight panels the engine reads."""
    d, k = b.shape
    bp = np.zeros(((d + NR - 1) // NR * NR, k), np.float32)
    bp[:d] = b
    return np.ascontiguousarray(bp.reshape(-1, NR, k).transpose(0, 2, 1))


@hooked
def make_direct(prologue=identity_prologue, epilogue=identity_epilogue):
    """The direct engine with `prologue` (on src) and `epilogue` (on dst rows) compiled in
    (conv_common hook signatures), memoized and cached on disk."""

    @njit(parallel=True, fastmath=True, cache=True)
    def direct(src1, N, SH, SW, CS, sps, dst1, DH, DW, CD, dps, acc, wp, KH, KW, stride, ph, pw,
               pro_args, epi_args, nt):
        """dst (+)= the conv of src with panels wp ([npan, KH*KW*CS, NR]); src and dst flat with
        pixel strides sps, dps (conv_common.pixels)."""
        npan = wp.shape[0]
        ntile = (DW + RP - 1) // RP
        BW = (ntile * RP - 1) * stride + KW      # band columns: every column a tile reads
        rowb = BW * CS                           # floats per band row
        RB = max(1, min(DH, (BAND_FLOATS // max(rowb, 1) - KH) // stride + 1))
        NS = (RB - 1) * stride + KH              # ring slots: the rows one block reads
        cpi = min(DH, (nt + N - 1) // N)         # row chunks per image
        L = KW * CS                              # floats per kernel row of the reduction
        ps = stride * CS                         # band floats between a tile's pixels
        K = KH * KW * CS
        # panels per pass over a tile's inputs: all when the weights fit in L2 beside the band
        # (the tile's inputs then stay in L1 across the panels), else one (its weights stay in
        # L2 while the block's rows pass)
        gsz = npan if npan * K * NR <= WEIGHT_FLOATS else 1
        for tid in prange(nt):
            ring = np.empty(NS * rowb, np.float32)
            rb = np.empty(KH, np.int64)
            rows = np.empty(DW, np.int64)
            scratch = np.empty(RP * NR, np.float32)
            for u in range(tid, N * cpi, nt):
                n = u // cpi
                r0 = (u - n * cpi) * DH // cpi
                r1 = (u - n * cpi + 1) * DH // cpi
                hi = -(1 << 40)  # source rows below hi are in the ring
                for i0 in range(r0, r1, RB):
                    i1 = min(r1, i0 + RB)
                    top = (i1 - 1) * stride - ph + KH
                    for y in range(max(i0 * stride - ph, hi), top):
                        if KH < stride and (y + ph) % stride >= KH:
                            continue  # a row no tap reads (1x1 stride 2)
                        o = (y % NS) * rowb
                        if y < 0 or y >= SH:
                            ring[o:o + rowb] = 0.0
                            continue
                        xe = min(SW, BW - pw)
                        ring[o:o + pw * CS] = 0.0
                        for x in range(xe):
                            base = ((n * SH + y) * SW + x) * sps
                            ob = o + (x + pw) * CS
                            for c in range(CS):  # unsigned indices: no wraparound, SIMD
                                i = np.uint64(base + c)
                                ring[np.uint64(ob + c)] = prologue(src1[i], i, np.uint64(c),
                                                                   pro_args)
                        ring[o + (xe + pw) * CS:o + rowb] = 0.0
                    hi = top
                    for g0 in range(0, npan, gsz):
                        for i in range(i0, i1):
                            for kh in range(KH):
                                y = i * stride - ph + kh
                                rb[kh] = (y % NS) * rowb
                            drow = (n * DH + i) * DW
                            for t in range(ntile):
                                j0 = t * RP
                                b0 = j0 * ps
                                for jp in range(g0, min(npan, g0 + gsz)):
                                    c0 = jp * NR
                                    nc = min(NR, CD - c0)
                                    if j0 + RP <= DW and nc == NR:
                                        ukernel(ring, rb, KH, b0, L, ps, wp, jp * K * NR, dst1,
                                                (drow + j0) * dps + c0, dps, acc)
                                        continue
                                    ukernel(ring, rb, KH, b0, L, ps, wp, jp * K * NR, scratch, 0,
                                            NR, False)
                                    for r in range(min(RP, DW - j0)):
                                        o = (drow + j0 + r) * dps + c0
                                        for j in range(nc):
                                            if acc:
                                                dst1[o + j] += scratch[r * NR + j]
                                            else:
                                                dst1[o + j] = scratch[r * NR + j]
                            for j in range(DW):
                                rows[j] = drow + j
                            for jp in range(g0, min(npan, g0 + gsz)):
                                epilogue(dst1, dps, rows, DW, jp * NR, min(NR, CD - jp * NR),
                                         tid, epi_args)

    return direct
