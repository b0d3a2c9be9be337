"""PyTorch's equivalent of a suite stage, for `bnff micro --variant torch`: the same inputs
(NHWC arrays viewed as channels_last NCHW tensors, no copy), PyTorch's own CPU kernel for the
work, validated against the stage's float64 reference and timed like the suite's variants.

    op = TorchOp(stage, inputs)    # None-safe: TorchOp.supports(stage) says if one exists
    op()                           # the timed call: PyTorch allocates its outputs, as in training
    op.fill(outputs)               # the last results in the stage's output layout (untimed)

What each stage maps to (aten ops as autograd calls them in training):
conv_fwd: aten.convolution; conv_bwd_data / conv_bwd_weights: aten.convolution_backward with
the output mask of that gradient only; bn_normalize: aten.native_batch_norm in training mode,
PyTorch's whole BN forward (statistics and normalize in one op: compare it with bn_stats plus
bn_normalize; the stage's reference recomputes the statistics from x too);
bn_backward: aten.native_batch_norm_backward; relu_fwd: relu; relu_bwd: threshold_backward;
concat_fwd: cat; concat_bwd: narrow, the views CatBackward returns (PyTorch's concat backward
copies nothing: the gradients are accumulated where they are consumed); concat_add_out:
add of the view into the gradient started so far, out of place as the autograd engine
accumulates a gradient that several consumers feed; maxpool_*: aten
max_pool2d_with_indices and its backward (the suite's window-index argmax converted to
PyTorch's flat indices untimed); avgpool_*: avg_pool2d and its backward; gap_*:
adaptive_avg_pool2d and its backward; add: add; linear_fwd: addmm; linear_bwd: mm, mm, sum;
softmax_xent: cross_entropy forward and its gradient by autograd.

PyTorch allocates every output, as it does in training, so the allocator is part of its time:
TorchOp sets this process's glibc malloc as the `pytorch` schedule's child runs it
(schedule.allocator_env("glibc-tuned"), through mallopt). With glibc's defaults each output
above the mmap threshold is mapped and page-faulted anew on every call: PyTorch's BN forward
over DenseNet-121's shapes (batch 16, 224x224, 2 threads, 2-vCPU AMD EPYC znver5) took 145 ms
per iteration so, 79 ms with these settings; its concat 102 and 43 ms.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np
import torch
import torch.nn.functional as F

aten = torch.ops.aten


def as_torch(a: np.ndarray) -> torch.Tensor:
    """NHWC (and OHWI) arrays -> channels_last NCHW (OIHW) views; others as they are."""
    t = torch.from_numpy(a)
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.permute(0, 2, 3, 1) if t.dim() == 4 else t).contiguous().numpy()


def _window_to_flat(arg, st):
    """Suite argmax (index in the k x k window) -> PyTorch's flat index into the input plane."""
    s = st.shape
    k, stride, pad = s["kh"], s["sh"], s.get("ph", 0)
    n, oh, ow, c = arg.shape
    a = arg.astype(np.int64)
    h = np.arange(oh)[None, :, None, None] * stride - pad + a // k
    w = np.arange(ow)[None, None, :, None] * stride - pad + a % k
    return as_torch(np.ascontiguousarray(h * s["iw"] + w))


def _flat_to_window(idx, st):
    s = st.shape
    k, stride, pad = s["kh"], s["sh"], s.get("ph", 0)
    i = to_numpy(idx)
    n, oh, ow, c = i.shape
    dh = i // s["iw"] - (np.arange(oh)[None, :, None, None] * stride - pad)
    dw = i % s["iw"] - (np.arange(ow)[None, None, :, None] * stride - pad)
    return (dh * k + dw).astype(np.int8)


def _conv(st):
    s = st.shape
    return [s["sh"]] * 2, [s["ph"]] * 2, [1, 1], False, [0, 0], 1


def _bn_save(st, t):
    return t["mean"], torch.rsqrt(t["var"] + st.eps)


def _xent(st, t):
    with torch.enable_grad():
        z = t["z"].detach().requires_grad_(True)
        loss = F.cross_entropy(z, t["labels"])
        dz, = torch.autograd.grad(loss, z)
    return {"loss": loss.reshape(1), "dz": dz}


def _maxpool_bwd(st, t):
    dx = aten.max_pool2d_with_indices_backward(
        t["dy"], t["x"], [st.shape["kh"]] * 2, [st.shape["sh"]] * 2, [st.shape["ph"]] * 2,
        [1, 1], False, t["indices"])
    return {"dx": dx}


def _zeros_in(st, output):
    """A zero tensor shaped as one of the stage's outputs: the operand whose shape a backward
    op reads but whose values it does not."""
    return as_torch(np.zeros_like(st.allocate_outputs()[output]))


