"""The suite's time-by-kind breakdown (conv, bn, relu, concat, pool, other) of a PyTorch
iteration, from torch.profiler: each aten / autograd op's self CPU time (wall time on the
calling thread, so intra-op threads are inside it) goes to the kind its name names, the rest
(loss, linear, additions, gradient accumulation, copies, the autograd engine) to `other`.
PyTorch runs an in-place ReLU as clamp_min_ and the global average pool (adaptive_avg_pool2d
to 1x1, channels_last) as mean, whose backward is MeanBackward: those count as relu and pool.
"""
from __future__ import annotations

KINDS = ["conv", "bn", "relu", "concat", "pool", "other"]
# lower-case substrings of op names, first match wins
_PATTERNS = [("conv", "conv"), ("batch_norm", "bn"), ("batchnorm", "bn"), ("relu", "relu"),
             ("threshold", "relu"), ("clamp_min", "relu"), ("aten::cat", "concat"),
             ("catbackward", "concat"), ("pool", "pool"), ("aten::mean", "pool"),
             ("meanbackward", "pool")]


def kind_of(op_name: str) -> str:
    low = op_name.lower()
    return next((kind for pat, kind in _PATTERNS if pat in low), "other")


def by_kind(events) -> dict:
    """{kind: seconds} from a profiler's key_averages()."""
    out = dict.fromkeys(KINDS, 0.0)
    for e in events:
        out[kind_of(e.key)] += e.self_cpu_time_total / 1e6
    return out
