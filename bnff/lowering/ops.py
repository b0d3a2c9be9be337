"""The kernel calls a lowering emits. Each function takes tensor references, shapes and
attributes and returns (kernel, args, cost, stage) for one plan step: the kernel is a variant
(the default unless named) of its stage module (wrapped to see the [M, C] or flat view it
wants), the cost is that stage's own declaration at this shape, and stage the StageCall that
names it (None for a step that runs no registered stage as it is). Activations are NHWC; parameters live in the
kernels' layouts (conv weights OHWI, linear weights [out, in])."""
from __future__ import annotations

import numpy as np

from bnff.kernels.elementwise import add, concat, flatten, relu
from bnff.kernels.bn import bn_backward, bn_normalize, bn_scale, bn_stats
from bnff.kernels.conv import conv_bwd_data, conv_bwd_weights, conv_common, conv_fwd
from bnff.kernels import linear, loss, pool
from bnff.kernels.stage import F32, Cost
from bnff.lowering.plan import StageCall


def param_layout(op, shape):
    """Conv weights OHWI; everything else (a conv's bias too) as exported."""
    if op == "conv2d" and len(shape) == 4:
        return (shape[0], shape[2], shape[3], shape[1])
    return tuple(shape)


def to_kernel_layout(op, a):
    if op == "conv2d" and np.ndim(a) == 4:
        return conv_common.to_ohwi(a)
    return np.asarray(a, np.float32)


def from_kernel_layout(op, a):
    return conv_common.from_ohwi(a) if op == "conv2d" and a.ndim == 4 else a


def dims(shape):
    """Stage shape keys of an NHWC (or [N, F]) tensor."""
    if len(shape) == 2:
        return dict(mb=shape[0], ic=shape[1], ih=1, iw=1)
    n, h, w, c = shape
    return dict(mb=n, ic=c, ih=h, iw=w)


def view(a, shape):
    """a reshaped without a copy (a channel slice has an [M, C] view but no flat one);
    ValueError where a copy would be needed, so no kernel writes into a temporary."""
    v = a.view()
    try:
        v.shape = shape
    except AttributeError as e:
        raise ValueError(f"no {shape} view of an array with strides {a.strides}") from e
    return v


def on_view(fn, c=None):
    """fn seeing its 4-d array arguments as [M, c] views (c given) or flat."""
    shape = (-1, c) if c else (-1,)

    def call(*args):
        return fn(*(view(a, shape) if isinstance(a, np.ndarray) and a.ndim >= 2 else a
                    for a in args))
    return call


def stage_kernel(stage_cls, shape_keys, variant=None):
    """(the variant's kernel, its declared cost, its StageCall) of a stage at these shape
    keys; variant None is the stage's default."""
    st = stage_cls(shape_keys)
    variant = variant or st.default
    return st.variants[variant], st.cost(variant), StageCall(st.name, st.descriptor(), variant)


# --- conv ----------------------------------------------------------------------------------

def conv_shape(xs, node):
    n, h, w, c = xs
    return dict(mb=n, ic=c, ih=h, iw=w, oc=node["out_channels"], kh=node["kernel"],
                kw=node["kernel"], sh=node["stride"], ph=node["padding"])


def conv_fwd_call(x, w, y, xs, node):
    fn, cost, sc = stage_kernel(conv_fwd.ConvForward, conv_shape(xs, node))
    return fn, (x, w, y, node["stride"], node["padding"]), cost, sc


def conv_bwd_data_call(dy, w, dx, xs, node):
    fn, cost, sc = stage_kernel(conv_bwd_data.ConvBackwardData, conv_shape(xs, node))
    return fn, (dy, w, dx, node["stride"], node["padding"]), cost, sc


def conv_bwd_weights_call(x, dy, dw, xs, node):
    fn, cost, sc = stage_kernel(conv_bwd_weights.ConvBackwardWeights, conv_shape(xs, node))
    return fn, (x, dy, dw, node["stride"], node["padding"]), cost, sc


# --- batchnorm -----------------------------------------------------------------------------

def bn_stats_call(x, mean, var, shape, variant=None):
    fn, cost, sc = stage_kernel(bn_stats.BNStats, dims(shape), variant)
    return on_view(fn, shape[3]), (x, mean, var), cost, sc


def bn_normalize_call(x, mean, var, gamma, beta, y, eps, shape):
    fn, cost, sc = stage_kernel(bn_normalize.BNNormalize, dict(dims(shape), eps=eps))
    return on_view(fn, shape[3]), (x, mean, var, gamma, beta, eps, y), cost, sc


def bn_scale_call(xh, gamma, beta, y, shape):
    fn, cost, sc = stage_kernel(bn_scale.BNScale, dims(shape))
    return on_view(fn, shape[3]), (xh, gamma, beta, y), cost, sc


def bn_scale_bwd_call(dy, xh, gamma, dgamma, dbeta, dxh, shape):
    fn, cost, sc = stage_kernel(bn_scale.BNScaleBackward, dims(shape))
    return on_view(fn, shape[3]), (dy, xh, gamma, dgamma, dbeta, dxh), cost, sc


def bn_bwd_call(dy, x, mean, var, gamma, dgamma, dbeta, dx, eps, shape):
    """BN backward, reduction pass then dx pass, as one step."""
    fn, cost, sc = stage_kernel(bn_backward.BNBackward, dict(dims(shape), eps=eps))
    return on_view(fn, shape[3]), (dy, x, mean, var, gamma, eps, dgamma, dbeta, dx), cost, sc


# --- elementwise -----------------------------------------------------------------------------

