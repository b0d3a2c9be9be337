"""The suite's time-by-kind breakdown (conv, bn, relu, concat, pool, other) of a PyTorch
iteration, from torch.profiler: each aten / autograd op's self CPU time (wall time on the
calling thread, so intra-op threads are inside it) goes to the kind named by the op or, if it
names none, by its nearest enclosing op that does; what none names (loss, linear, the
residual adds, the autograd engine) is `other`. So the helpers an op calls count as its work,
as the suite's kernels do theirs: the zeroing inside max_pool2d_with_indices_backward is pool,
the weight copies inside convolution_backward conv, and the gradient additions autograd runs
while it evaluates CatBackward0 (the accumulation of a concatenated feature's gradients, the
suite's concat_add_out) concat. (Measured on DenseNet-121, batch 16, 224x224, 1 thread: those
adds are 0.085 s per iteration; by the op's own name alone they counted as `other`.)
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


def kind_in_context(event) -> str:
    """The kind of a profiler FunctionEvent: its own name's, else its nearest ancestor's that
    names one, else `other`."""
    while event is not None:
        kind = kind_of(event.name)
        if kind != "other":
            return kind
        event = event.cpu_parent
    return "other"


def by_kind(events) -> dict:
    """{kind: seconds} from a profiler's events() (FunctionEvents, with their parents)."""
    out = dict.fromkeys(KINDS, 0.0)
    for e in events:
        out[kind_in_context(e)] += e.self_cpu_time_total / 1e6
    return out
