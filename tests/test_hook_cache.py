"""Hooked kernels are cached on disk only if their hooks pickle the same way in every process
(Numba keys a closure's cache entry by pickling its closure variables, the hooks): a hook
that calls a dispatcher or an intrinsic with a random identity recompiles every kernel using
it in every process, which costs minutes of `make test` and of every benchmark's start."""
import subprocess
import sys

SCRIPT = """
import hashlib
from numba.core.serialize import dumps
from bnff.hooks import bnff_hooks
from bnff.kernels.conv import conv_common
hooks = [h for m in (conv_common, bnff_hooks) for h in vars(m).values()
         if isinstance(h, conv_common.Hook)]
for h in sorted(hooks, key=lambda h: (h.name, h.fn.__name__)):
    print(h.name, hashlib.sha256(dumps(conv_common.stable(h.fn))).hexdigest())
"""


def test_hooks_pickle_the_same_in_every_process():
    run = lambda: subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                                 check=True).stdout
    first = run()
    assert len(first.splitlines()) == 11 and first == run()
