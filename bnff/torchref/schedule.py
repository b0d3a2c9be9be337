"""The `pytorch` schedule of `bnff bench`: the graph as a PyTorch module (model.py), run in a
child process (worker.py) so that its allocator and OpenMP threads are its own, driven like an
Executor: load, run (one iteration, at the parent's Numba thread count), loss, grads, release;
`kinds` gives the time by kind from torch.profiler, measured after the timed iterations,
and keeps those profiled iterations' wall time (`profiled_s`), which bench prints beside
the timed median so a disturbed profiling pass is seen.
The child runs in a session of its own, so a Ctrl-C at the terminal reaches only the parent
(bnff/cli/main.py), which ends the child by closing its stdin (release) instead of racing it.

Allocator: the child runs in its fastest configuration measured on this machine, glibc malloc
with the large-block mmap/munmap churn switched off (`glibc-tuned`, allocator_env). Measured
with `python -m bnff.torchref.standalone NET --repeat 3 --rounds 2` under bnff-timed (batch
16, 224x224, channels_last, 2 threads, PyTorch 2.13.0, 2-vCPU AMD EPYC, LLVM CPU znver5,
Debian libjemalloc2 5.3.0), median s/iter over 6 iterations:

    allocator     DenseNet-121   ResNet-50
    glibc         2.481          2.398
    glibc-tuned   1.780          1.769
    jemalloc      3.656          3.117    (LD_PRELOAD, its default decay settings)

BNFF_TORCH_ALLOCATOR=glibc|glibc-tuned|jemalloc overrides the choice.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

import numba
import numpy as np

from bnff.errors import UserError
from bnff.lowering.schedules import PYTORCH

MIB = 1 << 20


def jemalloc_path() -> str | None:
    """libjemalloc.so.2 as `ldconfig -p` lists it, or None."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "libjemalloc.so" in line and "=>" in line:
            return line.split("=>", 1)[1].strip()
    return None


def allocator_env(name: str) -> dict | None:
    """Environment additions for an allocator configuration, None if unavailable here.

    glibc: the defaults; a freed tensor above the (dynamic, at most 32 MiB) mmap threshold
    is munmap'ed and the next one is mmap'ed and page-faulted again, every iteration.
    glibc-tuned: no mmap for large blocks (MALLOC_MMAP_MAX_=0: the threshold itself cannot
    exceed 32 MiB, and DenseNet's activations reach 49 MiB) and no trimming of the heap top,
    so freed memory is reused, not returned. jemalloc: preloaded, its defaults."""
    if name == "glibc":
        return {}
    if name == "glibc-tuned":
        return {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                "MALLOC_TOP_PAD_": str(64 * MIB)}
    if name == "jemalloc":
        path = jemalloc_path()
        return {"LD_PRELOAD": path} if path else None
    raise UserError(f"unknown allocator {name!r}; known: {', '.join(ALLOCATORS)}")


ALLOCATORS = ["glibc", "glibc-tuned", "jemalloc"]
FASTEST = "glibc-tuned"  # as measured (module docstring); always available


def chosen_allocator() -> str:
    name = os.environ.get("BNFF_TORCH_ALLOCATOR", FASTEST)
    if allocator_env(name) is None:
        raise UserError(f"BNFF_TORCH_ALLOCATOR={name}: not available on this machine")
    return name


def child_env(allocator: str) -> dict:
    """The parent's environment without LD_PRELOAD and OPENBLAS_NUM_THREADS (the parent's
    setting for its float64 validation, cli/main.py; the child's threads follow
    torch.set_num_threads), with the allocator's variables and this package on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_NUM_THREADS")}
    env.update(allocator_env(allocator))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _forward_stderr(stream) -> None:
    """The child's stderr, less torch.profiler's start/stop lines (`USDT:...`)."""
    for line in stream:
        if not line.startswith("USDT:"):
            sys.stderr.write(line)


class TorchExecutor:
    """A PyTorch child process with the Executor interface `bnff bench` uses."""

    schedule = PYTORCH

    def __init__(self, graph, batch: int, image: int, allocator: str | None = None):
        self.graph, self.batch, self.image = graph, batch, image
        self.allocator = allocator or chosen_allocator()
        self.proc = self.tmp = None
        self.profiled_s = None

    @property
    def loaded(self) -> bool:
        """A child process holds the problem (since load, until release)."""
        return self.proc is not None

    def peak_bytes(self) -> int:
        return 0  # PyTorch's peak is not known before it runs

    def load(self, params: dict, x, labels) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="bnff-torch-")
        problem = os.path.join(self.tmp.name, "problem.npz")
        np.savez(problem, input=np.asarray(x, np.float32), labels=labels,
                 **{f"param:{k}": v for k, v in params.items()})
        self.proc = subprocess.Popen([sys.executable, "-m", "bnff.torchref.worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=child_env(self.allocator), start_new_session=True)
        threading.Thread(target=_forward_stderr, args=(self.proc.stderr,), daemon=True).start()
        self._ask({"graph": self.graph.to_dict(), "problem": problem})

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise UserError(f"the PyTorch child process of {self.graph.name} ended "
                            f"(exit code {self.proc.wait()}); see its message above")
        reply = json.loads(line)
        if "error" in reply:
            raise UserError(f"PyTorch child process: {reply['error']}")
        return reply

    def run(self, times=None) -> None:
        """One iteration at the parent's current Numba thread count."""
        self._ask({"op": "run", "threads": numba.get_num_threads()})

    def _result(self):
        path = os.path.join(self.tmp.name, "result.npz")
        self._ask({"op": "result", "path": path})
        with np.load(path, allow_pickle=False) as f:
            return float(f["loss"]), {k.removeprefix("grad:"): f[k] for k in f.files
                                      if k.startswith("grad:")}

    def loss(self) -> float:
        return self._result()[0]

    def grads(self) -> dict:
        return self._result()[1]

    def kinds(self, repeat: int) -> dict:
        """{kind: median seconds} over `repeat` profiled iterations (not the timed ones); their
        median wall time is kept in `profiled_s`."""
        reply = self._ask({"op": "profile", "threads": numba.get_num_threads(),
                           "repeat": repeat})
        self.profiled_s = reply["seconds"]
        return reply["kinds"]

    def release(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.tmp.cleanup()
        self.proc = self.tmp = None
