"""Runs a Schedule (bnff/lowering/schedules.py: the value, never a name): lowers the graph
once, allocates every buffer once (touched, so page faults stay out of the timings), loads
parameters and a batch, and runs iterations."""
from __future__ import annotations

import numpy as np

from bnff.lowering import ops
from bnff.lowering.dispatch import lower
from bnff.lowering.schedules import Schedule
from bnff.suites.graph import Graph


class Executor:
    def __init__(self, graph: Graph, schedule: Schedule, batch: int, image: int):
        self.graph, self.schedule = graph, schedule
        self.batch, self.image = batch, image
        self.plan, self.io = lower(graph, batch, image, schedule)
        self.arrays = self.calls = None

    @property
    def loaded(self) -> bool:
        """Buffers allocated (and a problem loaded) since the last release."""
        return self.arrays is not None

    def peak_bytes(self) -> int:
        return self.plan.peak_bytes()

    def allocate(self) -> None:
        self.arrays = self.plan.allocate()
        for a in self.arrays.values():
            a.reshape(-1).view(np.uint8).fill(0)
        self.calls = self.plan.bind(self.arrays)

    def release(self) -> None:
        self.arrays = self.calls = None

    def load(self, params: dict, x, labels) -> None:
        if self.arrays is None:
            self.allocate()
        for name, t in self.io["params"].items():
            op = self.graph.by_name[name.rsplit(".", 1)[0]].op
            self.arrays[t][...] = ops.to_kernel_layout(op, params[name])
        for name, fill in self.io.get("constants", {}).items():
            self.arrays[name][...] = fill
        self.arrays[self.io["input"]][...] = np.moveaxis(np.asarray(x, np.float32), 1, 3)
        self.arrays[self.io["labels"]][...] = labels

    def run(self, times=None) -> None:
        self.plan.run(self.calls, times)

    def loss(self) -> float:
        return float(self.arrays[self.io["loss"]][0])

    def grads(self) -> dict:
        """Parameter gradients in the exported layouts (conv [O, I, KH, KW], linear [out, in])."""
        out = {}
        for name, t in self.io["grads"].items():
            op = self.graph.by_name[name.rsplit(".", 1)[0]].op
            out[name] = ops.from_kernel_layout(op, self.arrays[t]).copy()
        return out


def train_step(graph: Graph, params: dict, x, labels, schedule: Schedule):
    """One float32 iteration of `schedule`: (loss, grads), like the reference's train_step."""
    ex = Executor(graph, schedule, x.shape[0], x.shape[2])
    ex.load(params, x, labels)
    ex.run()
    return ex.loss(), ex.grads()

