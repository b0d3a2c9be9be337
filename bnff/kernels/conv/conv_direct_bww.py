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
within the host's vector registers (R = 12 at 16 lanes with 32 registers, 2 at 8 lanes
with 16).

Bands. Per task and per block of rb output rows of one image, x's rows ih = oh0*s - p ..
are copied into a per-task band, zero in the padding, `prologue_x` applied once per element
(the recomputed BN+ReLU of the fused schedules), so the tile has no edge cases; a run read
past its end (J not a multiple of R) reads the band's next floats into partial rows j >= J,
never stored. dy's rows are read in place when no prologue applies and OC is a multiple of
OB; otherwise (`prologue_dy`, the BN input gradient a*dy + p*x' + q formed once per element,
or an odd OC) the block's rows are copied into a dy band with OC padded to OB with zeros.
A 1x1 conv without padding or prologue reads x in place too (its run is one pixel's channels,
read with x's pixel stride), when IC is a multiple of R.

Tasks split the blocks (contiguous ranges) and reduce into their own partials [KH, J + R, OCp]
(oc fastest: the tile's vector stores); the partials are summed and transposed into OHWI at the
end. x and dy may be channel slices of wider buffers (conv_common.pixels).

`make_direct_backward_weights(prologue_x, prologue_dy)` returns
    conv(x, dy, dw, stride, pad, px_args=(), pdy_args=(), ntasks=None)
(conv_common hook signature: prologue_x's idx indexes x's flat view, prologue_dy's dy's).
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from bnff.engine.vec import W, vadd, vbroadcast, vfma, vload, vstore, vzero
from bnff.kernels.conv.conv_common import identity_prologue, pixels, stable

V = max(1, 32 // W)           # dy vectors per tile row: OB = 32 output channels
OB = V * W
VREGS = 32 if W == 16 else 16  # TODO(vec width): from bnff.engine.vec once merged
R = min(12, (VREGS - V - 1) // V)
PIX = 112                      # pixels per block (about): dy block of OB channels in L1


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


def block_rows(oh, ow):
    """Output rows per block: about PIX pixels, no more than the image has."""
    return max(1, min(oh, -(-PIX // ow)))


@njit(parallel=True, cache=True)
def merge_partials(part, dw, IC):
    """dw[oc, kh, kw, ic] = sum_t part[t, kh, kw*IC + ic, oc]."""
    OC, KH, KW, _ = dw.shape
    for oc in prange(OC):
        for kh in range(KH):
            for j in range(KW * IC):
                acc = np.float32(0.0)
                for t in range(part.shape[0]):
                    acc += part[t, kh, j, oc]
                dw[oc, kh, j // IC, j % IC] = acc


_cache: dict = {}


def make_direct_backward_weights(prologue_x=identity_prologue, prologue_dy=identity_prologue):
    """The direct kernel with both prologues compiled in; memoized."""
    key = (prologue_x, prologue_dy)
    if key in _cache:
        return _cache[key]
    stable(prologue_x)
    stable(prologue_dy)

    @njit(parallel=True, fastmath=True, cache=True)
    def kernel(x1, N, H, Wd, IC, xps, dy1, OH, OW, OC, yps, KH, KW, s, p, part, rb, direct_x,
               direct_y, px_args, pdy_args, nt):
        J = KW * IC
        JR = J + R
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
                for ob in range(0, OCp, OB):
                    for kh in range(KH):
                        for j0 in range(0, J, R):
                            tile(nr, OW, xa, xi + kh * xks + j0, xrs, xcs, ya, yi + ob, yrs,
                                 ycs, pt, (kh * JR + j0) * OCp + ob, OCp)

    def conv_backward_weights_direct(x, dy, dw, stride, pad, px_args=(), pdy_args=(),
                                     ntasks=None):
        nt = ntasks or get_num_threads()
        OC, KH, KW, IC = dw.shape
        n, h, w, _ = x.shape
        _, oh, ow, _ = dy.shape
        (xf, xps), (yf, yps) = pixels(x), pixels(dy)
        direct_x = prologue_x is identity_prologue and KH == KW == 1 and pad == 0 and \
            IC % R == 0
        direct_y = prologue_dy is identity_prologue and OC % OB == 0
        ocp = -(-OC // OB) * OB
        part = np.empty((nt, KH, KW * IC + R, ocp), np.float32)
        rb = block_rows(oh, ow)
        kernel(xf, n, h, w, IC, xps, yf, oh, ow, OC, yps, KH, KW, stride, pad, part, rb,
               direct_x, direct_y, px_args, pdy_args, nt)
        merge_partials(part, dw, IC)

    _cache[key] = conv_backward_weights_direct
    return conv_backward_weights_direct
