"""`bnff networks` and `bnff show`: what the built-in networks are, and one network's layers
or its JSON graph."""
from __future__ import annotations

import sys

from tabulate import tabulate

from bnff.cli.args import add_network_args, positive_int
from bnff.suites import networks
from bnff.suites.flops import network_flops


def add_parser(sub) -> None:
    p = sub.add_parser("networks", help="list built-in networks with parameters and FLOPs",
                       description="List the built-in networks with their parameter count and "
                                   "GFLOPs per image (conv and linear multiply-adds x2) for the "
                                   "forward pass and for one training iteration.")
    p.add_argument("--image", type=positive_int, default=224,
                   help="input height and width (default 224)")
    p.set_defaults(func=run_networks)
    p = sub.add_parser("show", help="print a network's layers, or its JSON graph",
                       description="Print a network's nodes with output shapes and parameter "
                                   "counts, or with --json its graph in the JSON format that "
                                   "every command taking NET also reads.")
    add_network_args(p, batch=1)
    p.add_argument("--json", action="store_true", help="print the JSON graph instead")
    p.set_defaults(func=run_show)


def run_networks(args) -> int:
    rows = []
    for name in networks.BUILTIN:
        g = networks.load(name)
        fwd, train = network_flops(g, 1, args.image)
        rows.append([name, f"{g.num_params():,}", len(g.nodes), f"{fwd / 1e9:.3f}",
                     f"{train / 1e9:.3f}"])
    print(tabulate(rows, headers=["network", "parameters", "nodes",
                                  f"fwd GFLOP/img @{args.image}",
                                  f"train GFLOP/img @{args.image}"],
                   colalign=("left", "right", "right", "right", "right")))
    return 0


def run_show(args) -> int:
    g = networks.load(args.network)
    if args.json:
        sys.stdout.write(g.to_json() + "\n")
        return 0
    shapes = g.infer_shapes(args.batch, args.image)
    params = g.params()
    rows = []
    for n in g.nodes:
        count = sum(_size(s) for k, s in params.items() if k.rsplit(".", 1)[0] == n.name)
        attrs = " ".join(f"{k}={v}" for k, v in n.attrs.items())
        inputs = ", ".join(n.inputs) if len(n.inputs) <= 3 else f"{len(n.inputs)} inputs"
        rows.append([n.name, n.op, attrs, inputs, "x".join(map(str, shapes[n.name])),
                     f"{count:,}" if count else ""])
    print(tabulate(rows, headers=["node", "op", "attributes", "inputs", "output", "params"]))
    print(f"\n{g.name}: {len(g.nodes)} nodes, {g.num_params():,} parameters, "
          f"input {'x'.join(map(str, shapes['input']))}")
    return 0


def _size(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
