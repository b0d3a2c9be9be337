"""The hooked convs the bnff and bnff+ schedules run (bnff/lowering/ops_bnff.py), as stages, so
`bnff micro NET` times them at the shapes and with the hooks NET's plans use:

    conv_fwd_hooked          conv forward with a prologue on x and an epilogue on y
    conv_bwd_data_hooked     conv backward-data with a prologue on dy and an epilogue on dx
    conv_bwd_weights_hooked  conv backward-weights with a prologue on x and one on dy
    conv_bwd_1x1_hooked      both gradients of a 1x1 conv in one pass, prologues on x and dy,
                             an epilogue on dx

Shape keys as ConvForward, then the hooks by name: mb2ic8ih6iw5oc19kh3kw3sh1ph1_pro-bn_relu_epi-stats,
mb2ic8ih6iw5oc19kh3kw3sh1ph1_prox-bn_relu_prody-bn_relu_grad,
mb2ic16ih7iw7oc8kh1kw1sh1ph0_prox-bn_relu_prody-bn_grad_epi-relu_sums (PROLOGUES and EPILOGUES below
name the conv_common.Hook objects). A backward-data conv that adds into its output ends _acc:
dx starts as the input dx0 (Stage.accumulates), the conv is added to it and the epilogue sees
the sum, as in the DenseNet plans where several consumers' gradients meet. A conv with identity
hooks only (and no _acc) is the unhooked stage's default kernel, and `planned()` gives that
stage, so one conv has one name in every plan. Inputs are the conv's and
each hook's (Hook.inputs, for the operand it hooks); outputs the conv's, and for an epilogue
with sums also s1, s2 (float64 [C], merged over the per-task partials p1, p2 after the call);
the reference is the float64 conv between the hooks' Hook.ref. One variant, the engine the
lowering compiles the hooks into (direct; conv_bwd_1x1_hooked also has two_kernels, the hooked
direct backward-data and backward-weights, to set the one pass against); the cost, which the
lowering's step declares too, is
the unhooked stage's plus the bytes the hooks read (Hook.bytes). The merge of p1, p2 into s1,
s2 is the lowering's coefficient step, outside its conv step: timed here, it adds a
[threads, C] sum to the conv.
"""
from __future__ import annotations

import numba
import numpy as np

from bnff.hooks.bnff_hooks import BN, BN_RELU_GRAD, RELU_SUMS, SUMS
from bnff.kernels import reference as R
from bnff.kernels.conv.conv_bwd_data import ConvBackwardData, make_conv_backward_data
from bnff.kernels.conv.conv_bwd_fused import ConvBackward1x1, make_conv_backward_1x1
from bnff.kernels.conv.conv_bwd_weights import ConvBackwardWeights, make_conv_backward_weights
from bnff.kernels.conv.conv_common import (BIAS, BIAS_SUMS, BN_GRAD, BN_RELU, CHANNEL_SUMS,
                                           IDENTITY_EPILOGUE, IDENTITY_PROLOGUE, from_ohwi)
from bnff.kernels.conv.conv_fwd import ConvForward, make_conv_forward
from bnff.kernels.stage import F32, Cost, DescriptorError

PROLOGUES = {h.name: h for h in (IDENTITY_PROLOGUE, BN_RELU, BN, BN_GRAD, BN_RELU_GRAD)}
EPILOGUES = {h.name: h for h in (IDENTITY_EPILOGUE, CHANNEL_SUMS, BIAS, BIAS_SUMS, RELU_SUMS,
                                 SUMS)}


def _nchw(t):
    return np.transpose(t, (0, 3, 1, 2))


def _nhwc(t):
    return np.transpose(t, (0, 2, 3, 1))


def _tagged(inputs, tag, dtype=None):
    """The inputs named tag0, tag1, .. in order (as float64 with dtype=np.float64)."""
    keys = sorted(k for k in inputs if k.startswith(tag))
    return tuple(inputs[k] if dtype is None else inputs[k].astype(dtype) for k in keys)


