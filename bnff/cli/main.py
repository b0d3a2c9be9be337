"""`bnff`: the command-line entry point. Each module in COMMANDS registers its subcommands
with `add_parser(subparsers)` and sets `func` (args -> exit code) on them."""
from __future__ import annotations

import argparse
import importlib
import sys

from bnff.cli.args import UserError
from bnff.suites.graph import GraphError

COMMANDS = [
    "bnff.cli.show",
    "bnff.cli.import_onnx",
    "bnff.cli.check",
    "bnff.cli.roofline",
    "bnff.cli.micro",
    "bnff.cli.bench",
    "bnff.cli.report",
    "bnff.cli.compare",
    "bnff.cli.ci_table",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnff",
        description="Benchmarks of batch-normalization fission and fusion (BNFF) "
                    "for CNN training on the CPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, GraphError) as e:
        print(f"bnff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
