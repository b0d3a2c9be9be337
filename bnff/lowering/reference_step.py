"""The float64 reference training iteration over any graph: forward, mean softmax
cross-entropy against the labels, backward producing every parameter's gradient.
Built only from `bnff.kernels.reference`; every schedule is checked against it."""
from __future__ import annotations

import numpy as np

from bnff.kernels import reference as R
from bnff.suites.graph import INPUT, Graph


def _forward(n, xs, params):
    """Returns (output, cache for backward)."""
    a, p = n.attrs, lambda k: params[f"{n.name}.{k}"]
    x = xs[0]
    if n.op == "conv2d":
        bias = p("bias") if a["bias"] else None
        return R.conv2d_forward(x, p("weight"), a["stride"], a["padding"], bias), None
    if n.op == "batchnorm":
        return R.batchnorm_forward(x, p("weight"), p("bias"), a["eps"])
    if n.op == "relu":
        y = R.relu_forward(x)
        return y, y
    if n.op == "maxpool2d":
        return R.maxpool2d_forward(x, a["kernel"], a["stride"], a["padding"])
    if n.op == "avgpool2d":
        return R.avgpool2d_forward(x, a["kernel"], a["stride"]), None
    if n.op == "global_avgpool":
        return R.global_avgpool_forward(x), None
    if n.op == "flatten":
        return R.flatten_forward(x), None
    if n.op == "concat":
        return R.concat_forward(xs), None
    if n.op == "add":
        return R.add_forward(xs[0], xs[1]), None
    if n.op == "linear":
        return R.linear_forward(x, p("weight"), p("bias")), None
    raise AssertionError(n.op)


def _backward(n, dy, xs, cache, params, grads):
    """Returns the gradients of the node's inputs; stores parameter gradients in grads."""
    a, p = n.attrs, lambda k: params[f"{n.name}.{k}"]
    x = xs[0]
    if n.op == "conv2d":
        dx, grads[f"{n.name}.weight"] = R.conv2d_backward(dy, x, p("weight"), a["stride"],
                                                          a["padding"])
        if a["bias"]:
            grads[f"{n.name}.bias"] = R.conv2d_bias_backward(dy)
        return [dx]
    if n.op == "batchnorm":
        dx, grads[f"{n.name}.weight"], grads[f"{n.name}.bias"] = R.batchnorm_backward(
            dy, p("weight"), cache)
        return [dx]
    if n.op == "relu":
        return [R.relu_backward(dy, cache)]
    if n.op == "maxpool2d":
        return [R.maxpool2d_backward(dy, cache, x.shape, a["kernel"], a["stride"], a["padding"])]
    if n.op == "avgpool2d":
        return [R.avgpool2d_backward(dy, x.shape, a["kernel"], a["stride"])]
    if n.op == "global_avgpool":
        return [R.global_avgpool_backward(dy, x.shape)]
    if n.op == "flatten":
        return [R.flatten_backward(dy, x.shape)]
    if n.op == "concat":
        return R.concat_backward(dy, [t.shape[1] for t in xs])
    if n.op == "add":
        return [dy, dy]
    if n.op == "linear":
        dx, grads[f"{n.name}.weight"], grads[f"{n.name}.bias"] = R.linear_backward(
            dy, x, p("weight"))
        return [dx]
    raise AssertionError(n.op)


def train_step(graph: Graph, params: dict, x, labels):
    """Returns (loss, grads) in float64; params and x may be float32."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    acts = {INPUT: np.asarray(x, np.float64)}
    caches = {}
    for n in graph.nodes:
        acts[n.name], caches[n.name] = _forward(n, [acts[i] for i in n.inputs], params)
    loss, dout = R.softmax_cross_entropy(acts[graph.output], labels)
    grads, dacts = {}, {graph.output: dout}
    for n in reversed(graph.nodes):
        dy = dacts.pop(n.name, None)
        if dy is None:  # a node whose output does not reach the loss
            continue
        xs = [acts[i] for i in n.inputs]
        for i, dx in zip(n.inputs, _backward(n, dy, xs, caches.pop(n.name), params, grads)):
            if i != INPUT:
                dacts[i] = dacts[i] + dx if i in dacts else dx
    for name, shape in graph.params().items():
        grads.setdefault(name, np.zeros(shape))
    return loss, {k: grads[k] for k in graph.params()}
