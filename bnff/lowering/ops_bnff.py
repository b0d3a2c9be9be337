"""The kernel calls of the BNFF lowerings (bnff/lowering/lower_bnff.py): the split BN pieces of
bnff/kernels/bn/bn_fused.py and convs with BN hooks (bnff/hooks/bnff_hooks.py, bnff/kernels/conv/conv_common.py)
compiled in. Same conventions as bnff/lowering/ops.py: each returns (kernel, args, cost)."""
from __future__ import annotations

import numba
import numpy as np

from bnff.lowering.ops import conv_shape, default_kernel, dims, on_view
from bnff.kernels.bn import bn_fused, bn_scale, bn_stats
from bnff.hooks import bnff_hooks
from bnff.kernels.conv import (conv_bias, conv_bwd_data, conv_bwd_fused, conv_bwd_weights,
                               conv_common, conv_fwd)
from bnff.kernels.stage import F32, Cost


def partials_shape(c):
    """Per-task float64 partial sums an epilogue accumulates: [max threads, C]."""
    return (numba.config.NUMBA_NUM_THREADS, c)


def stats_coeffs_call(x, mean, var, gamma, beta, a, b, eps, shape):
    """Sub-BN1 as its own pass (a producer that is not a conv): one stable pass over x for
    mean and var, then a = gamma * inv, b = beta - mean * a."""
    stats, cost = default_kernel(bn_stats.BNStats, dims(shape))
    c = shape[3]

    def fn(x, mean, var, gamma, beta, a, b):
        stats(x.reshape(-1, c), mean, var)
        bn_fused.bn_coefficients(mean, var, gamma, beta, eps, a, b)
    return fn, (x, mean, var, gamma, beta, a, b), cost


def finalize_stats_call(s1, s2, mean, var, gamma, beta, a, b, eps, shape):
    """Sub-BN1's merge after a conv epilogue accumulated the per-task sums."""
    m, c = int(np.prod(shape[:3])), shape[3]

    def fn(s1, s2, mean, var, gamma, beta, a, b):
        nt = numba.get_num_threads()
        bn_fused.stats_from_sums(s1[:nt], s2[:nt], m, mean, var)
        bn_fused.bn_coefficients(mean, var, gamma, beta, eps, a, b)
    nt = numba.config.NUMBA_NUM_THREADS
    return fn, (s1, s2, mean, var, gamma, beta, a, b), Cost(4 * nt * c, 2 * nt * c * 8, 4 * c * F32)


def feature_stats_call(s1, s2, mean, var, shape):
    """bnff+: a block feature's mean and var (slices of the block's vectors) from the per-task
    sums its producing conv's epilogue accumulated."""
    m, c = int(np.prod(shape[:3])), shape[3]

    def fn(s1, s2, mean, var):
        nt = numba.get_num_threads()
        bn_fused.stats_from_sums(s1[:nt], s2[:nt], m, mean, var)
    nt = numba.config.NUMBA_NUM_THREADS
    return fn, (s1, s2, mean, var), Cost(4 * nt * c, 2 * nt * c * 8, 2 * c * F32)


def gathered_coeffs_call(bmean, bvar, off, mean, var, gamma, beta, a, b, eps, shape):
    """bnff+: a BN over channels off .. off+C of a block buffer takes their mean and var from
    the block's vectors (made once per feature) instead of a pass over its input."""
    c = shape[3]

    def fn(bmean, bvar, mean, var, gamma, beta, a, b):
        mean[:] = bmean[off:off + c]
        var[:] = bvar[off:off + c]
        bn_fused.bn_coefficients(mean, var, gamma, beta, eps, a, b)
    return fn, (bmean, bvar, mean, var, gamma, beta, a, b), Cost(2 * c, 4 * c * F32, 4 * c * F32)


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
    return fn, (s1, s2, mean, var, gamma, dgamma, dbeta, a, p, q), Cost(8 * c, 4 * c * 8, 5 * c * F32)


def _fused(stage, shape):
    st = getattr(bn_fused, stage)(dims(shape))
    return st.variants[st.default], st.cost(st.default)


def normalize_relu_call(x, a, b, y, shape):
    fn, cost = _fused("BNReLU", shape)
    return on_view(fn, shape[3]), (x, a, b, y), cost


def normalize_call(x, a, b, y, shape):
    """y = a*x + b with the coefficients already made (a BN not followed by a ReLU)."""
    fn, cost = default_kernel(bn_scale.BNScale, dims(shape))
    return on_view(fn, shape[3]), (x, a, b, y), cost


def normalize_add_relu_call(x, a, b, s, y, shape):
    fn, cost = _fused("BNAddReLU", shape)
    return on_view(fn, shape[3]), (x, a, b, s, y), cost


def normalize2_add_relu_call(x1, a1, b1, x2, a2, b2, y, shape):
    fn, cost = _fused("BN2AddReLU", shape)
    return on_view(fn, shape[3]), (x1, a1, b1, x2, a2, b2, y), cost


