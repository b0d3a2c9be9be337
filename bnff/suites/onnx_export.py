"""Graphs -> ONNX models, the inverse of onnx_import (which reads back an equal graph).

Each graph op becomes the ONNX op onnx_import maps onto it: conv2d -> Conv, batchnorm ->
BatchNormalization (training mode; running mean and var `<node>.running_mean` / `.running_var`
as PyTorch names them), relu -> Relu, maxpool2d -> MaxPool, avgpool2d -> AveragePool,
global_avgpool -> GlobalAveragePool + Flatten, flatten -> Flatten, concat -> Concat (axis 1),
add -> Add, linear -> Gemm (transB = 1). Nodes and parameters keep their names. With params the
parameters are initializers holding those values; without, they are graph inputs with static
shapes (a structure-only model: a ResNet-152 in kilobytes, not 240 MB).
"""
from __future__ import annotations

import numpy as np

from bnff.suites.graph import INPUT, Graph
from bnff.suites.onnx_import import _onnx

OPSET = 17


def to_onnx(graph: Graph, params: dict = None, image: int = None):
    """The ModelProto of graph: input [batch, C, image, image] (batch symbolic; image too
    unless given)."""
    onnx = _onnx()
    h = onnx.helper
    nodes, inits, inputs = [], [], []

    def param(name, shape, value=None):
        if params is None:
            inputs.append(h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
        else:
            v = params[name] if value is None else value
            inits.append(onnx.numpy_helper.from_array(np.asarray(v, np.float32).reshape(shape),
                                                      name))
        return name

    shapes = graph.params()
    for n in graph.nodes:
        x, p = n.inputs, lambda k: param(f"{n.name}.{k}", shapes[f"{n.name}.{k}"])
        if n.op == "conv2d":
            ins = [x[0], p("weight")] + ([p("bias")] if n["bias"] else [])
            nodes.append(h.make_node("Conv", ins, [n.name], n.name, kernel_shape=[n["kernel"]] * 2,
                                     strides=[n["stride"]] * 2, pads=[n["padding"]] * 4, group=1))
        elif n.op == "batchnorm":
            c = shapes[f"{n.name}.weight"]
            stats = [param(f"{n.name}.running_mean", c, np.zeros(c)),
                     param(f"{n.name}.running_var", c, np.ones(c))]
            nodes.append(h.make_node("BatchNormalization", [x[0], p("weight"), p("bias")] + stats,
                                     [n.name], n.name, epsilon=n["eps"],
                                     momentum=1.0 - n["momentum"], training_mode=1))
        elif n.op == "relu":
            nodes.append(h.make_node("Relu", x, [n.name], n.name))
        elif n.op in ("maxpool2d", "avgpool2d"):
            pad = n.attrs.get("padding", 0)
            nodes.append(h.make_node("MaxPool" if n.op == "maxpool2d" else "AveragePool", x,
                                     [n.name], n.name, kernel_shape=[n["kernel"]] * 2,
                                     strides=[n["stride"]] * 2, pads=[pad] * 4))
        elif n.op == "global_avgpool":
            nodes.append(h.make_node("GlobalAveragePool", x, [f"{n.name}:nchw"], n.name))
            nodes.append(h.make_node("Flatten", [f"{n.name}:nchw"], [n.name], f"{n.name}.flatten",
                                     axis=1))
        elif n.op == "flatten":
            nodes.append(h.make_node("Flatten", x, [n.name], n.name, axis=1))
        elif n.op == "concat":
            nodes.append(h.make_node("Concat", x, [n.name], n.name, axis=1))
        elif n.op == "add":
            nodes.append(h.make_node("Add", x, [n.name], n.name))
        elif n.op == "linear":
            nodes.append(h.make_node("Gemm", [x[0], p("weight"), p("bias")], [n.name], n.name,
                                     transB=1))
        else:
            raise AssertionError(n.op)
    side = image if image else "image"
    image_in = h.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT,
                                        ["batch", graph.input_channels, side, side])
    out = h.make_tensor_value_info(graph.output, onnx.TensorProto.FLOAT,
                                   ["batch", graph.channels[graph.output]])
    g = h.make_graph(nodes, graph.name, [image_in] + inputs, [out], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", OPSET)],
                        producer_name="bnff-bench")
