"""The child process of the `pytorch` schedule (bnff/torchref/schedule.py starts it): builds
the graph as a GraphModule with the suite's seeded parameters and batch, then answers one
JSON line per request on stdin, on stdout:

    {"op": "run", "threads": T}      one training iteration -> {"seconds"}
    {"op": "result", "path": F}      loss and gradients of the last iteration -> F (.npz)
    {"op": "profile", "threads": T, "repeat": R}
                                     R profiled iterations -> {"kinds": {kind: median s},
                                     "seconds": their median wall s}

The first line is the problem: {"graph": graph JSON, "problem": an .npz of `input`,
`labels` and `param:<name>`, the arrays the parent's schedules got}. Only this
process imports torch, so its allocator (see schedule.py) and OpenMP threads are its own.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from bnff.suites.graph import Graph
from bnff.torchref.kinds import KINDS, by_kind
from bnff.torchref.model import GraphModule, inputs, step


def set_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def profile(model, x, labels, repeat: int) -> dict:
    """{"kinds": {kind: median s}, "seconds": median wall s of the profiled iterations}."""
    per, walls = {k: [] for k in KINDS}, []
    for _ in range(repeat):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()  # the step alone: not the profiler's start and stop
            step(model, x, labels)
            walls.append(time.perf_counter() - t)
        for k, s in by_kind(prof.events()).items():
            per[k].append(s)
    return {"kinds": {k: statistics.median(v) for k, v in per.items()},
            "seconds": statistics.median(walls)}


def main() -> None:
    problem = json.loads(sys.stdin.readline())
    graph = Graph.from_dict(problem["graph"])
    with np.load(problem["problem"], allow_pickle=False) as f:
        params = {k.removeprefix("param:"): f[k] for k in f.files if k.startswith("param:")}
        x, labels = inputs(f["input"], f["labels"])
    model = GraphModule(graph, params)
    loss = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "run":
            set_threads(req["threads"])
            t = time.perf_counter()
            loss = step(model, x, labels)
            reply = {"seconds": time.perf_counter() - t}
        elif req["op"] == "result":
            arrays = {f"grad:{k}": v for k, v in model.grads().items()}
            np.savez(req["path"], loss=np.array(loss, np.float32), **arrays)
            reply = {"path": req["path"]}
        elif req["op"] == "profile":
            set_threads(req["threads"])
            reply = profile(model, x, labels, req["repeat"])
        else:
            reply = {"error": f"unknown request {req['op']!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