def _hook_inputs(tag, hook, rng, shape):
    """{tag0: .., tag1: ..}: the arrays `hook` takes for an operand of `shape`."""
    return {f"{tag}{i}": a for i, a in enumerate(hook.inputs(rng, shape))}


def _add_sums(out, c):
    """An epilogue's sums as outputs: s1, s2 [c] float64 and their per-task partials p1, p2."""
    nt = numba.config.NUMBA_NUM_THREADS
    out.update(s1=np.empty(c), s2=np.empty(c), p1=np.empty((nt, c)), p2=np.empty((nt, c)))
    return out


def _epi_args(epi, inputs, outputs):
    """The epilogue's args as the kernel takes them: its inputs epi0.., then, when it sums, the
    per-task partials p1, p2 (Hook.args zeroes them)."""
    return epi.args(_tagged(inputs, "epi") + ((outputs["p1"], outputs["p2"]) if epi.sums else ()))


def _merge_sums(epi, outputs, nt):
    """s1, s2 = the first nt tasks' partials summed, when the epilogue sums."""
    if epi.sums:
        outputs["s1"][:] = outputs["p1"][:nt].sum(0)
        outputs["s2"][:] = outputs["p2"][:nt].sum(0)


def _prologues_ref(st, inputs):
    """{x, dy} in float64 after st.pro_x and st.pro_dy (inputs px0.., pdy0..)."""
    return {"x": st.pro_x.ref(inputs["x"].astype(np.float64), _tagged(inputs, "px", np.float64)),
            "dy": st.pro_dy.ref(inputs["dy"].astype(np.float64),
                                _tagged(inputs, "pdy", np.float64))}


def _parse_hooks(cls, text, parse_conv, parts):
    """(the stage, [hooks]) of `<conv shape><marker><hook name>..` for `parts`, (marker, table of
    hooks by name) in order; parse_conv(shape text) makes the stage (its DescriptorError for a
    bad shape comes first), a hook part missing or unknown is this DescriptorError."""
    head, names = text, []
    for marker, _ in reversed(parts):
        rest, sep, name = head.rpartition(marker)
        head = rest if sep else head
        names.insert(0, name if sep else None)
    st = parse_conv(head)
    if any(name not in table for name, (_, table) in zip(names, parts)):
        form = "".join(f"{marker}<hook>" for marker, _ in parts)
        raise DescriptorError(
            f"descriptor {text!r} does not fit stage {cls.name}: it ends {form} with "
            + ", ".join(f"{marker.strip('_-')} one of {', '.join(table)}"
                        for marker, table in parts))
    return st, [table[name] for name, (_, table) in zip(names, parts)]


class _AddsIntoDx:
    """A backward conv whose descriptor ends _acc adds into dx: dx starts as the input dx0
    (Stage.accumulates), the conv is added to it and the epilogue sees the sum; its cost adds
    the read of dx and one add per element. Before the hooked stage in the bases."""

    ACC = "_acc"
    acc = False

    def set_acc(self, acc: bool):
        self.acc = acc
        self.accumulates = {"dx": "dx0"} if acc else {}

    def descriptor(self) -> str:
        return super().descriptor() + (self.ACC if self.acc else "")

    @classmethod
    def from_descriptor(cls, text):
        body = text.removesuffix(cls.ACC)
        st = super().from_descriptor(body)
        st.set_acc(body != text)
        return st

    def planned(self):
        return self if self.acc else super().planned()

    def _dx_shape(self):
        mb, ic, ih, iw = self.dims()[:4]
        return (mb, ih, iw, ic)

    def make_inputs(self, rng):
        ins = super().make_inputs(rng)
        if self.acc:
            ins["dx0"] = rng.standard_normal(self._dx_shape(), dtype=np.float32)
        return ins

    def dx_start(self, inputs):
        """What the float64 reference adds the conv to."""
        return inputs["dx0"].astype(np.float64) if self.acc else 0.0

    def cost(self, variant):
        c = super().cost(variant)
        n = int(np.prod(self._dx_shape()))
        return c + Cost(n, n * F32, 0) if self.acc else c