def relu_fwd_call(x, y, shape):
    fn, cost, sc = stage_kernel(relu.ReLUForward, dims(shape))
    return on_view(fn), (x, y), cost, sc


def relu_bwd_call(dy, y, dx, shape):
    fn, cost, sc = stage_kernel(relu.ReLUBackward, dims(shape))
    return on_view(fn), (dy, y, dx), cost, sc


def add_call(a, b, y, shape):
    fn, cost, sc = stage_kernel(add.Add, dims(shape))
    return on_view(fn), (a, b, y), cost, sc


def fill_call(dst, value, shape):
    return (lambda d: d.fill(value)), (dst,), Cost(0, 0, int(np.prod(shape)) * F32), None


def copy_call(src, dst, shape):
    n = int(np.prod(shape)) * F32
    return on_view(np.copyto), (dst, src), Cost(0, n, n), None


# --- pooling, concat, linear, loss -----------------------------------------------------------

def _pool(xs, node, padded):
    d = dict(dims(xs), kh=node["kernel"], sh=node["stride"])
    if padded:
        d["ph"] = node["padding"]
    return d


def maxpool_fwd_call(x, y, arg, xs, node):
    fn, cost, sc = stage_kernel(pool.MaxPoolForward, _pool(xs, node, True))
    return fn, (x, node["kernel"], node["stride"], node["padding"], y, arg), cost, sc


def maxpool_bwd_call(dy, arg, dx, xs, node):
    fn, cost, sc = stage_kernel(pool.MaxPoolBackward, _pool(xs, node, True))
    return fn, (dy, arg, node["kernel"], node["stride"], node["padding"], dx), cost, sc


def avgpool_fwd_call(x, y, xs, node):
    fn, cost, sc = stage_kernel(pool.AvgPoolForward, _pool(xs, node, False))
    return fn, (x, node["kernel"], node["stride"], y), cost, sc


def avgpool_bwd_call(dy, dx, xs, node):
    fn, cost, sc = stage_kernel(pool.AvgPoolBackward, _pool(xs, node, False))
    return fn, (dy, node["kernel"], node["stride"], dx), cost, sc


def gap_fwd_call(x, y, xs):
    fn, cost, sc = stage_kernel(pool.GlobalAvgPoolForward, dims(xs))
    return fn, (x, y), cost, sc


def gap_bwd_call(dy, dx, xs):
    fn, cost, sc = stage_kernel(pool.GlobalAvgPoolBackward, dims(xs))
    return fn, (dy, dx), cost, sc


def flatten_fwd_call(x, y, xs):
    fn, cost, sc = stage_kernel(flatten.FlattenForward, dims(xs))
    return fn, (x, y), cost, sc


def flatten_bwd_call(dy, dx, xs):
    fn, cost, sc = stage_kernel(flatten.FlattenBackward, dims(xs))
    return fn, (dy, dx), cost, sc


def concat_fwd_call(xs, y, shapes, ys):
    """y = the concatenation of xs along channels, one call of ConcatForward's default."""
    ics = tuple(s[3] for s in shapes)
    m = int(np.prod(ys[:3]))
    cat, cost, sc = stage_kernel(concat.ConcatForward, dict(mb=ys[0], ics=ics, ih=ys[1],
                                                            iw=ys[2]))
    fn = lambda *a: cat([view(v, (m, c)) for v, c in zip(a[:-1], ics)], view(a[-1], (m, ys[3])))
    return fn, (*xs, y), cost, sc


def concat_copy_call(x, y, xs, ys, off):
    """y[..., off:off+C_k] = x."""
    ck, m = xs[3], int(np.prod(xs[:3]))
    copy, cost, sc = stage_kernel(concat.ConcatCopyInto, dict(dims(xs), oc=ys[3], off=off))
    fn = lambda a, b: copy(a.reshape(m, ck), b.reshape(m, ys[3]), off)
    return fn, (x, y), cost, sc


def concat_split_call(dy, dx, ys, xs, off, accumulate, start=None):
    """dx = dy[..., off:off+C_k], or dx += it when accumulating, or dx = start + it when
    accumulating from `start`, a gradient begun elsewhere (dx and start may be channel
    slices)."""
    ck, m = xs[3], int(np.prod(xs[:3]))
    stage = concat.ConcatAddOut if accumulate else concat.ConcatCopyOut
    split, cost, sc = stage_kernel(stage, dict(dims(xs), oc=ys[3], off=off))
    if start is not None:
        fn = lambda g, a, d: split(view(g, (m, ys[3])), off, view(a, (m, ck)), view(d, (m, ck)))
        return fn, (dy, start, dx), cost, sc
    if accumulate:
        fn = lambda g, d: split(view(g, (m, ys[3])), off, view(d, (m, ck)), view(d, (m, ck)))
    else:
        fn = lambda g, d: split(view(g, (m, ys[3])), off, view(d, (m, ck)))
    return fn, (dy, dx), cost, sc


def linear_fwd_call(x, w, b, y, xs, ys):
    fn, cost, sc = stage_kernel(linear.LinearForward, dict(mb=xs[0], ic=xs[1], oc=ys[1]))
    return fn, (x, w, b, y), cost, sc


def linear_bwd_call(dy, x, w, dx, dw, db, xs, ys):
    fn, cost, sc = stage_kernel(linear.LinearBackward, dict(mb=xs[0], ic=xs[1], oc=ys[1]))
    return fn, (dy, x, w, dx, dw, db), cost, sc


def softmax_xent_call(z, labels, loss_out, dz, zs):
    fn, cost, sc = stage_kernel(loss.SoftmaxCrossEntropy, dict(mb=zs[0], oc=zs[1]))
    return fn, (z, labels, loss_out, dz), cost, sc

