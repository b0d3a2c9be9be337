"""Hooked kernels are cached on disk only if their hooks pickle the same way in every process
(Numba keys a closure's cache entry by pickling its closure variables, the hooks): a hook
that calls a dispatcher or an intrinsic with a random identity recompiles every kernel using
it in every process, which costs minutes of `make test` and of every benchmark's start."""
import subprocess
import sys

SCRIPT = """
import hashlib
from numba.core.serialize import dumps
from bnff.lowering.ops_bnff import EPILOGUES, PROLOGUES
from bnff.kernels.conv.conv_common import stable
for name, hook in sorted({**PROLOGUES, **EPILOGUES}.items(), key=lambda kv: str(kv[0])):
    print(name, hashlib.sha256(dumps(stable(hook))).hexdigest())
"""


def test_hooks_pickle_the_same_in_every_process():
    run = lambda: subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                                 check=True).stdout
    first = run()
    assert len(first.splitlines()) == 10 and first == run()
