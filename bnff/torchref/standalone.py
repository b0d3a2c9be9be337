"""A standalone PyTorch training loop, the yardstick of the `pytorch` schedule and of the
allocator choice: `python -m bnff.torchref.standalone NET [--batch B --image S --threads T
--repeat R --allocator A,B,...]` runs, per allocator, a fresh process that builds the graph's
module (model.py) with the suite's seeded parameters and batch, runs one warm-up iteration and
R timed ones back to back in one loop, and prints the median seconds per iteration. Allocators
are interleaved round by round (one process each, R iterations per round, rounds = --rounds)
so machine drift hits them alike."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def loop(net: str, batch: int, image: int, threads: int, repeat: int) -> list:
    import torch

    from bnff.suites import networks
    from bnff.suites.problem import make_batch, make_params
    from bnff.torchref.model import GraphModule, inputs, step
    torch.set_num_threads(threads)
    graph = networks.load(net)
    model = GraphModule(graph, make_params(graph, 0))
    x, labels = inputs(*make_batch(graph, batch, image, 0))
    step(model, x, labels)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        step(model, x, labels)
        times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    from bnff.torchref.schedule import ALLOCATORS, allocator_env, child_env
    p = argparse.ArgumentParser(prog="python -m bnff.torchref.standalone",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("network")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--allocator", default=",".join(ALLOCATORS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(loop(a.network, a.batch, a.image, a.threads, a.repeat)))
        return 0
    names = a.allocator.split(",")
    for n in names:
        if n not in ALLOCATORS or allocator_env(n) is None:
            print(f"allocator {n!r} unknown or unavailable here; known: {', '.join(ALLOCATORS)}",
                  file=sys.stderr)
            return 2
    times = {n: [] for n in names}
    cmd = [sys.executable, "-m", "bnff.torchref.standalone", a.network, "--batch", str(a.batch),
           "--image", str(a.image), "--threads", str(a.threads), "--repeat", str(a.repeat),
           "--child"]
    for _ in range(a.rounds):
        for n in names:
            out = subprocess.run(cmd, env=child_env(n), capture_output=True, text=True, check=True)
            times[n] += json.loads(out.stdout)
    for n in names:
        print(f"{a.network} batch {a.batch} image {a.image} threads {a.threads} allocator {n}: "
              f"median {statistics.median(times[n]):.3f} s/iter, min {min(times[n]):.3f} "
              f"({len(times[n])} iterations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
