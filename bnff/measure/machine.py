"""The machine columns every result row carries, and the CSV writer the commands share.

machine_name() -> str: the results/<machine>/ folder name, from what tells machines apart: CPU
model, the LLVM CPU name Numba compiles for, and core count, e.g. amd-epyc-znver4-2c (a Zen 3
and a Zen 4 VM both report "AMD EPYC" with 2 cores; their LLVM names differ).

machine_info() -> dict: cpu_model (/proc/cpuinfo, else lscpu, else platform), cpu_arch (the
LLVM CPU name Numba compiles for), vec_width (float32 lanes of bnff/engine/vec.py's vectors,
the host's or forced by BNFF_VEC_WIDTH), cores, l1d_bytes, l2_bytes, l3_bytes (per instance,
from sysfs), python, numpy, numba, threading_layer (the layer Numba actually loaded, read after a
parallel call), git_commit, timestamp (UTC).
"""
from __future__ import annotations

import csv
import glob
import os
import platform
import re
import subprocess
from datetime import datetime, timezone

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import njit, prange

from bnff.errors import UserError
from bnff.engine.vec import W

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LLC = 32 << 20  # assumed when sysfs tells nothing


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def cache_sizes() -> dict:
    """{'l1d_bytes', 'l2_bytes', 'l3_bytes'} of one instance (one core's L1/L2, one L3), 0 if unknown."""
    sizes = {"l1d_bytes": 0, "l2_bytes": 0, "l3_bytes": 0}
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            read = lambda name: open(os.path.join(d, name)).read().strip()
            level, kind, size = read("level"), read("type"), _size(read("size"))
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified"):
            key = "l1d_bytes" if level == "1" else f"l{level}_bytes"
            if key in sizes:
                sizes[key] = size
    return sizes


def llc_bytes() -> int:
    """Size of the last-level cache (the largest level found), or DEFAULT_LLC."""
    c = cache_sizes()
    return c["l3_bytes"] or c["l2_bytes"] or DEFAULT_LLC


@njit(parallel=True, cache=True)
def _touch(x):
    for i in prange(x.size):
        x[i] += 1.0


def threading_layer() -> str:
    """The threading layer Numba loaded (after a parallel call, so it is the real one)."""
    _touch(np.zeros(4 * max(1, numba.config.NUMBA_NUM_THREADS)))
    return numba.threading_layer()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_name() -> str:
    slug = lambda text: re.sub("[^a-z0-9]+", "-", text.lower()).strip("-")
    model, arch = slug(cpu_model()), slug(llvm.get_host_cpu_name())
    parts = [model] + ([arch] if arch not in model.split("-") else [])
    return "-".join(parts + [f"{os.cpu_count() or 1}c"])


def machine_info() -> dict:
    return {"cpu_model": cpu_model(), "cpu_arch": llvm.get_host_cpu_name(),
            "vec_width": W,
            "cores": os.cpu_count() or 1, **cache_sizes(),
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "threading_layer": threading_layer(),
            "git_commit": git_commit(),
            "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def append_csv(path: str, rows: list, columns: list) -> None:
    """Appends rows; writes the header only when the file is new or empty, and refuses a file
    whose header differs (one header per file)."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:
            raise UserError(f"{path} has other columns than this command writes; "
                            "use another --csv file")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