class _Hooked:
    """What both directions share; `base` is the unhooked stage (shape, conv cost, operands),
    `src`/`dst` the names of the operand the prologue hooks and the output the epilogue does."""

    base: type
    src: str
    dst: str

    def __init__(self, shape: dict, pro=IDENTITY_PROLOGUE, epi=IDENTITY_EPILOGUE):
        super().__init__(shape)
        self.pro, self.epi = pro, epi

    def descriptor(self) -> str:
        return f"{super().descriptor()}_pro-{self.pro.name}_epi-{self.epi.name}"

    def planned(self):
        """The stage a plan records for this conv: the unhooked one when both hooks are
        identities (the same kernel as its default variant), else this one."""
        plain = self.pro is IDENTITY_PROLOGUE and self.epi is IDENTITY_EPILOGUE
        return self.base(self.shape) if plain else self

    @classmethod
    def from_descriptor(cls, text):
        st, (st.pro, st.epi) = _parse_hooks(cls, text, super().from_descriptor,
                                            (("_pro-", PROLOGUES), ("_epi-", EPILOGUES)))
        return st

    def make_inputs(self, rng):
        ins = self.base.make_inputs(self, rng)
        out = self.base.allocate_outputs(self)[self.dst].shape
        ins.update(_hook_inputs("pro", self.pro, rng, ins[self.src].shape))
        ins.update(_hook_inputs("epi", self.epi, rng, out))
        return ins

    def allocate_outputs(self):
        out = self.base.allocate_outputs(self)
        return _add_sums(out, out[self.dst].shape[3]) if self.epi.sums else out

    def hook_args(self, inputs, outputs):
        """(prologue args, epilogue args) as the kernel takes them."""
        return self.pro.args(_tagged(inputs, "pro")), _epi_args(self.epi, inputs, outputs)

    def hooked_reference(self, inputs, conv, start=0.0):
        """The float64 prologue, conv (NCHW in, NCHW out) added to `start`, and epilogue."""
        v = self.pro.ref(inputs[self.src].astype(np.float64), _tagged(inputs, "pro", np.float64))
        d, sums = self.epi.ref(start + _nhwc(conv(_nchw(v))), _tagged(inputs, "epi", np.float64))
        return {self.dst: d, **dict(zip(("s1", "s2"), sums))}

    def cost(self, variant):
        mb, ic, ih, iw, oc, _, _, oh, ow = self.dims()
        shapes = {"x": (mb, ih, iw, ic), "y": (mb, oh, ow, oc), "dy": (mb, oh, ow, oc),
                  "dx": (mb, ih, iw, ic)}
        return self.base.cost(self, self.base.default) + Cost(
            0, self.pro.bytes(shapes[self.src]) + self.epi.bytes(shapes[self.dst]), 0)


def fwd_direct(st, inputs, outputs):
    """The direct engine with the stage's hooks compiled in."""
    nt = numba.get_num_threads()
    make_conv_forward(st.pro.fn, st.epi.fn)(inputs["x"], inputs["w"], outputs["y"],
                                           st.shape["sh"], st.shape["ph"],
                                           *st.hook_args(inputs, outputs), nt)
    _merge_sums(st.epi, outputs, nt)


def bwd_data_direct(st, inputs, outputs):
    """The direct engine (as make_conv_backward_data picks it) with the stage's hooks, adding
    into dx when the stage accumulates."""
    nt = numba.get_num_threads()
    make_conv_backward_data(st.pro.fn, st.epi.fn)(inputs["dy"], inputs["w"], outputs["dx"],
                                                 st.shape["sh"], st.shape["ph"],
                                                 *st.hook_args(inputs, outputs), nt, st.acc)
    _merge_sums(st.epi, outputs, nt)


