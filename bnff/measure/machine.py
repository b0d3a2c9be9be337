"""The machine columns every result row carries, and the CSV writer the commands share.

machine_name() -> str: the results/<machine>/ folder name, from what tells machines apart: CPU
model, the LLVM CPU name Numba compiles for, and core count, e.g. amd-epyc-znver4-2c (a Zen 3
and a Zen 4 VM both report "AMD EPYC" with 2 cores; their LLVM names differ).

machine_info() -> dict: cpu_model (/proc/cpuinfo, else lscpu, else platform), cpu_arch (the
LLVM CPU name Numba compiles for), vec_width (float32 lanes of bnff/engine/vec.py's vectors,
the host's or forced by BNFF_VEC_WIDTH), cores, l1d_bytes, l2_bytes, l3_bytes (per instance,
from sysfs), python, numpy, numba, threading_layer (the layer Numba actually loaded, read after a
parallel call), git_commit, timestamp (UTC).

CsvLog is the result file every measuring command appends to as it goes; same_machine and
latest select from it what a resumed run keeps and what its final tables show.
"""
from __future__ import annotations

import csv
import fcntl
import glob
import io
import os
import platform
import re
import subprocess
from datetime import datetime, timezone

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import njit, prange

from bnff.engine.vec import W
from bnff.errors import UserError, writable_file

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


def parse_value(text: str):
    """A CSV field as written by CsvLog: '' -> None, 'True'/'False' -> bool, else int, float or
    the string itself (floats are written with repr, so they read back bit for bit)."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def same_machine(row: dict, machine: dict) -> bool:
    """Whether a row was measured on this machine (CPU model, cores) at this commit."""
    return all(str(row.get(k)) == str(machine[k]) for k in ("cpu_model", "cores", "git_commit"))


def latest(rows: list, key) -> list:
    """One row per key(row), the last one written, in the order keys first appear."""
    out = {}
    for r in rows:
        out[key(r)] = r
    return list(out.values())


class CsvLog:
    """An append-only CSV of result rows, one header per file.

    Opening checks, before any work and creating nothing, that the file has this header (a
    file with other columns is refused, never mixed) and that it can be written. append()
    writes whole rows under an exclusive fcntl lock, in one write, then flushes and fsyncs:
    two runs appending to one file do not interleave partial lines, and an interrupted run
    keeps every row it appended before."""

    def __init__(self, path: str, columns: list):
        self.path, self.columns = path, list(columns)
        writable_file(path, "CSV")
        header = self._header()
        if header is not None and header != self.columns:
            raise UserError(f"{path} has other columns than this command writes; "
                            "use another --csv file")

    def _header(self):
        """The file's header, or None when it is new or empty."""
        try:
            with open(self.path, newline="") as f:
                return next(csv.reader(f), None)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"cannot read {self.path} as a CSV file: {e}") from None

    def read(self) -> list:
        """The complete rows written so far, values parsed (parse_value)."""
        if self._header() is None:
            return []
        with open(self.path, newline="") as f:
            reader = csv.reader(f)
            next(reader)
            return [{k: parse_value(v) for k, v in zip(self.columns, line)}
                    for line in reader if len(line) == len(self.columns)]

    def append(self, rows: list) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        w.writerows(rows)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", newline="") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    header = self._header()
                    if header is not None and header != self.columns:
                        raise UserError(f"{self.path} got other columns meanwhile; not mixing")
                    text = buf.getvalue()
                    if header is None:
                        text = ",".join(self.columns) + "\r\n" + text
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror}") from None