def relu_mask_sums_call(dz, x, a, b, dy, s1, s2, shape):
    fn, cost = _fused("ReLUMaskSums", shape)
    return on_view(fn, shape[3]), (dz, x, a, b, dy, s1, s2), cost


def relu_mask_sums_z_call(dz, z, x, dy, s1, s2, shape):
    fn, cost = _fused("ReLUMaskSumsZ", shape)
    return on_view(fn, shape[3]), (dz, z, x, dy, s1, s2), cost


def dy_sums_call(dy, x, s1, s2, shape):
    fn, cost = _fused("DYSums", shape)
    return on_view(fn, shape[3]), (dy, x, s1, s2), cost


def bn_dx_call(dy, x, a, p, q, dx, shape, accumulate):
    fn, cost = _fused("BNDxAdd" if accumulate else "BNDx", shape)
    return on_view(fn, shape[3]), (dy, x, a, p, q, dx), cost


def bn_relu_dx_call(dz, x, af, bf, a, p, q, dx, shape, accumulate):
    """dx from an unmasked dz: the ReLU mask [af*x + bf > 0] applied on the fly."""
    _, cost = _fused("BNReLUDx", shape)
    fn = bn_fused.bn_relu_dx_add if accumulate else bn_fused.bn_relu_dx
    if accumulate:
        cost = cost + Cost(int(np.prod(shape)), int(np.prod(shape)) * F32, 0)
    return on_view(fn, shape[3]), (dz, x, af, bf, a, p, q, dx), cost


PROLOGUES = {None: conv_common.identity_prologue, "bn": bnff_hooks.bn_prologue,
             "bn_relu": conv_common.bn_relu_prologue, "bn_grad": conv_common.bn_grad_prologue,
             "bn_relu_grad": bnff_hooks.bn_relu_grad_prologue}
EPILOGUES = {None: conv_common.identity_epilogue, "stats": conv_common.channel_sums_epilogue,
             "relu_sums": bnff_hooks.relu_sums_epilogue, "sums": bnff_hooks.sums_epilogue,
             "bias": conv_common.bias_epilogue, "bias+stats": conv_common.bias_sums_epilogue}
READS_X = ("bn_grad", "bn_relu_grad", "relu_sums", "sums")  # hooks reading the pre-BN tensor


def _hook_args(kind, arrays):
    """The hook's args tuple from the step's arrays: bn_grad indexes its pre-BN tensor flat,
    the epilogues read it as (flat, pixel stride) (conv_common, bnff_hooks)."""
    if kind in ("bn_grad", "bn_relu_grad"):
        return (arrays[0].reshape(-1),) + tuple(arrays[1:])
    if kind in ("relu_sums", "sums"):
        return conv_common.pixels(arrays[0]) + tuple(arrays[1:])
    return tuple(arrays)


def _hook_bytes(kind, shape):
    """Main-memory bytes a hook adds: the pre-BN tensor it reads beside the conv's operand."""
    return int(np.prod(shape)) * F32 if kind in READS_X else 0


def with_bias(node, epi, epi_args, bias):
    """A forward epilogue with the conv's bias added first when the node has one: None ->
    bias (args (bias,)), stats -> bias+stats (args (bias, s1, s2))."""
    if not node["bias"]:
        return epi, epi_args
    return ("bias+stats" if epi == "stats" else "bias"), (bias,) + tuple(epi_args)


def conv_fwd_fused_call(x, w, y, xs, node, pro, pro_args, epi, epi_args):
    """Conv forward with normalize(+ReLU) of its input in the prologue (pro_args = (a, b);
    x is then the pre-BN tensor) and/or in the epilogue the conv's bias (epi_args starting
    with it, see with_bias) and BN statistics of its output (the per-task float64 partial
    sums s1, s2, zeroed here)."""
    kernel = conv_fwd.make_conv_forward(PROLOGUES[pro], EPILOGUES[epi])
    _, cost = default_kernel(conv_fwd.ConvForward, conv_shape(xs, node))
    s, p, npro = node["stride"], node["padding"], len(pro_args)

    def fn(x, w, y, *hooks):
        for part in hooks[npro:]:
            if part.dtype == np.float64:
                part[...] = 0.0
        kernel(x, w, y, s, p, _hook_args(pro, hooks[:npro]), _hook_args(epi, hooks[npro:]),
               numba.get_num_threads())
    return fn, (x, w, y) + tuple(pro_args) + tuple(epi_args), cost