# stage name -> (extra tensors from the input arrays, untimed, or None;
#                the timed op: (stage, tensors) -> {output: tensor})
OPS = {
    "conv_fwd": (None, lambda st, t: {"y": aten.convolution(t["x"], t["w"], None, *_conv(st))}),
    "conv_bwd_data": (
        lambda st, a: {"x": _zeros_in(st, "dx")},
        lambda st, t: {"dx": aten.convolution_backward(
            t["dy"], t["x"], t["w"], None, *_conv(st), [True, False, False])[0]}),
    "conv_bwd_weights": (
        lambda st, a: {"w": _zeros_in(st, "dw")},
        lambda st, t: {"dw": aten.convolution_backward(
            t["dy"], t["x"], t["w"], None, *_conv(st), [False, True, False])[1]}),
    "bn_normalize": (None, lambda st, t: {"y": aten.native_batch_norm(
        t["x"], t["gamma"], t["beta"], None, None, True, 0.1, st.eps)[0]}),
    "bn_backward": (None, lambda st, t: dict(zip(("dx", "dgamma", "dbeta"),
        aten.native_batch_norm_backward(t["dy"], t["x"], t["gamma"], None, None,
                                        *_bn_save(st, t), True, st.eps, [True, True, True])))),
    "relu_fwd": (None, lambda st, t: {"y": torch.relu(t["x"])}),
    "relu_bwd": (None, lambda st, t: {"dx": aten.threshold_backward(t["dy"], t["y"], 0)}),
    "concat_fwd": (None, lambda st, t: {"y": torch.cat([t[f"x{k}"] for k in
                                                        range(len(st.shape["ics"]))], 1)}),
    "concat_bwd": (None, lambda st, t: {
        f"dx{k}": t["dy"].narrow(1, sum(st.shape["ics"][:k]), c)
        for k, c in enumerate(st.shape["ics"])}),
    "concat_add_out": (None, lambda st, t: {"dx": torch.add(
        t["dx0"], t["dy"].narrow(1, st.shape["off"], st.shape["ic"]))}),
    "maxpool_fwd": (None, lambda st, t: dict(zip(("y", "argmax"), aten.max_pool2d_with_indices(
        t["x"], [st.shape["kh"]] * 2, [st.shape["sh"]] * 2, [st.shape["ph"]] * 2)))),
    "maxpool_bwd": (
        lambda st, a: {"indices": _window_to_flat(a["argmax"], st), "x": _zeros_in(st, "dx")},
        _maxpool_bwd),
    "avgpool_fwd": (None, lambda st, t: {"y": F.avg_pool2d(t["x"], st.shape["kh"],
                                                           st.shape["sh"])}),
    "avgpool_bwd": (
        lambda st, a: {"x": _zeros_in(st, "dx")},
        lambda st, t: {"dx": aten.avg_pool2d_backward(
            t["dy"], t["x"], [st.shape["kh"]] * 2, [st.shape["sh"]] * 2, [0, 0], False, True,
            None)}),
    "gap_fwd": (None, lambda st, t: {"y": torch.flatten(F.adaptive_avg_pool2d(t["x"], 1), 1)}),
    "gap_bwd": (
        lambda st, a: {"x": _zeros_in(st, "dx")},
        lambda st, t: {"dx": aten._adaptive_avg_pool2d_backward(t["dy"][:, :, None, None],
                                                                t["x"])}),
    "add": (None, lambda st, t: {"y": torch.add(t["a"], t["b"])}),
    "linear_fwd": (None, lambda st, t: {"y": torch.addmm(t["b"], t["x"], t["w"].t())}),
    "linear_bwd": (None, lambda st, t: {"dx": torch.mm(t["dy"], t["w"]),
                                        "dw": torch.mm(t["dy"].t(), t["x"]),
                                        "db": t["dy"].sum(0)}),
    "softmax_xent": (None, _xent),
}


@functools.cache
def tune_malloc() -> bool:
    """glibc: no mmap for large blocks, no heap trimming (what MALLOC_MMAP_MAX_=0,
    MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ do for the child); False where there is no
    mallopt."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    return all(libc.mallopt(k, v) == 1 for k, v in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 << 20)))


class TorchOp:
    def __init__(self, stage, inputs: dict):
        tune_malloc()
        self.stage = stage
        prepare, self.op = OPS[stage.name]
        self.tensors = {k: as_torch(v) for k, v in inputs.items()}
        if prepare is not None:
            self.tensors.update(prepare(stage, inputs))
        self.results = None

    @staticmethod
    def supports(stage) -> bool:
        return stage.name in OPS

    def __call__(self) -> None:
        with torch.no_grad():
            self.results = None  # freed first, as a training iteration frees the last one's
            self.results = self.op(self.stage, self.tensors)

    def fill(self, outputs: dict) -> None:
        for k, t in self.results.items():
            a = _flat_to_window(t, self.stage) if k == "argmax" else to_numpy(t)
            outputs[k][...] = a.reshape(outputs[k].shape)