class ConvFwdHooked(_Hooked, ConvForward):
    name = "conv_fwd_hooked"
    base, src, dst = ConvForward, "x", "y"
    variants = {"direct": fwd_direct}
    default = "direct"
    examples = ("mb2ic8ih6iw5oc19kh3kw3sh1ph1_pro-bn_relu_epi-stats",)

    def run(self, variant, inputs, outputs):
        self.variants[variant](self, inputs, outputs)

    def reference(self, inputs):
        w = from_ohwi(inputs["w"]).astype(np.float64)
        return self.hooked_reference(
            inputs, lambda x: R.conv2d_forward(x, w, self.shape["sh"], self.shape["ph"]))


class ConvBwdDataHooked(_AddsIntoDx, _Hooked, ConvBackwardData):
    name = "conv_bwd_data_hooked"
    base, src, dst = ConvBackwardData, "dy", "dx"
    variants = {"direct": bwd_data_direct}
    default = "direct"
    examples = ("mb2ic19ih6iw5oc8kh3kw3sh1ph1_pro-bn_relu_grad_epi-relu_sums",
                "mb2ic19ih6iw5oc8kh3kw3sh1ph1_pro-bn_relu_grad_epi-relu_sums_acc")

    def __init__(self, shape: dict, pro=IDENTITY_PROLOGUE, epi=IDENTITY_EPILOGUE, acc=False):
        super().__init__(shape, pro, epi)
        self.set_acc(acc)

    def run(self, variant, inputs, outputs):
        self.variants[variant](self, inputs, outputs)

    def reference(self, inputs):
        mb, ic, ih, iw = self.dims()[:4]
        w = from_ohwi(inputs["w"]).astype(np.float64)
        return self.hooked_reference(
            inputs, lambda dy: R.conv2d_backward(dy, np.zeros((mb, ic, ih, iw)), w,
                                                 self.shape["sh"], self.shape["ph"])[0],
            self.dx_start(inputs))


def bww_direct(st, inputs, outputs):
    """The direct backward-weights engine with the stage's two prologues compiled in."""
    make_conv_backward_weights(st.pro_x.fn, st.pro_dy.fn)(
        inputs["x"], inputs["dy"], outputs["dw"], st.shape["sh"], st.shape["ph"],
        st.pro_x.args(_tagged(inputs, "px")), st.pro_dy.args(_tagged(inputs, "pdy")),
        numba.get_num_threads())


class ConvBwdWeightsHooked(ConvBackwardWeights):
    """Backward-weights recomputing x from the pre-BN tensor in one prologue (pro_x: BN_RELU)
    and forming dy, the BN input gradient, in the other (pro_dy: BN_GRAD, BN_RELU_GRAD).
    Inputs x, dy, then px0.. (pro_x's) and pdy0.. (pro_dy's). Cost as the lowering counts it:
    the plain conv's plus the bytes pro_dy reads (pro_x reads two [C] vectors)."""

    name = "conv_bwd_weights_hooked"
    variants = {"direct": bww_direct}
    default = "direct"
    examples = ("mb2ic8ih6iw5oc19kh3kw3sh1ph1_prox-bn_relu_prody-bn_relu_grad",)

    def __init__(self, shape: dict, pro_x=IDENTITY_PROLOGUE, pro_dy=IDENTITY_PROLOGUE):
        super().__init__(shape)
        self.pro_x, self.pro_dy = pro_x, pro_dy

    def descriptor(self) -> str:
        return f"{super().descriptor()}_prox-{self.pro_x.name}_prody-{self.pro_dy.name}"

    @classmethod
    def from_descriptor(cls, text):
        st, (st.pro_x, st.pro_dy) = _parse_hooks(
            cls, text, super().from_descriptor, (("_prox-", PROLOGUES), ("_prody-", PROLOGUES)))
        return st

    def planned(self):
        """As _Hooked.planned: the plain backward-weights stage when both prologues are
        identities."""
        plain = self.pro_x is IDENTITY_PROLOGUE and self.pro_dy is IDENTITY_PROLOGUE
        return ConvBackwardWeights(self.shape) if plain else self

    def make_inputs(self, rng):
        ins = super().make_inputs(rng)
        ins.update(_hook_inputs("px", self.pro_x, rng, ins["x"].shape))
        ins.update(_hook_inputs("pdy", self.pro_dy, rng, ins["dy"].shape))
        return ins

    def run(self, variant, inputs, outputs):
        self.variants[variant](self, inputs, outputs)

    def reference(self, inputs):
        return super().reference(_prologues_ref(self, inputs))

    def cost(self, variant):
        mb, _, _, _, oc, _, _, oh, ow = self.dims()
        return ConvBackwardWeights.cost(self, ConvBackwardWeights.default) + Cost(
            0, self.pro_dy.bytes((mb, oh, ow, oc)), 0)


