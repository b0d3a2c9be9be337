"""Lowering: a network graph and a Schedule (bnff/lowering/schedules.py) -> a Plan of float32
NHWC kernel calls for one training iteration (forward, loss, backward to every parameter
gradient). bnff/lowering/dispatch.py picks this class or a subclass from the Schedule.

Tensor names: a node's output is its name, its gradient `d:<name>`; parameters keep their
graph names (in the kernels' layouts), their gradients are `grad:<name>`; per-BN vectors are
`<node>.mean` and `<node>.var`. A gradient that several consumers feed is written by the
first contribution in backward order and accumulated by the others (in place where the
kernel can, else through a temporary and an add). A concatenation's gradient is split as
PyTorch's CatBackward does it: an input whose gradient it starts gets it as a channel-slice
view of the concatenation's (no step, no bytes; grad_as_slice says when). When more parts
follow, the next one adds the view and itself into a contiguous d:x (concat_add_out from a
start: reading both, writing one, the bytes an add into the slice would move), where the rest
accumulate, as autograd's sum of two gradients is a new tensor: the reader of d:x then gets
whole rows. DenseNet-121's stem max-pool backward read its 64-channel dy as a slice of
block 1's 256-channel gradient in 13.7 ms against 7.8 ms from a contiguous dy (batch 16, 1
thread, LLC flushed between calls, 2-vCPU AMD EPYC znver5); over a baseline iteration the
pool kind went from 0.027 / 0.026 s to 0.018 / 0.019 s at 1 thread (two alternated runs each).

The unfused BN sites, per schedule (x the conv output, y the BN output, z the ReLU output):

    caffe      BatchNorm layer: statistics in two passes over x, then xh = (x - mean) * inv
               written; a separate Scale layer y = gamma * xh + beta; ReLU in place.
               Backward: ReLU in place; Scale backward (dgamma, dbeta and dxh = gamma * dy in
               one pass); BatchNorm backward from dxh and x (gamma = 1). Concat by one copy
               call per concatenation (concat_fwd); its backward by views (above).
    baseline   one BN layer: statistics in one stable pass, then y = a * x + b with
               a = gamma * inv, b = beta - mean * a; ReLU in place. Backward: ReLU in place;
               BN backward as a reduction pass and a dx pass. Concat as caffe.

A conv's bias, in every schedule, is added in its forward epilogue; its gradient is one
reduction pass over the conv's output gradient (or, under bnff, made from the sums of the BN
the conv alone feeds: lower_bnff).
"""
from __future__ import annotations

import inspect

import numpy as np

from bnff.lowering import ops
from bnff.lowering import ops_bnff as fo
from bnff.lowering.plan import RW, Plan, R, W
from bnff.lowering.schedules import Schedule
from bnff.suites.graph import INPUT, Graph


def nhwc(shape):
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape)


