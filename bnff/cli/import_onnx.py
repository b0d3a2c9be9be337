"""`bnff import`: an ONNX model as this suite's JSON graph (bnff.suites.onnx_import)."""
from __future__ import annotations

import sys

from bnff.cli.args import UserError
from bnff.suites.onnx_import import SUPPORTED, load_onnx


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import", help="convert an ONNX model into a JSON graph",
        description="Convert an ONNX model (e.g. from torch.onnx.export) into this suite's JSON "
                    "graph. Supported ONNX ops: " + ", ".join(SUPPORTED) + " (Flatten and "
                    "Reshape only to [N, C*H*W], Dropout only when inactive). "
                    "Anything else is refused, naming the node. Every command taking NET also "
                    "reads a .onnx path directly; the image size stays --image.")
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model")
    p.add_argument("-o", "--output", metavar="GRAPH.json",
                   help="write the graph here (default: print it)")
    p.set_defaults(func=run)


def run(args) -> int:
    graph = load_onnx(args.model)
    text = graph.to_json() + "\n"
    if not args.output:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"cannot write {args.output}: {e.strerror}") from None
    print(f"{args.output}: {graph.name}, {len(graph.nodes)} nodes, "
          f"{graph.num_params():,} parameters, {graph.input_channels} input channels",
          file=sys.stderr)
    return 0