def conv_bwd_data_fused_call(dy, w, dx, xs, node, pro, pro_args, epi, epi_args,
                             accumulate=False):
    """Conv backward-data forming its incoming gradient in the prologue (pro = bn_grad,
    pro_args = (x', a, p, q), or bn_relu_grad, (x', af, bf, a, p, q)) and/or summing its
    masked output per channel in the epilogue (epi = relu_sums, epi_args = (x, a, b, s1, s2);
    or sums: (x, s1, s2)); the output itself is left as computed, or added to dx."""
    kernel = conv_bwd_data.make_conv_backward_data(PROLOGUES[pro], EPILOGUES[epi])
    _, cost = default_kernel(conv_bwd_data.ConvBackwardData, conv_shape(xs, node))
    ys = conv_out_shape(xs, node)
    cost = cost + Cost(0, _hook_bytes(pro, ys) + _hook_bytes(epi, xs), 0)
    if accumulate:
        cost = cost + Cost(int(np.prod(xs)), int(np.prod(xs)) * F32, 0)
    s, p, npro = node["stride"], node["padding"], len(pro_args)

    def fn(dy, w, dx, *hooks):
        if epi:
            for part in hooks[-2:]:
                part[...] = 0.0
        kernel(dy, w, dx, s, p, _hook_args(pro, hooks[:npro]), _hook_args(epi, hooks[npro:]),
               numba.get_num_threads(), accumulate)
    return fn, (dy, w, dx) + tuple(pro_args) + tuple(epi_args), cost


def conv_bwd_1x1_fused_call(x, dy, w, dx, dw, xs, node, pro_x, px_args, pro_dy, pdy_args,
                            epi, epi_args, accumulate):
    """Both gradients of a 1x1 conv in one pass over dy (conv_bwd_fused), with the hooks of
    conv_bwd_data_fused_call and conv_bwd_weights_fused_call."""
    kernel = conv_bwd_fused.make_conv_backward_1x1(PROLOGUES[pro_dy], PROLOGUES[pro_x],
                                                   EPILOGUES[epi])
    ys = conv_out_shape(xs, node)
    cost = conv_bwd_fused.ConvBackward1x1(conv_shape(xs, node)).cost("one_pass")
    cost = cost + Cost(0, _hook_bytes(pro_dy, ys) + _hook_bytes(epi, xs), 0)
    if accumulate:
        cost = cost + Cost(int(np.prod(xs)), int(np.prod(xs)) * F32, 0)
    s, npx, npdy = node["stride"], len(px_args), len(pdy_args)

    def fn(x, dy, w, dx, dw, *hooks):
        if epi:
            for part in hooks[-2:]:
                part[...] = 0.0
        kernel(x, dy, w, dx, dw, s, _hook_args(pro_dy, hooks[npx:npx + npdy]),
               _hook_args(pro_x, hooks[:npx]), _hook_args(epi, hooks[npx + npdy:]),
               numba.get_num_threads(), accumulate)
    return fn, (x, dy, w, dx, dw) + tuple(px_args) + tuple(pdy_args) + tuple(epi_args), cost


def conv_bwd_weights_fused_call(x, dy, dw, xs, node, pro_x, px_args, pro_dy, pdy_args):
    """Conv backward-weights recomputing its input in one prologue (normalize+ReLU of the
    pre-BN tensor) and forming its incoming gradient in the other (bn_grad)."""
    kernel = conv_bwd_weights.make_conv_backward_weights(PROLOGUES[pro_x], PROLOGUES[pro_dy])
    _, cost = default_kernel(conv_bwd_weights.ConvBackwardWeights, conv_shape(xs, node))
    cost = cost + Cost(0, _hook_bytes(pro_dy, conv_out_shape(xs, node)), 0)
    s, p, nx = node["stride"], node["padding"], len(px_args)

    def fn(x, dy, dw, *hooks):
        kernel(x, dy, dw, s, p, _hook_args(pro_x, hooks[:nx]), _hook_args(pro_dy, hooks[nx:]),
               numba.get_num_threads())
    return fn, (x, dy, dw) + tuple(px_args) + tuple(pdy_args), cost


def conv_out_shape(xs, node):
    n, h, w, _ = xs
    o = lambda i: conv_common.out_size(i, node["kernel"], node["stride"], node["padding"])
    return (n, o(h), o(w), node["out_channels"])


def bias_grad_call(dy, db, shape):
    """A conv's bias gradient as one reduction pass over its output gradient dy."""
    cost = conv_bias.ConvBiasBackward(dims(shape)).cost("prange")
    return on_view(conv_bias.bias_grad, shape[3]), (dy, db), cost


def bias_grad_bn_call(a, p, q, dbeta, mean, db, shape):
    """A conv's bias gradient from the sums of the BN it alone feeds (conv_bias.bias_grad_bn),
    when that BN's dx is formed in the conv's backward prologues and never written."""
    m, c = int(np.prod(shape[:3])), shape[3]
    fn = lambda a, p, q, dbeta, mean, db: conv_bias.bias_grad_bn(a, p, q, dbeta, mean, m, db)
    return fn, (a, p, q, dbeta, mean, db), Cost(4 * c, 5 * c * F32, c * F32)