class Lowering:
    def __init__(self, graph: Graph, batch: int, image: int, schedule: Schedule):
        self.g, self.schedule = graph, schedule
        self.shapes = {k: nhwc(v) for k, v in graph.infer_shapes(batch, image).items()}
        self.consumers = graph.consumers()
        self.plan = Plan()
        self.io = {"params": {}, "grads": {}}
        self.seen = set()  # tensors whose gradient has had its first contribution
        # x -> (the view of a concat's gradient that is d:x's first part, (base, offset))
        # until the next part adds to it into a contiguous d:x (grad_as_slice)
        self.views = {}

    def step(self, node, what, kind, phase, call):
        self.plan.step(f"{node.name} {what}", kind, phase, *call)

    def declare_io(self):
        p = self.plan
        self.io["input"] = p.tensor(INPUT, self.shapes[INPUT], persistent=True)
        self.io["labels"] = p.tensor("labels", (self.shapes[INPUT][0],), np.int64,
                                     persistent=True)
        self.io["loss"] = p.tensor("loss", (1,), persistent=True)
        for name, shape in self.g.params().items():
            kshape = ops.param_layout(self.g.by_name[name.rsplit(".", 1)[0]].op, shape)
            self.io["params"][name] = p.tensor(name, kshape, persistent=True)
            self.io["grads"][name] = p.tensor(f"grad:{name}", kshape, persistent=True)
        self.io["constants"] = {}

    def constant(self, value, c):
        """A persistent [c] vector filled with value (Caffe's BatchNorm: gamma 1, beta 0)."""
        name = f"const{value:g}x{c}"
        if name not in self.plan.tensors:
            self.plan.tensor(name, (c,), persistent=True)
            self.io["constants"][name] = value
        return R(name)

    # --- forward -------------------------------------------------------------------------
    def forward(self, n):
        p, x = self.plan, n.inputs[0]
        shape, xs = self.shapes[n.name], self.shapes[x]
        if n.op == "relu" and self.relu_in_place(n):
            p.tensor(n.name, shape, inplace_of=x)
            self.step(n, "fwd", "relu", "forward", ops.relu_fwd_call(R(x), RW(n.name), shape))
            return
        p.tensor(n.name, shape)
        if n.op == "conv2d" and n["bias"]:
            self.step(n, "fwd +bias epilogue", "conv", "forward", fo.conv_fwd_fused_call(
                R(x), R(f"{n.name}.weight"), W(n.name), xs, n, None, (),
                *fo.with_bias(n, None, (), R(f"{n.name}.bias"))))
        elif n.op == "conv2d":
            self.step(n, "fwd", "conv", "forward",
                      ops.conv_fwd_call(R(x), R(f"{n.name}.weight"), W(n.name), xs, n))
        elif n.op == "batchnorm":
            self.bn_forward(n, x, shape)
        elif n.op == "relu":
            self.step(n, "fwd", "relu", "forward", ops.relu_fwd_call(R(x), W(n.name), shape))
        elif n.op == "maxpool2d":
            p.tensor(f"{n.name}.argmax", shape, np.int8)
            self.step(n, "fwd", "pool", "forward",
                      ops.maxpool_fwd_call(R(x), W(n.name), W(f"{n.name}.argmax"), xs, n))
        elif n.op == "avgpool2d":
            self.step(n, "fwd", "pool", "forward", ops.avgpool_fwd_call(R(x), W(n.name), xs, n))
        elif n.op == "global_avgpool":
            self.step(n, "fwd", "pool", "forward", ops.gap_fwd_call(R(x), W(n.name), xs))
        elif n.op == "flatten":
            self.step(n, "fwd", "other", "forward", ops.flatten_fwd_call(R(x), W(n.name), xs))
        elif n.op == "concat":
            self.step(n, "fwd", "concat", "forward", ops.concat_fwd_call(
                [R(i) for i in n.inputs], W(n.name), [self.shapes[i] for i in n.inputs], shape))
        elif n.op == "add":
            self.step(n, "fwd", "other", "forward",
                      ops.add_call(R(x), R(n.inputs[1]), W(n.name), shape))
        elif n.op == "linear":
            self.step(n, "fwd", "other", "forward",
                      ops.linear_fwd_call(R(x), R(f"{n.name}.weight"), R(f"{n.name}.bias"),
                                          W(n.name), xs, shape))
        else:
            raise AssertionError(n.op)

    def relu_in_place(self, n):
        """In place when the ReLU is its input's only reader and the input's producer does
        not need its own output in backward (BN, conv, add and concat need their inputs)."""
        x = n.inputs[0]
        return (x != INPUT and len(self.consumers[x]) == 1
                and self.g.by_name[x].op in ("batchnorm", "add", "conv2d", "concat"))

    def bn_forward(self, n, x, shape):
        p, c, eps = self.plan, shape[3], n["eps"]
        mean, var = p.tensor(f"{n.name}.mean", (c,)), p.tensor(f"{n.name}.var", (c,))
        gamma, beta = R(f"{n.name}.weight"), R(f"{n.name}.bias")
        if self.schedule.bn == "caffe":
            self.step(n, "stats", "bn", "forward",
                      ops.bn_stats_call(R(x), W(mean), W(var), shape, "two_pass"))
            xh = p.tensor(f"{n.name}.xh", shape)
            self.step(n, "normalize", "bn", "forward",
                      ops.bn_normalize_call(R(x), R(mean), R(var), self.constant(1, c),
                                            self.constant(0, c),
                                            W(xh), eps, shape))
            self.step(n, "scale", "bn", "forward",
                      ops.bn_scale_call(R(xh), gamma, beta, W(n.name), shape))
        else:
            self.step(n, "stats", "bn", "forward",
                      ops.bn_stats_call(R(x), W(mean), W(var), shape))
            self.step(n, "normalize", "bn", "forward",
                      ops.bn_normalize_call(R(x), R(mean), R(var), gamma, beta, W(n.name),
                                            eps, shape))

    # --- backward ------------------------------------------------------------------------
    def contribute(self, n, what, kind, target, make, native=False):
        """Emits the step `make(dst, accumulate)` producing a part of d:target. Adding the part
        through a temporary is a step of the contribution's kind: PyTorch's autograd adds a
        gradient into the one others started while it evaluates the node that made it, and
        the profile maps it to that node's kind (bnff/torchref/kinds.py). The part after a
        concat's view (self.views) writes a contiguous d:target = view + part: by
        `make(dst, True, start=view)` where make takes a start, else through a temporary; a
        native make without one adds into the view, which then is d:target."""
        d, shape = f"d:{target}", self.shapes[target]
        view, sl = self.views.pop(target, (None, None))
        starts = view is not None and (not native or "start" in inspect.signature(make).parameters)
        if view is not None:  # contiguous when the part starts from the view, else the view
            self.plan.tensor(d, shape, slice_of=None if starts else sl)
        if target not in self.seen:
            self.seen.add(target)
            self.plan.tensor(d, shape)
            self.step(n, what, kind, "backward", make(W(d), False))
        elif native:
            self.step(n, what, kind, "backward",
                      make(W(d), True, start=R(view)) if starts else make(RW(d), True))
        else:
            tmp = self.plan.tensor(f"{d}@{n.name}", shape)
            self.step(n, what, kind, "backward", make(W(tmp), False))
            if starts:
                add = ops.concat_split_call(R(tmp), W(d), shape, shape, 0, True, R(view))
            elif self.plan.strided(d):
                add = ops.concat_split_call(R(tmp), RW(d), shape, shape, 0, True)
            else:
                add = ops.add_call(R(d), R(tmp), RW(d), shape)
            self.step(n, f"accumulate d:{target}", kind, "backward", add)

    def grad_as_slice(self, x):
        """Whether a concat's first gradient contribution to x can be a channel slice of the
        concat's gradient, d:x itself when it is x's only consumer, else the view the next
        part starts from (contribute): x made by a conv or a pool (whose backward kernels read
        a strided dy) and read only by concats and BNs (whose contributions accumulate into a
        slice or start from one: concat_add_out, or BN's dx through a temporary)."""
        return (x not in self.seen and x != INPUT
                and self.g.by_name[x].op in ("conv2d", "maxpool2d", "avgpool2d")
                and all(c.op in ("concat", "batchnorm") for c in self.consumers[x]))

    def reaches(self, src, dst) -> bool:
        """Whether node dst depends on node src (a path src -> .. -> dst in the graph)."""
        todo, seen = [src], {src}
        while todo:
            v = todo.pop()
            if v == dst:
                return True
            for c in self.consumers.get(v, ()):
                if c.name not in seen:
                    seen.add(c.name)
                    todo.append(c.name)
        return False

    def shares_grad(self, n, i) -> bool:
        """Whether input i of add n can take d:n's buffer as its gradient although other nodes
        read i too, as autograd hands an add's gradient to both inputs without a copy: every
        other consumer of i lies upstream of n's other inputs, so their backward, which reads
        d:n (or its alias), runs before those consumers add their parts into the buffer
        (ResNet-50's identity shortcuts: the block's conv1 is upstream of its bn3)."""
        others = [a for a in n.inputs if a != i]
        return i not in self.seen and all(self.reaches(c.name, a) for c in self.consumers[i]
                                          if c is not n for a in others)

    def alias_grad(self, n, target, of=None):
        """d:target shares d:n's buffer, or that of the gradient `of` (a gradient passed
        through unchanged or in place)."""
        self.seen.add(target)
        self.plan.tensor(f"d:{target}", self.shapes[target], inplace_of=of or f"d:{n.name}")

    def backward(self, n):
        x = n.inputs[0]
        dy, xs, shape = R(f"d:{n.name}"), self.shapes[x], self.shapes[n.name]
        if n.op == "conv2d":
            self.bias_backward(n, dy)
            self.step(n, "bwd-weights", "conv", "backward",
                      ops.conv_bwd_weights_call(R(x), dy, W(f"grad:{n.name}.weight"), xs, n))
            if x != INPUT:
                self.contribute(n, "bwd-data", "conv", x, lambda d, acc: ops.conv_bwd_data_call(
                    dy, R(f"{n.name}.weight"), d, xs, n))
        elif n.op == "batchnorm":
            self.bn_backward(n, x, shape)
        elif n.op == "relu":
            if self.relu_in_place(n) and x not in self.seen:
                self.alias_grad(n, x)
                self.step(n, "bwd", "relu", "backward",
                          ops.relu_bwd_call(dy, R(n.name), RW(f"d:{x}"), shape))
            else:
                self.contribute(n, "bwd", "relu", x,
                                lambda d, acc: ops.relu_bwd_call(dy, R(n.name), d, shape))
        elif n.op == "maxpool2d":
            self.contribute(n, "bwd", "pool", x, lambda d, acc: ops.maxpool_bwd_call(
                dy, R(f"{n.name}.argmax"), d, xs, n))
        elif n.op == "avgpool2d":
            self.contribute(n, "bwd", "pool", x,
                            lambda d, acc: ops.avgpool_bwd_call(dy, d, xs, n))
        elif n.op == "global_avgpool":
            self.contribute(n, "bwd", "pool", x, lambda d, acc: ops.gap_bwd_call(dy, d, xs))
        elif n.op == "flatten":
            self.contribute(n, "bwd", "other", x, lambda d, acc: ops.flatten_bwd_call(dy, d, xs))
        elif n.op == "concat":
            off = 0
            for i in n.inputs:
                if self.grad_as_slice(i):  # as PyTorch's CatBackward: a view, nothing moved
                    self.seen.add(i)
                    sl = (f"d:{n.name}", off)
                    if len(self.consumers[i]) == 1:
                        self.plan.tensor(f"d:{i}", self.shapes[i], slice_of=sl)
                    else:  # the next part adds to it into a contiguous d:i, as autograd does
                        self.views[i] = (self.plan.tensor(f"d:{i}@{n.name}", self.shapes[i],
                                                          slice_of=sl), sl)
                else:
                    self.contribute(n, f"bwd {i}", "concat", i,
                                    lambda d, acc, o=off, i=i, start=None: ops.concat_split_call(
                                        dy, d, shape, self.shapes[i], o, acc, start),
                                    native=True)
                off += self.shapes[i][3]
        elif n.op == "add":
            for i in n.inputs:
                if (len(self.consumers[i]) == 1 and i not in self.seen) or self.shares_grad(n, i):
                    self.alias_grad(n, i)
                else:
                    self.contribute(n, f"bwd {i}", "other", i,
                                    lambda d, acc: ops.add_call(d, dy, d, shape) if acc
                                    else ops.copy_call(dy, d, shape), native=True)
        elif n.op == "linear":
            self.contribute(n, "bwd", "other", x, lambda d, acc: ops.linear_bwd_call(
                dy, R(x), R(f"{n.name}.weight"), d, W(f"grad:{n.name}.weight"),
                W(f"grad:{n.name}.bias"), xs, shape))
        else:
            raise AssertionError(n.op)

    def bias_backward(self, n, dy):
        """A conv's bias gradient: one reduction pass over its output gradient dy."""
        if n["bias"]:
            self.step(n, "bias grad", "other", "backward", fo.bias_grad_call(
                dy, W(f"grad:{n.name}.bias"), self.shapes[n.name]))

    def bn_backward(self, n, x, shape):
        dy, eps = R(f"d:{n.name}"), n["eps"]
        mean, var = R(f"{n.name}.mean"), R(f"{n.name}.var")
        dgamma, dbeta = f"grad:{n.name}.weight", f"grad:{n.name}.bias"
        if self.schedule.bn == "caffe":
            dxh = self.plan.tensor(f"{n.name}.dxh", shape)
            c = shape[3]
            sums = [self.plan.tensor(f"{n.name}.{v}", (c,)) for v in ("dxh_sum", "dxh_xh_sum")]
            self.step(n, "scale bwd", "bn", "backward",
                      ops.bn_scale_bwd_call(dy, R(f"{n.name}.xh"), R(f"{n.name}.weight"),
                                            W(dgamma), W(dbeta), W(dxh), shape))
            self.contribute(n, "bwd", "bn", x, lambda d, acc: ops.bn_bwd_call(
                R(dxh), R(x), mean, var, self.constant(1, c), W(sums[1]), W(sums[0]), d, eps, shape))
        else:
            self.contribute(n, "bwd", "bn", x, lambda d, acc: ops.bn_bwd_call(
                dy, R(x), mean, var, R(f"{n.name}.weight"), W(dgamma), W(dbeta), d, eps,
                shape))

    # --- whole iteration -----------------------------------------------------------------
    def lower(self):
        self.declare_io()
        for n in self.g.nodes:
            self.forward(n)
        out = self.g.output
        self.plan.tensor(f"d:{out}", self.shapes[out])
        self.plan.step("loss", "other", "forward",
                       *ops.softmax_xent_call(R(out), R("labels"), W("loss"), W(f"d:{out}"),
                                              self.shapes[out]))
        self.seen.add(out)
        live = {out}
        for n in reversed(self.g.nodes):
            if n.name in live:
                live.update(n.inputs)
                self.backward(n)
        return self.plan, self.io

