"""Argument types and errors shared by the `bnff` commands."""
from __future__ import annotations

import argparse
import os

from bnff.errors import UserError  # noqa: F401  (the commands' one error type, re-exported)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def thread_list(text: str) -> list:
    """'1,2' or '1-4' or 'all' -> sorted thread counts, each at most the cores available."""
    cores = os.cpu_count() or 1
    out = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if part == "all":
                out.update(range(1, cores + 1))
            elif "-" in part:
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
