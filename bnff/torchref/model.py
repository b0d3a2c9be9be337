"""A suite graph (bnff/suites/graph.py) as a `torch.nn.Module`, and its training iteration.

Every graph op maps to the PyTorch module or function a PyTorch user would write: conv2d ->
nn.Conv2d(bias=False), batchnorm -> nn.BatchNorm2d (training mode: batch statistics, running
statistics updated), relu -> nn.ReLU (in place when its input has no other reader, as
torchvision's networks do), maxpool2d / avgpool2d -> F.max_pool2d / F.avg_pool2d,
global_avgpool -> F.adaptive_avg_pool2d + flatten, concat -> torch.cat(dim=1), add -> +,
linear -> nn.Linear, flatten -> torch.flatten (NCHW order, as the suite's). Parameters are the suite's seeded ones (bnff/suites/problem.py), copied
in; the module and the input are channels_last float32.

One iteration (`step`) is what the suite's schedules do: forward, mean softmax cross-entropy
against the labels, backward into fresh parameter gradients (no optimizer step).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnff.suites.graph import INPUT, Graph


class GraphModule(nn.Module):
    def __init__(self, graph: Graph, params: dict):
        super().__init__()
        self.graph = graph
        readers = graph.consumers()
        self.layers = nn.ModuleDict()  # by node index: node names may contain dots
        self.key = {n.name: str(i) for i, n in enumerate(graph.nodes)}
        self.node = {k: name for name, k in self.key.items()}
        for n in graph.nodes:
            cin = graph.channels[n.inputs[0]]
            if n.op == "conv2d":
                m = nn.Conv2d(cin, n["out_channels"], n["kernel"], n["stride"], n["padding"],
                              bias=n["bias"])
            elif n.op == "batchnorm":
                m = nn.BatchNorm2d(cin, eps=n["eps"], momentum=n["momentum"])
            elif n.op == "relu":
                m = nn.ReLU(inplace=n.inputs[0] != INPUT and len(readers[n.inputs[0]]) == 1)
            elif n.op == "linear":
                m = nn.Linear(cin, n["out_features"])
            else:
                continue
            self.layers[self.key[n.name]] = m
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(params[self._suite_name(name)],
                                                    np.float32)))
        self.to(memory_format=torch.channels_last)
        self.train()

    def forward(self, x):
        acts = {INPUT: x}
        for n in self.graph.nodes:
            xs = [acts[i] for i in n.inputs]
            if self.key[n.name] in self.layers:
                y = self.layers[self.key[n.name]](xs[0])
            elif n.op == "maxpool2d":
                y = F.max_pool2d(xs[0], n["kernel"], n["stride"], n["padding"])
            elif n.op == "avgpool2d":
                y = F.avg_pool2d(xs[0], n["kernel"], n["stride"])
            elif n.op == "global_avgpool":
                y = torch.flatten(F.adaptive_avg_pool2d(xs[0], 1), 1)
            elif n.op == "concat":
                y = torch.cat(xs, 1)
            elif n.op == "add":
                y = xs[0] + xs[1]
            elif n.op == "flatten":
                y = torch.flatten(xs[0], 1)
            else:
                raise AssertionError(n.op)
            acts[n.name] = y
        return acts[self.graph.output]

    def _suite_name(self, name: str) -> str:
        """'layers.7.weight' -> '<node 7>.weight'."""
        _, key, kind = name.split(".")
        return f"{self.node[key]}.{kind}"

    def grads(self) -> dict:
        """Parameter gradients by suite name, float32, in the exported layouts."""
        return {self._suite_name(name): p.grad.contiguous().numpy().copy()
                for name, p in self.named_parameters()}


def inputs(x, labels):
    """The batch as torch tensors: x channels_last float32, labels int64."""
    tx = torch.from_numpy(np.asarray(x, np.float32)).contiguous(memory_format=torch.channels_last)
    return tx, torch.from_numpy(np.asarray(labels, np.int64))


def step(model: GraphModule, x, labels) -> float:
    """One training iteration: forward, mean cross-entropy, backward; returns the loss."""
    for p in model.parameters():
        p.grad = None
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    return float(loss.detach())


def train_step(graph: Graph, params: dict, x, labels):
    """(loss, grads) of one float32 PyTorch iteration, like the other schedules' train_step."""
    model = GraphModule(graph, params)
    loss = step(model, *inputs(x, labels))
    return loss, model.grads()
