"""Seeded problems: parameters, input and labels for one training iteration.

Conv weights are He-normal (std sqrt(2/fan_in)); BN gamma is drawn from U(0.5, 1.5) and beta
from U(-0.5, 0.5), not 1 and 0, so every term of the BN backward pass is exercised; linear
weights are N(0, 1/fan_in), conv and linear biases U(-0.1, 0.1). Input is N(0, 1) float32
NCHW; labels are uniform over the output features. All values are float32, so a float32 schedule and the float64
reference start from identical numbers.
"""
from __future__ import annotations

import numpy as np

from bnff.suites.graph import Graph


def make_params(graph: Graph, seed: int) -> dict:
    rng = np.random.default_rng([seed, 0])
    params = {}
    for name, shape in graph.params().items():
        node, kind = name.rsplit(".", 1)
        op = graph.by_name[node].op
        if op == "conv2d" and kind == "weight":
            fan_in = shape[1] * shape[2] * shape[3]
            v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif op == "batchnorm":
            v = rng.uniform(0.5, 1.5, shape) if kind == "weight" else rng.uniform(-0.5, 0.5, shape)
        elif kind == "weight":
            v = rng.standard_normal(shape) / np.sqrt(shape[1])
        else:
            v = rng.uniform(-0.1, 0.1, shape)
        params[name] = v.astype(np.float32)
    return params


def make_batch(graph: Graph, batch: int, image: int, seed: int):
    """Returns (input float32 [B, C, S, S], labels int64 [B])."""
    rng = np.random.default_rng([seed, 1])
    x = rng.standard_normal((batch, graph.input_channels, image, image)).astype(np.float32)
    classes = graph.infer_shapes(batch, image)[graph.output][1]
    labels = rng.integers(0, classes, batch).astype(np.int64)
    return x, labels