def one_pass_hooked(st, inputs, outputs):
    """The one-pass 1x1 backward with the stage's three hooks compiled in, adding into dx when
    the stage accumulates."""
    nt = numba.get_num_threads()
    make_conv_backward_1x1(st.pro_dy.fn, st.pro_x.fn, st.epi.fn)(
        inputs["x"], inputs["dy"], inputs["w"], outputs["dx"], outputs["dw"], st.shape["sh"],
        st.pro_dy.args(_tagged(inputs, "pdy")), st.pro_x.args(_tagged(inputs, "px")),
        _epi_args(st.epi, inputs, outputs), nt, st.acc)
    _merge_sums(st.epi, outputs, nt)


def two_kernels_hooked(st, inputs, outputs):
    """The direct engine's backward-data (pro_dy, epilogue) and then its backward-weights
    (pro_x, pro_dy): the gradient formed from dy in both."""
    nt = numba.get_num_threads()
    pdy = st.pro_dy.args(_tagged(inputs, "pdy"))
    make_conv_backward_data(st.pro_dy.fn, st.epi.fn)(
        inputs["dy"], inputs["w"], outputs["dx"], st.shape["sh"], 0, pdy,
        _epi_args(st.epi, inputs, outputs), nt, st.acc)
    make_conv_backward_weights(st.pro_x.fn, st.pro_dy.fn)(
        inputs["x"], inputs["dy"], outputs["dw"], st.shape["sh"], 0,
        st.pro_x.args(_tagged(inputs, "px")), pdy, nt)
    _merge_sums(st.epi, outputs, nt)


class _OnePassHooks(ConvBackward1x1):
    """The hooks of conv_bwd_1x1_hooked, in its descriptor after the plain shape (without
    conv_bwd_1x1's own _bn_relu_grad suffix)."""

    def __init__(self, shape: dict, pro_x=IDENTITY_PROLOGUE, pro_dy=IDENTITY_PROLOGUE,
                 epi=IDENTITY_EPILOGUE):
        super().__init__(shape)
        self.pro_x, self.pro_dy, self.epi = pro_x, pro_dy, epi

    def descriptor(self) -> str:
        return (f"{ConvForward.descriptor(self)}_prox-{self.pro_x.name}"
                f"_prody-{self.pro_dy.name}_epi-{self.epi.name}")

    @classmethod
    def from_descriptor(cls, text):
        st, (st.pro_x, st.pro_dy, st.epi) = _parse_hooks(
            cls, text, super(ConvBackward1x1, cls).from_descriptor,
            (("_prox-", PROLOGUES), ("_prody-", PROLOGUES), ("_epi-", EPILOGUES)))
        return st

    def planned(self):
        """The plain conv_bwd_1x1 stage when every hook is an identity (the same kernel as its
        one_pass variant), else this one."""
        plain = (self.pro_x, self.pro_dy, self.epi) == \
            (IDENTITY_PROLOGUE, IDENTITY_PROLOGUE, IDENTITY_EPILOGUE)
        return ConvBackward1x1(self.shape) if plain else self

    def make_inputs(self, rng):
        ins = super().make_inputs(rng)
        dx = ins["x"].shape
        ins.update(_hook_inputs("px", self.pro_x, rng, dx))
        ins.update(_hook_inputs("pdy", self.pro_dy, rng, ins["dy"].shape))
        ins.update(_hook_inputs("epi", self.epi, rng, dx))
        return ins

    def cost(self, variant):
        mb, ic, ih, iw, oc, _, _, oh, ow = self.dims()
        return ConvBackward1x1.cost(self, "one_pass") + Cost(
            0, self.pro_dy.bytes((mb, oh, ow, oc)) + self.epi.bytes((mb, ih, iw, ic)), 0)


