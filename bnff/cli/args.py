"""Argument types, checks and errors shared by the `bnff` commands.

Every check here runs before any measurement: a bad argument, an output path that cannot be
written or a run that does not fit in memory ends the command with one line and exit 2, and
leaves no file created or changed."""
from __future__ import annotations

import argparse
import math
import os
import sys

import numba
import psutil

from bnff.errors import (RunFailed, UserError, writable_file,  # noqa: F401  (re-exported:
                         writable_folder)                     # the commands' checks)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `bnff bench: error: ... (see bnff bench --help)`, exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _number(text: str, kind, what: str, ok):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def nonneg_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: math.isfinite(v) and v > 0)


def nonneg_float(text: str) -> float:
    return _number(text, float, "a number >= 0", lambda v: math.isfinite(v) and v >= 0)


def thread_list(text: str) -> list:
    """'1,2' or '1-4' or 'all' -> sorted thread counts, each at most the threads Numba has
    (the cores here unless NUMBA_NUM_THREADS says fewer)."""
    cores = min(os.cpu_count() or 1, numba.config.NUMBA_NUM_THREADS)
    out = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if part == "all":
                out.update(range(1, cores + 1))
            elif "-" in part[1:]:
                lo, hi = (int(p) for p in part.split("-"))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad thread list {text!r}: use e.g. 1,2 or 1-{cores} or all") from None
    if not out or min(out) < 1 or max(out) > cores:
        raise argparse.ArgumentTypeError(
            f"thread counts must be between 1 and {cores} (the cores here), got {text!r}")
    return sorted(out)


def add_network_args(p: argparse.ArgumentParser, batch: int = 16, image: int = 224,
                     optional: bool = False) -> None:
    p.add_argument("network", metavar="NET", nargs="?" if optional else None,
                   help="built-in network (see `bnff networks`), or path to a .json graph or "
                        "a .onnx model")
    p.add_argument("--batch", type=positive_int, default=batch, help=f"mini-batch (default {batch})")
    p.add_argument("--image", type=positive_int, default=image,
                   help=f"input height and width (default {image})")


def available_bytes() -> int:
    return psutil.virtual_memory().available


def check_memory(need: int, what: str, available: int | None = None) -> None:
    """Refuses, before allocating, `need` bytes for `what` beyond 90 % of available memory."""
    available = available_bytes() if available is None else available
    if need > 0.9 * available:
        raise UserError(f"{what} needs {need / 2**30:.2f} GiB but {available / 2**30:.1f} GiB "
                        "are available; use a smaller --batch or --image")
