"""The kernel calls of the BNFF lowerings (bnff/lowering/lower_bnff.py): the split BN pieces
of bnff/kernels/bn/bn_fused.py, and convs with BN hooks compiled in. A hook arrives as a
conv_common.Hook object (defined beside its function in bnff/kernels/conv/conv_common.py and
bnff/hooks/bnff_hooks.py), or None for none: the object says how its arguments are packed and
what bytes it adds. Same conventions as bnff/lowering/ops.py: each returns (kernel, args,
cost, stage)."""
from __future__ import annotations

import numba
import numpy as np

from bnff.lowering.ops import conv_shape, dims, on_view, stage_kernel
from bnff.kernels.bn import bn_fused, bn_scale, bn_stats
from bnff.kernels.conv import conv_bwd_data, conv_bwd_fused, conv_bwd_weights, conv_common, \
    conv_fwd, conv_bias, conv_hooked
from bnff.kernels.conv.conv_common import (BIAS, BIAS_SUMS, CHANNEL_SUMS, IDENTITY_EPILOGUE,
                                           IDENTITY_PROLOGUE)
from bnff.kernels.stage import F32, Cost
from bnff.lowering.plan import StageCall


def partials_shape(c):
    """Per-task float64 partial sums an epilogue accumulates: [max threads, C]."""
    return (numba.config.NUMBA_NUM_THREADS, c)


def stats_coeffs_call(x, mean, var, gamma, beta, a, b, eps, shape):
    """Sub-BN1 as its own pass (a producer that is not a conv): one stable pass over x for
    mean and var, then a = gamma * inv, b = beta - mean * a."""
    stats, cost, sc = stage_kernel(bn_stats.BNStats, dims(shape))
    c = shape[3]

    def fn(x, mean, var, gamma, beta, a, b):
        stats(x.reshape(-1, c), mean, var)
        bn_fused.bn_coefficients(mean, var, gamma, beta, eps, a, b)
    return fn, (x, mean, var, gamma, beta, a, b), cost, None  # bn_stats and [C] coefficients


def finalize_stats_call(s1, s2, mean, var, gamma, beta, a, b, eps, shape):
    """Sub-BN1's merge after a conv epilogue accumulated the per-task sums."""
    m, c = int(np.prod(shape[:3])), shape[3]

    def fn(s1, s2, mean, var, gamma, beta, a, b):
        nt = numba.get_num_threads()
        bn_fused.stats_from_sums(s1[:nt], s2[:nt], m, mean, var)
        bn_fused.bn_coefficients(mean, var, gamma, beta, eps, a, b)
    nt = numba.config.NUMBA_NUM_THREADS
    return fn, (s1, s2, mean, var, gamma, beta, a, b),\
        Cost(4 * nt * c, 2 * nt * c * 8, 4 * c * F32), None


def feature_stats_call(s1, s2, mean, var, shape):
    """bnff+: a block feature's mean and var (slices of the block's vectors) from the per-task
    sums its producing conv's epilogue accumulated."""
    m, c = int(np.prod(shape[:3])), shape[3]

    def fn(s1, s2, mean, var):
        nt = numba.get_num_threads()
        bn_fused.stats_from_sums(s1[:nt], s2[:nt], m, mean, var)
    nt = numba.config.NUMBA_NUM_THREADS
    return fn, (s1, s2, mean, var),\
        Cost(4 * nt * c, 2 * nt * c * 8, 2 * c * F32), None


def gathered_coeffs_call(bmean, bvar, off, mean, var, gamma, beta, a, b, eps, shape):
    """bnff+: a BN over channels off .. off+C of a block buffer takes their mean and var from
    the block's vectors (made once per feature) instead of a pass over its input."""
    c = shape[3]

    def fn(bmean, bvar, mean, var, gamma, beta, a, b):
        mean[:] = bmean[off:off + c]
        var[:] = bvar[off:off + c]
        bn_fused.bn_coefficients(mean, var, gamma, beta, eps, a, b)
    return fn, (bmean, bvar, mean, var, gamma, beta, a, b),\
        Cost(2 * c, 4 * c * F32, 4 * c * F32), None


def finalize_grads_call(s1, s2, mean, var, gamma, dgamma, dbeta, a, p, q, eps, shape):
    """dgamma, dbeta and the dx coefficients (dx = a*dy + p*x + q) from the sums of dy and
    dy*x, given per task ([T, C], from a conv epilogue) or merged ([C], from a pass)."""
    m, c = int(np.prod(shape[:3])), shape[3]

    def fn(s1, s2, mean, var, gamma, dgamma, dbeta, a, p, q):
        if s1.ndim == 2:
            nt = numba.get_num_threads()
            s1, s2 = s1[:nt].sum(axis=0), s2[:nt].sum(axis=0)
        bn_fused.bn_backward_coefficients(s1, s2, mean, var, gamma, eps, m, dgamma, dbeta,
                                          a, p, q)
    return fn, (s1, s2, mean, var, gamma, dgamma, dbeta, a, p, q),\
        Cost(8 * c, 4 * c * 8, 5 * c * F32), None


