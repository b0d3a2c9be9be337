"""The convs of a BN site with BN carried in (bnff) next to the same work done by separate
passes (fission), as stages `bnff micro` times side by side. At a site conv -> BN -> ReLU ->
conv, with x the pre-BN tensor and a, b the BN coefficients (z = max(a*x + b, 0)):

    conv_fwd_bn_relu         y = conv(z), and mean, var of y (the next BN's statistics)
        1. separate: normalize+ReLU writes z, the conv reads it, a statistics pass reads y
        2. fused:    the conv applies a*x + b and ReLU as it loads x (z never written) and
                     sums y per channel in its epilogue while each tile is in L1
    conv_bwd_data_relu_sums  dz = conv_bwd_data(dy), and the BN sums s1 = sum(g),
                             s2 = sum(g * x) of g = dz * [a*x + b > 0]
        1. separate: backward-data writes dz, a mask-and-sums pass reads dz and x and writes
                     g (what fission does)
        2. fused:    backward-data sums g in its epilogue (reading x); dz stays unmasked

(bnff/kernels/conv/conv_bwd_fused.py has the third fused conv of the site: both gradients of a 1x1
conv in one pass with the BN gradient formed in its prologue.) Shape keys as ConvForward;
the BN input of conv_fwd_bn_relu is the conv's input, that of conv_bwd_data_relu_sums too.
"""
from __future__ import annotations

import numba
import numpy as np

from bnff.kernels.bn import bn_fused
from bnff.kernels import reference as R
from bnff.kernels.bn.bn_stats import BNStats
from bnff.hooks.bnff_hooks import relu_sums_epilogue
from bnff.kernels.conv.conv_bwd_data import ConvBackwardData, conv_backward_data, make_conv_backward_data
from bnff.kernels.conv.conv_common import (bn_relu_prologue, channel_sums_epilogue, from_ohwi,
                                 identity_prologue, pixels)
from bnff.kernels.conv.conv_fwd import ConvForward, conv_forward, make_conv_forward
from bnff.kernels.stage import F32, Cost


def _nchw(t):
    return np.transpose(t, (0, 3, 1, 2)).astype(np.float64)


def _nhwc(t):
    return np.transpose(t, (0, 2, 3, 1))


def _partials(c):
    return np.zeros((numba.get_num_threads(), c)), np.zeros((numba.get_num_threads(), c))


class _Site(ConvForward):
    examples = ("mb2ic32ih9iw8oc16kh3kw3sh1ph1", "mb2ic24ih8iw8oc40kh1kw1sh2ph0")

    def _bn_inputs(self, rng, shape):
        c = shape[3]
        x = rng.standard_normal(shape, dtype=np.float32)
        return {"x": x, "a": rng.uniform(0.5, 1.5, c).astype(np.float32),
                "b": rng.uniform(-0.5, 0.5, c).astype(np.float32)}

    def _z64(self, inputs):
        return np.maximum(inputs["a"] * inputs["x"].astype(np.float64) + inputs["b"], 0)



def fwd_separate(x, a, b, w, y, mean, var, z, stride, pad):
    """1. Normalize+ReLU writes z, the conv reads it, a statistics pass reads y."""
    ic, oc = x.shape[3], y.shape[3]
    bn_fused.normalize_relu(x.reshape(-1, ic), a, b, z.reshape(-1, ic))
    conv_forward(z, w, y, stride, pad)
    stats = BNStats(dict(mb=1, ic=oc, ih=1, iw=1))
    stats.variants[stats.default](y.reshape(-1, oc), mean, var)