class ConvBwd1x1Hooked(_AddsIntoDx, _OnePassHooks):
    """Both gradients of a 1x1 conv in one pass over dy (conv_bwd_fused), with x recomputed
    by pro_x, dy formed by pro_dy and dx's epilogue epi, adding into dx when it ends _acc.
    Inputs x, dy, w, px0.., pdy0.., epi0.. (and dx0); outputs dx, dw (and s1, s2 with their
    per-task partials p1, p2, as conv_fwd_hooked). Cost as the lowering counts it: the plain
    one pass's, plus the bytes pro_dy and epi read, plus the read of dx when accumulating.

    Variants: one_pass (the default, what the lowering runs) and two_kernels (the hooked direct
    backward-data, then backward-weights, each forming the gradient from dy). Measured with
    `bnff micro NET --batch 16 --image 224 --threads 1,2 --stage conv_bwd_1x1_hooked`, summed
    over the shapes of the bnff and bnff+ plans (2-vCPU AMD EPYC znver5), two_kernels over
    one_pass: ResNet-50 1.15x (1 thread) and 1.30x (2), DenseNet-121 0.94x and 0.97x, so one
    pass stays the default. Against the plain direct pair (conv_bwd_data + conv_bwd_weights at
    the same shapes, same run), the one pass costs 0.85x (1 thread) and 0.80x (2) on
    ResNet-50 but 1.62x and 1.40x on DenseNet-121, whose 1x1s read the block buffer's x in
    both pro_x and epi (its ablation at ic512ih28oc128, 1 thread: relu_sums alone +16 %)."""

    name = "conv_bwd_1x1_hooked"
    variants = {"one_pass": one_pass_hooked, "two_kernels": two_kernels_hooked}
    default = "one_pass"
    examples = ("mb2ic16ih7iw7oc8kh1kw1sh1ph0_prox-bn_relu_prody-bn_grad_epi-relu_sums",
                "mb2ic16ih7iw7oc8kh1kw1sh1ph0_prox-bn_relu_prody-bn_grad_epi-relu_sums_acc")

    def __init__(self, shape: dict, pro_x=IDENTITY_PROLOGUE, pro_dy=IDENTITY_PROLOGUE,
                 epi=IDENTITY_EPILOGUE, acc=False):
        super().__init__(shape, pro_x, pro_dy, epi)
        self.set_acc(acc)

    def allocate_outputs(self):
        out = super().allocate_outputs()
        return _add_sums(out, out["dx"].shape[3]) if self.epi.sums else out

    def run(self, variant, inputs, outputs):
        self.variants[variant](self, inputs, outputs)

    def reference(self, inputs):
        v = _prologues_ref(self, inputs)
        dx, dw = R.conv2d_backward(_nchw(v["dy"]), _nchw(v["x"]),
                                   from_ohwi(inputs["w"]).astype(np.float64), self.shape["sh"], 0)
        d, sums = self.epi.ref(self.dx_start(inputs) + _nhwc(dx),
                               _tagged(inputs, "epi", np.float64))
        return {"dx": d, "dw": _nhwc(dw), **dict(zip(("s1", "s2"), sums))}