def _fused(stage, shape):
    return stage_kernel(getattr(bn_fused, stage), dims(shape))


def normalize_relu_call(x, a, b, y, shape):
    fn, cost, sc = _fused("BNReLU", shape)
    return on_view(fn, shape[3]), (x, a, b, y), cost, sc


def normalize_call(x, a, b, y, shape):
    """y = a*x + b with the coefficients already made (a BN not followed by a ReLU)."""
    fn, cost, sc = stage_kernel(bn_scale.BNScale, dims(shape))
    return on_view(fn, shape[3]), (x, a, b, y), cost, sc


def normalize_add_relu_call(x, a, b, s, y, shape):
    fn, cost, sc = _fused("BNAddReLU", shape)
    return on_view(fn, shape[3]), (x, a, b, s, y), cost, sc


def normalize2_add_relu_call(x1, a1, b1, x2, a2, b2, y, shape):
    fn, cost, sc = _fused("BN2AddReLU", shape)
    return on_view(fn, shape[3]), (x1, a1, b1, x2, a2, b2, y), cost, sc


def relu_mask_sums_call(dz, x, a, b, dy, s1, s2, shape):
    fn, cost, sc = _fused("ReLUMaskSums", shape)
    return on_view(fn, shape[3]), (dz, x, a, b, dy, s1, s2), cost, sc


def relu_mask_sums_z_call(dz, z, x, dy, s1, s2, shape):
    fn, cost, sc = _fused("ReLUMaskSumsZ", shape)
    return on_view(fn, shape[3]), (dz, z, x, dy, s1, s2), cost, sc


def dy_sums_call(dy, x, s1, s2, shape):
    fn, cost, sc = _fused("DYSums", shape)
    return on_view(fn, shape[3]), (dy, x, s1, s2), cost, sc


def bn_dx_call(dy, x, a, p, q, dx, shape, accumulate):
    fn, cost, sc = _fused("BNDxAdd" if accumulate else "BNDx", shape)
    return on_view(fn, shape[3]), (dy, x, a, p, q, dx), cost, sc


def bn_relu_dx_call(dz, x, af, bf, a, p, q, dx, shape, accumulate):
    """dx from an unmasked dz: the ReLU mask [af*x + bf > 0] applied on the fly."""
    fn, cost, sc = _fused("BNReLUDx", shape)
    if accumulate:  # no stage of its own: bn_relu_dx's cost plus the read of dx
        fn, sc = bn_fused.bn_relu_dx_add, None
        cost = cost + Cost(int(np.prod(shape)), int(np.prod(shape)) * F32, 0)
    return on_view(fn, shape[3]), (dz, x, af, bf, a, p, q, dx), cost, sc




def with_bias(node, epi, epi_args, bias):
    """A forward epilogue with the conv's bias added first when the node has one: None ->
    bias (args (bias,)), stats -> bias+stats (args (bias, s1, s2))."""
    if not node["bias"]:
        return epi, epi_args
    return (BIAS_SUMS if epi is CHANNEL_SUMS else BIAS), (bias,) + tuple(epi_args)


def conv_fwd_fused_call(x, w, y, xs, node, pro, pro_args, epi, epi_args):
    """Conv forward with normalize(+ReLU) of its input in the prologue (pro a Hook, pro_args =
    (a, b); x is then the pre-BN tensor) and/or BN statistics of its output in the epilogue
    (epi, epi_args = per-task partial sums s1, s2). None: no hook."""
    pro, epi = pro or IDENTITY_PROLOGUE, epi or IDENTITY_EPILOGUE
    kernel = conv_fwd.make_conv_forward(pro.fn, epi.fn)
    st = conv_hooked.ConvFwdHooked(conv_shape(xs, node), pro, epi).planned()
    s, p, npro = node["stride"], node["padding"], len(pro_args)

    def fn(x, w, y, *hooks):
        kernel(x, w, y, s, p, pro.args(hooks[:npro]), epi.args(hooks[npro:]),
               numba.get_num_threads())
    return fn, (x, w, y) + tuple(pro_args) + tuple(epi_args), st.cost(st.default), \
        StageCall(st.name, st.descriptor(), st.default)