def fwd_fused(x, a, b, w, y, mean, var, z, stride, pad):
    """2. BN+ReLU in the conv's prologue, the output's sums in its epilogue (z unused)."""
    oc = y.shape[3]
    s1, s2 = _partials(oc)
    make_conv_forward(bn_relu_prologue, channel_sums_epilogue)(x, w, y, stride, pad, (a, b),
                                                               (s1, s2))
    bn_fused.stats_from_sums(s1, s2, y.size // oc, mean, var)


def bwd_separate(dy, w, x, a, b, dz, s1, s2, g, stride, pad):
    """1. Backward-data writes dz; a mask-and-sums pass reads dz and x and writes g."""
    c = x.shape[3]
    conv_backward_data(dy, w, dz, stride, pad)
    bn_fused.relu_mask_sums(dz.reshape(-1, c), x.reshape(-1, c), a, b, g.reshape(-1, c), s1,
                            s2)


def bwd_fused(dy, w, x, a, b, dz, s1, s2, g, stride, pad):
    """2. The sums of g in backward-data's epilogue (reading x); dz stays unmasked, g unused."""
    p1, p2 = _partials(x.shape[3])
    make_conv_backward_data(identity_prologue, relu_sums_epilogue)(
        dy, w, dz, stride, pad, (), pixels(x) + (a, b, p1, p2))
    s1[:] = p1.sum(0)
    s2[:] = p2.sum(0)


class ConvFwdBNReLU(_Site):
    name = "conv_fwd_bn_relu"
    variants = {"separate": fwd_separate, "fused": fwd_fused}
    default = "fused"

    def make_inputs(self, rng):
        mb, ic, ih, iw, oc, kh, kw, _, _ = self.dims()
        ins = self._bn_inputs(rng, (mb, ih, iw, ic))
        ins["w"] = (rng.standard_normal((oc, kh, kw, ic)) / np.sqrt(ic * kh * kw)).astype(
            np.float32)
        return ins

    def allocate_outputs(self):
        mb, ic, ih, iw, oc, _, _, oh, ow = self.dims()
        return {"y": np.empty((mb, oh, ow, oc), np.float32), "mean": np.empty(oc, np.float32),
                "var": np.empty(oc, np.float32), "z": np.empty((mb, ih, iw, ic), np.float32)}

    def run(self, variant, inputs, outputs):
        i, o = inputs, outputs
        self.variants[variant](i["x"], i["a"], i["b"], i["w"], o["y"], o["mean"], o["var"],
                               o["z"], self.shape["sh"], self.shape["ph"])

    def reference(self, inputs):
        y = _nhwc(R.conv2d_forward(_nchw(self._z64(inputs)), from_ohwi(inputs["w"]).astype(
            np.float64), self.shape["sh"], self.shape["ph"]))
        y2 = y.reshape(-1, y.shape[3])
        return {"y": y, "mean": y2.mean(0), "var": y2.var(0)}

    def cost(self, variant):
        mb, ic, ih, iw, oc, kh, kw, oh, ow = self.dims()
        sx, sy, w = mb * ih * iw * ic * F32, mb * oh * ow * oc * F32, oc * kh * kw * ic * F32
        conv = ConvForward(self.shape).cost(ConvForward.default)
        if variant == "separate":  # + normalize (x -> z) + statistics (y)
            return conv + Cost(3 * sx // F32 + 3 * sy // F32, sx + sy, sx)
        return Cost(conv.flops + 3 * sx // F32 + 3 * sy // F32, sx + w, sy)


class ConvBwdDataReLUSums(_Site):
    name = "conv_bwd_data_relu_sums"
    variants = {"separate": bwd_separate, "fused": bwd_fused}
    default = "fused"

    def make_inputs(self, rng):
        mb, ic, ih, iw, oc, kh, kw, oh, ow = self.dims()
        ins = self._bn_inputs(rng, (mb, ih, iw, ic))
        ins["dy"] = rng.standard_normal((mb, oh, ow, oc), dtype=np.float32)
        ins["w"] = (rng.standard_normal((oc, kh, kw, ic)) / np.sqrt(oc * kh * kw)).astype(
            np.float32)
        return ins

    def allocate_outputs(self):
        mb, ic, ih, iw = self.dims()[:4]
        return {"dz": np.empty((mb, ih, iw, ic), np.float32), "s1": np.empty(ic),
                "s2": np.empty(ic), "g": np.empty((mb, ih, iw, ic), np.float32)}

    def run(self, variant, inputs, outputs):
        i, o = inputs, outputs
        self.variants[variant](i["dy"], i["w"], i["x"], i["a"], i["b"], o["dz"], o["s1"],
                               o["s2"], o["g"], self.shape["sh"], self.shape["ph"])

    def reference(self, inputs):
        mb, ic, ih, iw = self.dims()[:4]
        dz, _ = R.conv2d_backward(_nchw(inputs["dy"]), np.zeros((mb, ic, ih, iw)),
                                  from_ohwi(inputs["w"]).astype(np.float64), self.shape["sh"],
                                  self.shape["ph"])
        dz = _nhwc(dz)
        x = inputs["x"].astype(np.float64)
        g = (dz * (inputs["a"] * x + inputs["b"] > 0)).reshape(-1, ic)
        return {"dz": dz, "s1": g.sum(0), "s2": (g * x.reshape(-1, ic)).sum(0)}

    def cost(self, variant):
        mb, ic, ih, iw = self.dims()[:4]
        sx = mb * ih * iw * ic * F32
        conv = ConvBackwardData(self.shape).cost(ConvBackwardData.default)
        if variant == "separate":  # + the mask-and-sums pass: reads dz and x, writes g
            return conv + Cost(4 * sx // F32, 2 * sx, sx)
        return conv + Cost(4 * sx // F32, sx, 0)


STAGES = [ConvFwdBNReLU, ConvBwdDataReLUSums]
