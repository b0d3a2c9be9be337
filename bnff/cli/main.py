"""`bnff`: the command-line entry point. Each module in COMMANDS registers its subcommands
with `add_parser(subparsers)` and sets `func` (args -> exit code) on them.

Exit status: 0 done; 1 a run that failed its own checks (RunFailed: NaN/Inf, a schedule or
variant off its reference); 2 bad input (one line, no traceback, no file written); 130 after
Ctrl-C and 143 after SIGTERM (the commands append their rows as they go, so what was measured
before the signal is kept)."""
from __future__ import annotations

import importlib
import signal
import sys

from bnff.cli.args import Parser, RunFailed, UserError
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


class Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler, like KeyboardInterrupt for SIGINT."""


def _terminate(signum, frame):
    raise Terminated()


def build_parser() -> Parser:
    parser = Parser(
        prog="bnff",
        description="Benchmarks of batch-normalization fission and fusion (BNFF) "
                    "for CNN training on the CPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # SIGINT as KeyboardInterrupt even where the parent or a runtime left the default action
    previous = signal.signal(signal.SIGTERM, _terminate), \
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.func(args) or 0
    except (UserError, GraphError) as e:
        print(f"bnff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"bnff {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"bnff {args.command}: error: out of memory; use a smaller --batch or --image",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bnff {args.command}: interrupted (Ctrl-C); rows measured before it are kept",
              file=sys.stderr)
        return 130
    except Terminated:
        print(f"bnff {args.command}: terminated (SIGTERM); rows measured before it are kept",
              file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


if __name__ == "__main__":
    sys.exit(main())