def conv_bwd_data_fused_call(dy, w, dx, xs, node, pro, pro_args, epi, epi_args,
                             accumulate=False):
    """Conv backward-data forming its incoming gradient in the prologue (pro = BN_GRAD,
    pro_args = (x', a, p, q), or BN_RELU_GRAD, (x', af, bf, a, p, q)) and/or summing its
    masked output per channel in the epilogue (epi = RELU_SUMS, epi_args = (x, a, b, s1, s2);
    or SUMS: (x, s1, s2)); the output itself is left as computed, or added to dx."""
    pro, epi = pro or IDENTITY_PROLOGUE, epi or IDENTITY_EPILOGUE
    kernel = conv_bwd_data.make_conv_backward_data(pro.fn, epi.fn)
    st = conv_hooked.ConvBwdDataHooked(conv_shape(xs, node), pro, epi, accumulate).planned()
    cost, sc = st.cost(st.default), StageCall(st.name, st.descriptor(), st.default)
    s, p, npro = node["stride"], node["padding"], len(pro_args)

    def fn(dy, w, dx, *hooks):
        kernel(dy, w, dx, s, p, pro.args(hooks[:npro]), epi.args(hooks[npro:]),
               numba.get_num_threads(), accumulate)
    return fn, (dy, w, dx) + tuple(pro_args) + tuple(epi_args), cost, sc


def conv_bwd_1x1_fused_call(x, dy, w, dx, dw, xs, node, pro_x, px_args, pro_dy, pdy_args,
                            epi, epi_args, accumulate):
    """Both gradients of a 1x1 conv in one pass over dy (conv_bwd_fused), with the hooks of
    conv_bwd_data_fused_call and conv_bwd_weights_fused_call."""
    pro_x, pro_dy = pro_x or IDENTITY_PROLOGUE, pro_dy or IDENTITY_PROLOGUE
    epi = epi or IDENTITY_EPILOGUE
    kernel = conv_bwd_fused.make_conv_backward_1x1(pro_dy.fn, pro_x.fn, epi.fn)
    st = conv_hooked.ConvBwd1x1Hooked(conv_shape(xs, node), pro_x, pro_dy, epi,
                                      accumulate).planned()
    s, npx, npdy = node["stride"], len(px_args), len(pdy_args)

    def fn(x, dy, w, dx, dw, *hooks):
        kernel(x, dy, w, dx, dw, s, pro_dy.args(hooks[npx:npx + npdy]),
               pro_x.args(hooks[:npx]), epi.args(hooks[npx + npdy:]),
               numba.get_num_threads(), accumulate)
    return fn, (x, dy, w, dx, dw) + tuple(px_args) + tuple(pdy_args) + tuple(epi_args), \
        st.cost(st.default), StageCall(st.name, st.descriptor(), st.default)


def conv_bwd_weights_fused_call(x, dy, dw, xs, node, pro_x, px_args, pro_dy, pdy_args):
    """Conv backward-weights recomputing its input in one prologue (normalize+ReLU of the
    pre-BN tensor) and forming its incoming gradient in the other (BN_GRAD, BN_RELU_GRAD)."""
    pro_x, pro_dy = pro_x or IDENTITY_PROLOGUE, pro_dy or IDENTITY_PROLOGUE
    kernel = conv_bwd_weights.make_conv_backward_weights(pro_x.fn, pro_dy.fn)
    st = conv_hooked.ConvBwdWeightsHooked(conv_shape(xs, node), pro_x, pro_dy).planned()
    s, p, nx = node["stride"], node["padding"], len(px_args)

    def fn(x, dy, dw, *hooks):
        kernel(x, dy, dw, s, p, pro_x.args(hooks[:nx]), pro_dy.args(hooks[nx:]),
               numba.get_num_threads())
    return fn, (x, dy, dw) + tuple(px_args) + tuple(pdy_args), st.cost(st.default), \
        StageCall(st.name, st.descriptor(), st.default)


def conv_out_shape(xs, node):
    n, h, w, _ = xs
    o = lambda i: conv_common.out_size(i, node["kernel"], node["stride"], node["padding"])
    return (n, o(h), o(w), node["out_channels"])


def bias_grad_call(dy, db, shape):
    """A conv's bias gradient as one reduction pass over its output gradient dy."""
    _, cost, sc = stage_kernel(conv_bias.ConvBiasBackward, dims(shape))
    return on_view(conv_bias.bias_grad, shape[3]), (dy, db), cost, sc


def bias_grad_bn_call(a, p, q, dbeta, mean, db, shape):
    """A conv's bias gradient from the sums of the BN it alone feeds (conv_bias.bias_grad_bn),
    when that BN's dx is formed in the conv's backward prologues and never written."""
    m, c = int(np.prod(shape[:3])), shape[3]
    fn = lambda a, p, q, dbeta, mean, db: conv_bias.bias_grad_bn(a, p, q, dbeta, mean, m, db)
    return fn, (a, p, q, dbeta, mean, db), Cost(4 * c, 5 * c * F32, c * F32), None
