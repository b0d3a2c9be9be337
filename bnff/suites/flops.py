"""Arithmetic of a network: multiply-adds of its convolutions and linear layers, counted as
2 FLOPs each (the usual convention; BN, ReLU, pooling and the loss are a rounding error next
to them and are left out here; their bytes are what matter, and kernels declare those).

A training iteration is the forward pass plus, for every conv and linear layer, backward-data
and backward-weights, each as many FLOPs as its forward; a layer that reads the graph input
needs no backward-data."""
from __future__ import annotations

from bnff.suites.graph import INPUT, Graph


def layer_flops(graph: Graph, batch: int, image: int) -> dict:
    """name -> forward FLOPs of every conv2d and linear node."""
    shapes = graph.infer_shapes(batch, image)
    out = {}
    for n in graph.nodes:
        if n.op == "conv2d":
            _, c, _, _ = shapes[n.inputs[0]]
            nb, k, oh, ow = shapes[n.name]
            out[n.name] = 2 * nb * oh * ow * k * c * n["kernel"] ** 2
        elif n.op == "linear":
            nb, f = shapes[n.inputs[0]]
            out[n.name] = 2 * nb * f * n["out_features"]
    return out


def network_flops(graph: Graph, batch: int, image: int) -> tuple:
    """(forward FLOPs, training-iteration FLOPs)."""
    per_layer = layer_flops(graph, batch, image)
    forward = sum(per_layer.values())
    backward = sum(2 * f if graph.by_name[name].inputs[0] != INPUT else f
                   for name, f in per_layer.items())
    return forward, forward + backward
