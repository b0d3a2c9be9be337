"""`bnff`: the command-line entry point. Each module in COMMANDS registers its subcommands
with `add_parser(subparsers)` and sets `func` (args -> exit code) on them.

Exit status: 0 done; 1 a run that failed its own checks (RunFailed: NaN/Inf, a schedule or
variant off its reference); 2 bad input (one line, no traceback, no file written); 130 after
Ctrl-C and 143 after SIGTERM (the commands append their rows as they go, so what was measured
before the signal is kept).

Signals: main() installs its SIGINT and SIGTERM handlers before it imports the commands
(numpy, Numba, LLVM: a second or more on a busy machine), so only the interpreter's start and
this module's imports (the standard library, two small modules) are left to the default
action. A handler raises in the main thread at the next bytecode, which may be a Python
callback run from C, where the exception cannot propagate: llvmlite's object-cache hook, a
ctypes callback Numba's compiler calls for every module it compiles, or a __del__. Python
reports such an exception to sys.unraisablehook and goes on (before, a SIGTERM during a
compilation was lost this way and the run went on to exit 0). The hook main() installs starts
a thread that sends the signal again, every RESEND seconds, until main() has caught the
exception; a signal that arrives after that is not raised again, and what the unwinding frees
is not reported (a compilation interrupted half-way leaves llvmlite objects whose __del__
fails). Raised inside a Python call that Numba's dispatcher makes from C, the exception
surfaces as a SystemError ("returned a result with an exception set") caused by it, and counts
as the signal. Called as the program (argv None), main() leaves SIGINT and SIGTERM ignored when it
returns: a signal during the interpreter's teardown (Numba's and LLVM's included) would
otherwise kill it with the default action, exit status -15 or -2 after the command had
finished and written its rows."""
from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import threading
import time

from bnff.errors import RunFailed, UserError
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


RAISES = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
SIGNAL_OF = {exc: sig for sig, exc in RAISES.items()}
RESEND = 0.1  # seconds between two sends of a signal whose exception was swallowed

# Commands that time kernels in this process. Their numpy BLAS (OpenBLAS in numpy's wheels)
# serves only the float64 validation, so it runs on one thread unless the user set
# OPENBLAS_NUM_THREADS: OpenBLAS's threads spin on after a validation and take the cores from
# Numba's. Measured on the 2-vCPU AMD EPYC (znver5): DenseNet-121's FLOP-weighted forward
# conv at 2 threads read 50 and 67 % of sgemm in two micro runs without this, 135 % with it.
# The sgemm reference runs in a child process with its own thread count (measure/roofline.py).
TIMING_COMMANDS = {"micro", "bench", "roofline"}


def _single_thread_blas(argv) -> None:
    """Sets OPENBLAS_NUM_THREADS=1 for a timing command, before numpy is imported."""
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), None)
    if command in TIMING_COMMANDS:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class _Signals:
    """The state main()'s handlers share: a signal whose exception was swallowed and is not
    yet caught by main(), whether main() has caught one, the thread re-sending it."""

    def __init__(self):
        self.swallowed, self.caught, self.resender = None, False, None

    def handler(self, signum, frame):
        if self.caught:
            return  # main() is already ending on a signal
        raise RAISES[signum]()

    def unraisable(self, unraisable, hook):
        """sys.unraisablehook: a KeyboardInterrupt or Terminated here was raised by handler()
        in a callback from C and swallowed; the signal is sent again until main() catches.
        Other reports go to `hook`, unless main() is ending on a signal."""
        if self.caught:
            return
        if unraisable.exc_type not in SIGNAL_OF:
            hook(unraisable)
        elif self.resender is None:
            self.swallowed = SIGNAL_OF[unraisable.exc_type]
            self.resender = threading.Thread(target=self._resend, args=(self.swallowed,),
                                             daemon=True)
            self.resender.start()

    def _resend(self, signum):
        while not self.caught:
            time.sleep(RESEND)
            if not self.caught:
                os.kill(os.getpid(), signum)

    def check(self):
        """Raises the exception of a swallowed signal not raised again yet (a command that
        ended meanwhile was still interrupted)."""
        if self.swallowed is not None and not self.caught:
            raise RAISES[self.swallowed]()

    def catch(self):
        """In main()'s handler of the exception: no more raising, no more re-sending."""
        self.caught = True
        self.stop()

    def stop(self):
        """Waits for the re-sending thread, if any, to end (it ends once caught)."""
        if self.resender is not None:
            self.caught = True
            self.resender.join()


STOPPED = {KeyboardInterrupt: ("interrupted (Ctrl-C)", 130),
           Terminated: ("terminated (SIGTERM)", 143)}


def _signal_exception(e):
    """The type of the signal's exception e is or was raised from, else None: a handler's
    exception raised inside a call Numba's dispatcher makes from C comes out as a SystemError
    ("returned a result with an exception set") caused by it."""
    while e is not None:
        if type(e) in STOPPED:
            return type(e)
        e = e.__cause__ or e.__context__
    return None


def build_parser():
    from bnff.cli.args import Parser  # numpy, Numba: after main() set its handlers
    parser = Parser(
        prog="bnff",
        description="Benchmarks of batch-normalization fission and fusion (BNFF) "
                    "for CNN training on the CPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    signals = _Signals()
    previous = (signal.signal(signal.SIGTERM, signals.handler),
                signal.signal(signal.SIGINT, signals.handler), sys.unraisablehook)
    sys.unraisablehook = lambda u: signals.unraisable(u, previous[2])
    command = "bnff"
    _single_thread_blas(argv)
    try:
        args = build_parser().parse_args(argv)
        command = f"bnff {args.command}"
        code = args.func(args) or 0
        signals.check()
        return code
    except (KeyboardInterrupt, Terminated, SystemError) as e:
        stop = _signal_exception(e)
        if stop is None:
            raise
        signals.catch()
        what, code = STOPPED[stop]
        print(f"{command}: {what}; rows measured before it are kept", file=sys.stderr)
        return code
    except (UserError, GraphError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"{command}: failed: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"{command}: error: out of memory; use a smaller --batch or --image",
              file=sys.stderr)
        return 2
    finally:
        signals.stop()
        if signals.caught:
            gc.collect()  # what the unwinding freed reports to the hook that drops it
        program = argv is None
        signal.signal(signal.SIGTERM, signal.SIG_IGN if program else previous[0])
        signal.signal(signal.SIGINT, signal.SIG_IGN if program else previous[1])
        sys.unraisablehook = previous[2]


if __name__ == "__main__":
    sys.exit(main())
