"""Lowering of the split-BN schedules (fission, bnff-fwd, bnff): BN fission, and with the
schedule's flags the fusion of its halves into the neighbouring convolutions (see SplitLowering)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnff.hooks.bnff_hooks import BN, BN_RELU_GRAD, RELU_SUMS, SUMS
from bnff.kernels.conv.conv_common import BN_GRAD, BN_RELU, CHANNEL_SUMS
from bnff.lowering import ops
from bnff.lowering import ops_bnff as fo
from bnff.lowering.lower import Lowering
from bnff.lowering.plan import R, W
from bnff.suites.graph import INPUT


@dataclass
class Site:
    """One BN and what surrounds it: x its input, relu the ReLU that alone reads it, out the
    site's output (the ReLU's, else the BN's); producer: x comes from a conv that nothing
    else reads; consumer: the one conv that alone reads out; end: the add of a ResNet block
    end (add -> ReLU) that alone reads the BN."""
    bn: object
    x: str
    relu: object = None
    out: str = ""
    producer: object = None
    consumer: object = None
    end: object = None


class SplitLowering(Lowering):
    """BN fission, and with the schedule's flags the fusion, of the paper (fission, bnff-fwd, bnff):

    forward   sub-BN1 (statistics) in the epilogue of the conv producing x, else one stable
              pass; sub-BN2 (a*x + b) with the ReLU in the prologue of the conv consuming the
              site, else one pass writing z (or, at a ResNet block end, z = ReLU(a*x + b +
              shortcut) written once).
    backward  the consuming conv's backward-data epilogue sums dy = dz * [a*x + b > 0] and
              dy*x per channel (leaving dz as written), else one pass writes dy with the
              sums; the producing conv's backward kernels form dx = a*dy + p*x + q in their
              prologue (applying the mask to dz), else one pass writes dx. The consuming
              conv's backward-weights recomputes z from x in its prologue whenever z was not
              written. A 1x1 conv computes both gradients in one pass over dy.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.sites, self.by_x, self.by_out, self.ends = {}, {}, {}, {}
        for n in self.g.nodes:
            if n.op == "batchnorm":
                self.sites[n.name] = self.site(n)
        for s in self.sites.values():
            self.by_out[s.out] = s
            if s.producer is not None:
                self.by_x[s.x] = s
            if s.end is not None:
                self.ends.setdefault(s.end.name, []).append(s)

    def only(self, name):
        cs = self.consumers[name]
        return cs[0] if len(cs) == 1 else None

    def site(self, n):
        s = Site(n, n.inputs[0])
        nxt = self.only(n.name)
        if nxt is not None and nxt.op == "relu":
            s.relu = nxt
        s.out = s.relu.name if s.relu else n.name
        p = self.g.by_name.get(s.x)
        if p is not None and p.op == "conv2d" and self.only(s.x) is n:
            s.producer = p
        c = self.only(s.out)
        if c is not None and c.op == "conv2d":
            s.consumer = c
        elif s.relu is None and nxt is not None and nxt.op == "add" and self.only(nxt.name) \
                is not None and self.only(nxt.name).op == "relu":
            s.end = nxt
        return s

    # what is fused where
    def stats_in_epilogue(self, s):
        return self.schedule.fuse_forward and s.producer is not None

    def norm_in_prologue(self, s):
        return self.schedule.fuse_forward and s.consumer is not None

    def sums_in_epilogue(self, s):
        return self.schedule.fuse_backward and self.norm_in_prologue(s)

    def dx_in_prologue(self, s):
        return self.schedule.fuse_backward and self.stats_in_epilogue(s)

    def unmasked(self, s):
        """dy:<bn> holds dz, not dz * mask: the consuming conv's backward-data epilogue only
        summed it (stores from an epilogue are slow), and readers apply the mask."""
        return self.sums_in_epilogue(s) and s.relu is not None

    def vec(self, s, name, shape=None, dtype=np.float32):
        full = f"{s.bn.name}.{name}"
        if full not in self.plan.tensors:
            self.plan.tensor(full, shape or (self.shapes[s.x][3],), dtype)
        return full

    # --- forward -------------------------------------------------------------------------
    def forward(self, n):
        s = self.sites.get(n.name)
        if n.op == "conv2d":
            self.conv_forward(n)
        elif s is not None:
            self.bn_forward_split(s)
        elif n.op == "relu" and n.inputs[0] in self.sites and self.sites[n.inputs[0]].relu is n:
            pass  # with its BN
        elif n.op == "add" and n.name in self.ends:
            pass  # with the ReLU after it
        elif n.op == "relu" and n.inputs[0] in self.ends:
            self.end_forward(n, self.g.by_name[n.inputs[0]])
        else:
            super().forward(n)

    def conv_forward(self, n):
        x = n.inputs[0]
        src, pro, pro_args = x, None, ()
        s = self.by_out.get(x)
        if s is not None and s.consumer is n and self.norm_in_prologue(s):
            src, pro = s.x, (BN_RELU if s.relu else BN)
            pro_args = (R(self.vec(s, "a")), R(self.vec(s, "b")))
        epi, epi_args = fo.with_bias(n, *self.forward_epilogue(n), R(f"{n.name}.bias"))
        self.declare_output(n)
        self.step(n, "fwd" + (f" +{pro.name} prologue" if pro else "") +
                  (f" +{epi.name} epilogue" if epi else ""), "conv", "forward",
                  fo.conv_fwd_fused_call(R(src), R(f"{n.name}.weight"), W(n.name),
                                          self.shapes[x], n, pro, pro_args, epi, epi_args))

    def forward_epilogue(self, n):
        """BN statistics of the conv's output in its epilogue: per-task partial sums."""
        t = self.by_x.get(n.name)
        if t is None or not self.stats_in_epilogue(t):
            return None, ()
        c = self.shapes[n.name][3]
        return CHANNEL_SUMS, tuple(W(self.vec(t, v, fo.partials_shape(c), np.float64))
                              for v in ("fs1", "fs2"))

    def declare_output(self, n):
        self.plan.tensor(n.name, self.shapes[n.name])

    def bn_forward_split(self, s):
        n, shape = s.bn, self.shapes[s.x]
        coeffs = [W(self.vec(s, v)) for v in ("mean", "var")] + \
                 [R(f"{n.name}.weight"), R(f"{n.name}.bias")] + \
                 [W(self.vec(s, v)) for v in ("a", "b")]
        self.bn_stats(s, coeffs)
        if self.norm_in_prologue(s) or s.end is not None:
            return
        a, b = R(self.vec(s, "a")), R(self.vec(s, "b"))
        self.plan.tensor(s.out, shape)
        if s.relu:
            self.step(n, "normalize+relu", "bn", "forward",
                      fo.normalize_relu_call(R(s.x), a, b, W(s.out), shape))
        else:
            self.step(n, "normalize", "bn", "forward",
                      fo.normalize_call(R(s.x), a, b, W(s.out), shape))

    def bn_stats(self, s, coeffs):
        """Sub-BN1: mean, var, then a and b (coeffs: mean, var, gamma, beta, a, b refs)."""
        n, shape, eps = s.bn, self.shapes[s.x], s.bn["eps"]
        if self.stats_in_epilogue(s):
            self.step(n, "stats merge", "bn", "forward", fo.finalize_stats_call(
                R(self.vec(s, "fs1")), R(self.vec(s, "fs2")), *coeffs, eps, shape))
        else:
            self.step(n, "stats", "bn", "forward",
                      fo.stats_coeffs_call(R(s.x), *coeffs, eps, shape))

    def end_forward(self, relu, add):
        """z = ReLU(a1*x1 + b1 + (a2*x2 + b2 or the shortcut)), written once."""
        shape = self.shapes[relu.name]
        self.plan.tensor(relu.name, shape)
        bns = self.ends[add.name]
        ab = lambda s: (R(s.x), R(self.vec(s, "a")), R(self.vec(s, "b")))
        if len(bns) == 2:
            call = fo.normalize2_add_relu_call(*ab(bns[0]), *ab(bns[1]), W(relu.name), shape)
        else:
            other = next(i for i in add.inputs if i != bns[0].bn.name)
            call = fo.normalize_add_relu_call(*ab(bns[0]), R(other), W(relu.name), shape)
        self.step(relu, "normalize+add+relu", "bn", "forward", call)

    # --- backward ------------------------------------------------------------------------
    def dy_of(self, s):
        return f"dy:{s.bn.name}"

    def backward(self, n):
        s = self.sites.get(n.name)
        if n.op == "conv2d":
            self.conv_backward(n)
        elif s is not None:
            self.bn_backward_split(s)
        elif n.op == "relu" and n.inputs[0] in self.sites and self.sites[n.inputs[0]].relu is n:
            pass  # with its BN
        elif n.op == "add" and n.name in self.ends:
            pass  # with the ReLU after it
        elif n.op == "relu" and n.inputs[0] in self.ends:
            self.end_backward(n, self.g.by_name[n.inputs[0]])
        else:
            super().backward(n)

    def conv_backward(self, n):
        x, xs = n.inputs[0], self.shapes[n.inputs[0]]
        dy, pro_dy, pdy_args = self.grad_operand(n)
        src, pro_x, px_args = self.input_operand(n)
        if pro_dy is None:
            self.bias_backward(n, dy)
        elif n["bias"]:
            self.bias_backward_from_bn(n)
        if self.schedule.fuse_backward and n["kernel"] == 1 and n["padding"] == 0 and x != INPUT:
            return self.conv_backward_1x1(n, dy, pro_dy, pdy_args, src, pro_x, px_args)
        self.step(n, "bwd-weights", "conv", "backward", fo.conv_bwd_weights_fused_call(
            R(src), dy, W(f"grad:{n.name}.weight"), xs, n, pro_x, px_args, pro_dy, pdy_args))
        if x == INPUT:
            return
        e = self.data_epilogue(n)
        if e is not None:
            out, epi, epi_args = e
            self.step(n, f"bwd-data +{epi.name} epilogue", "conv", "backward",
                      fo.conv_bwd_data_fused_call(dy, R(f"{n.name}.weight"), W(out), xs, n,
                                                   pro_dy, pdy_args, epi, epi_args))
            return
        self.contribute(n, "bwd-data", "conv", x, lambda d, acc: fo.conv_bwd_data_fused_call(
            dy, R(f"{n.name}.weight"), d, xs, n, pro_dy, pdy_args, None, (), acc),
            native=self.schedule.conv_data_native)

    def bias_backward_from_bn(self, n):
        """The bias gradient of a conv whose output gradient is the dx of the BN it alone
        feeds, formed in the conv's prologues and never written: from that BN's sums."""
        t = self.by_x[n.name]
        self.step(n, "bias grad from BN sums", "other", "backward", fo.bias_grad_bn_call(
            *(R(self.vec(t, v)) for v in ("ga", "gp", "gq")), R(f"grad:{t.bn.name}.bias"),
            R(self.vec(t, "mean")), W(f"grad:{n.name}.bias"), self.shapes[n.name]))

    def conv_backward_1x1(self, n, dy, pro_dy, pdy_args, src, pro_x, px_args):
        """Both gradients of a 1x1 conv in one pass over dy (bnff/kernels/conv/conv_bwd_fused.py): dy
        and the tensor its prologue reads are read once, the prologue applied once."""
        x = n.inputs[0]
        call = lambda d, acc, epi=None, epi_args=(): fo.conv_bwd_1x1_fused_call(
            R(src), dy, R(f"{n.name}.weight"), d, W(f"grad:{n.name}.weight"),
            self.shapes[x], n, pro_x, px_args, pro_dy, pdy_args, epi, epi_args, acc)
        e = self.data_epilogue(n)
        if e is not None:
            out, epi, epi_args = e
            self.step(n, f"bwd data+weights +{epi.name} epilogue", "conv", "backward",
                      call(W(out), False, epi, epi_args))
            return
        self.contribute(n, "bwd data+weights", "conv", x, call,
                        native=self.schedule.conv_data_native)

    def grad_operand(self, n):
        """The conv's incoming gradient: d:n, or formed from the site's dy in the prologue
        when n produces a BN input: (ref, prologue, its args)."""
        t = self.by_x.get(n.name)
        if t is None or not self.dx_in_prologue(t):
            return R(f"d:{n.name}"), None, ()
        mask = tuple(R(self.vec(t, v)) for v in ("a", "b")) if self.unmasked(t) else ()
        return (R(self.dy_of(t)), BN_RELU_GRAD if mask else BN_GRAD,
                (R(t.x),) + mask + tuple(R(self.vec(t, v)) for v in ("ga", "gp", "gq")))

    def input_operand(self, n):
        """The conv's input: x, or z recomputed from the pre-BN tensor in the prologue when z
        was never written: (name, prologue, its args)."""
        x = n.inputs[0]
        s = self.by_out.get(x)
        if s is None or s.consumer is not n or not self.norm_in_prologue(s):
            return x, None, ()
        return s.x, (BN_RELU if s.relu else BN), (R(self.vec(s, "a")), R(self.vec(s, "b")))

    def data_epilogue(self, n):
        """When n consumes a BN site whose backward sums go into n's backward-data epilogue:
        (the site's dy tensor, now declared, epilogue, its args); else None."""
        x, xs = n.inputs[0], self.shapes[n.inputs[0]]
        s = self.by_out.get(x)
        if s is None or s.consumer is not n or not self.sums_in_epilogue(s):
            return None
        parts = tuple(W(self.vec(s, v, fo.partials_shape(xs[3]), np.float64))
                      for v in ("bs1", "bs2"))
        if s.relu:
            epi, epi_args = RELU_SUMS, (R(s.x), R(self.vec(s, "a")), R(self.vec(s, "b"))) + parts
        else:
            epi, epi_args = SUMS, (R(s.x),) + parts
        self.seen.add(x)
        self.plan.tensor(self.dy_of(s), xs)
        return self.dy_of(s), epi, epi_args

    def bn_backward_split(self, s):
        n, shape, eps = s.bn, self.shapes[s.x], s.bn["eps"]
        c = shape[3]
        if self.sums_in_epilogue(s):
            sums = (R(self.vec(s, "bs1")), R(self.vec(s, "bs2")))
        elif s.end is not None:
            sums = (R(self.vec(s, "bs1")), R(self.vec(s, "bs2")))  # made at the block end
        else:
            sums = (W(self.vec(s, "bs1", (c,), np.float64)),
                    W(self.vec(s, "bs2", (c,), np.float64)))
            if s.relu:
                self.plan.tensor(self.dy_of(s), shape)
                self.step(n, "relu-mask+sums", "bn", "backward", fo.relu_mask_sums_call(
                    R(f"d:{s.out}"), R(s.x), R(self.vec(s, "a")), R(self.vec(s, "b")),
                    W(self.dy_of(s)), *sums, shape))
            else:
                self.plan.tensor(self.dy_of(s), shape, inplace_of=f"d:{s.out}")
                self.step(n, "sums", "bn", "backward", fo.dy_sums_call(
                    R(self.dy_of(s)), R(s.x), *sums, shape))
            sums = tuple(R(r.name) for r in sums)
        coeffs = [R(self.vec(s, "mean")), R(self.vec(s, "var")), R(f"{n.name}.weight"),
                  W(f"grad:{n.name}.weight"), W(f"grad:{n.name}.bias")] + \
                 [W(self.vec(s, v)) for v in ("ga", "gp", "gq")]
        self.step(n, "grad merge", "bn", "backward",
                  fo.finalize_grads_call(*sums, *coeffs, eps, shape))
        if self.dx_in_prologue(s):
            return
        g = tuple(R(self.vec(s, v)) for v in ("ga", "gp", "gq"))
        if self.unmasked(s):
            ab = tuple(R(self.vec(s, v)) for v in ("a", "b"))
            self.contribute(n, "dx", "bn", s.x, lambda d, acc: fo.bn_relu_dx_call(
                R(self.dy_of(s)), R(s.x), *ab, *g, d, shape, acc), native=True)
        else:
            self.contribute(n, "dx", "bn", s.x, lambda d, acc: fo.bn_dx_call(
                R(self.dy_of(s)), R(s.x), *g, d, shape, acc), native=True)

    def end_backward(self, relu, add):
        """dA = dz * [z > 0] once, with the sums of the BN(s) feeding the add; the shortcut
        (if not a BN) receives dA: as its own buffer where shares_grad allows, else copied or
        added."""
        shape = self.shapes[relu.name]
        bns = self.ends[add.name]
        da = self.dy_of(bns[0])
        self.plan.tensor(da, shape)
        s0 = bns[0]
        sums = lambda s: tuple(W(self.vec(s, v, (shape[3],), np.float64)) for v in ("bs1", "bs2"))
        self.step(relu, "relu-mask+sums", "bn", "backward", fo.relu_mask_sums_z_call(
            R(f"d:{relu.name}"), R(relu.name), R(s0.x), W(da), *sums(s0), shape))
        if len(bns) == 2:
            s1 = bns[1]
            self.plan.tensor(self.dy_of(s1), shape, inplace_of=da)
            self.step(relu, "sums", "bn", "backward",
                      fo.dy_sums_call(R(da), R(s1.x), *sums(s1), shape))
        else:
            other = next(i for i in add.inputs if i != s0.bn.name)
            if self.shares_grad(add, other):  # dA itself, no copy (Lowering.shares_grad)
                return self.alias_grad(add, other, of=da)
            self.contribute(add, f"bwd {other}", "other", other,
                            lambda d, acc: ops.add_call(d, R(da), d, shape) if acc
                            else ops.copy_call(R(da), d, shape), native=True)
