"""ONNX models -> this suite's graphs (`bnff import`, and any NET given as a .onnx path).

Supported, each mapped onto one graph op (or onto nothing):

    Conv                      conv2d: one group, square kernel, equal strides, equal pads on
                              all sides, no dilation; with or without a bias (`bias: true`)
    BatchNormalization        batchnorm, trained with batch statistics like every BN here, its
                              epsilon kept, momentum 1 - ONNX's (ONNX weights the running
                              mean, PyTorch the new value)
    Relu                      relu
    MaxPool, AveragePool      maxpool2d (square, symmetric pads), avgpool2d (no padding);
                              neither with ceil_mode
    GlobalAveragePool         global_avgpool
    Concat                    concat, on the channel axis
    Add                       add of two tensors; an Add of a constant after a MatMul is the
                              linear's bias
    Gemm, MatMul + Add        linear (alpha = beta = 1, a constant weight and bias)
    Flatten, Reshape          [N, C, H, W] -> [N, C*H*W]: nothing after a global average
                              pool, else flatten (H = W fixed by the linear layer reading it)
    Dropout, Identity         nothing: passed through (a Dropout only when it is inactive:
                              ratio 0 or not in training mode)

Anything else is refused with one line naming the node, its op and this set: nothing is
guessed. Parameters are read from initializers (or, for a structure-only model, from graph
inputs with static shapes); a graph node takes its parameters' name ("layer1.0.conv1" for
the initializer "layer1.0.conv1.weight"), so parameters keep PyTorch's and ONNX's names.
The input channel count comes from the model; the image size is the command line's.

A model is data: external tensor data is read only from files inside the model's own folder
(a reference that leaves it, absolute or through `..`, is refused), and a truncated or
corrupt model is a one-line GraphError, never a traceback.
"""
from __future__ import annotations

import os

import numpy as np

from bnff.suites.graph import INPUT, Graph, GraphError

SUPPORTED = ("Conv", "BatchNormalization", "Relu", "MaxPool", "AveragePool",
             "GlobalAveragePool", "Concat", "Add", "Gemm", "MatMul", "Flatten", "Reshape",
             "Dropout", "Identity")
CONSTANT = "Constant"  # holds data (a Reshape's shape), not an op of the network


def _onnx():
    try:
        import onnx
    except ImportError:
        raise GraphError("reading .onnx models needs the onnx package: "
                         "pip install 'bnff-bench[onnx]'") from None
    return onnx


def read_model(path: str):
    """The ModelProto at path, external data references checked (not loaded)."""
    onnx = _onnx()
    try:
        model = onnx.load(path, load_external_data=False)
    except OSError as e:
        raise GraphError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # protobuf's DecodeError and friends: a truncated or corrupt file
        raise GraphError(f"{path} is not a readable ONNX model "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})"
                         ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise GraphError(f"{path} is not an ONNX model with a graph")
    folder = os.path.dirname(os.path.abspath(path))
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            _external_file(t, folder, path)
    return model


def _tensors(graph):
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t


def _external_file(t, folder, path):
    """The file of an external tensor, checked: inside the model's folder, long enough."""
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    parts = loc.replace("\\", "/").split("/")
    if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in parts or \
            (len(loc) > 1 and loc[1] == ":"):
        raise GraphError(f"{path}: tensor {t.name!r} refers to external data {loc!r} outside "
                         "the model's folder; refused")
    full = os.path.realpath(os.path.join(folder, loc))
    if os.path.commonpath([full, os.path.realpath(folder)]) != os.path.realpath(folder):
        raise GraphError(f"{path}: tensor {t.name!r} refers to external data {loc!r} outside "
                         "the model's folder; refused")
    if not os.path.isfile(full):
        raise GraphError(f"{path}: external data file {loc!r} of tensor {t.name!r} is missing")
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
    except ValueError:
        raise GraphError(f"{path}: tensor {t.name!r} has a bad external data offset or length"
                         ) from None
    need = offset + (length if length >= 0 else _nbytes(t))
    if os.path.getsize(full) < need:
        raise GraphError(f"{path}: external data file {loc!r} is truncated: tensor {t.name!r} "
                         f"needs bytes up to {need}, the file has {os.path.getsize(full)}")
    return full, offset


def _nbytes(t):
    onnx = _onnx()
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(dtype).itemsize


def tensor_value(t, model_path: str):
    """An initializer's or Constant's value as a NumPy array (external data checked first)."""
    onnx = _onnx()
    try:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            full, offset = _external_file(t, os.path.dirname(os.path.abspath(model_path)),
                                          model_path)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            count = int(np.prod(t.dims, dtype=np.int64))
            a = np.fromfile(full, dtype=dtype, count=count, offset=offset)
            return a.reshape(tuple(t.dims))
        return onnx.numpy_helper.to_array(t)
    except GraphError:
        raise
    except Exception as e:
        raise GraphError(f"{model_path}: tensor {t.name!r} cannot be read ({e})") from None


def _f32(v: float) -> float:
    """A float32 attribute as the shortest decimal that round-trips it (1e-5, not
    9.99999974738e-06), so exported and re-imported graphs compare equal."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


class _Importer:
    def __init__(self, model, path):
        self.g, self.path = model.graph, path
        self.inits = {t.name: t for t in self.g.initializer}
        self.consts = {}
        self.shapes = {}  # graph inputs with static dims (parameters of a structure-only model)
        for v in self.g.input:
            dims = v.type.tensor_type.shape.dim
            self.shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                        for d in dims)
        self.readers = {}
        for n in self.g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        for o in self.g.output:
            self.readers.setdefault(o.name, []).append(None)
        self.nodes, self.names = [], {INPUT}
        self.value = {}     # ONNX value -> graph node name (or INPUT)
        self.kind = {}      # graph node name -> "4d", "pooled" ([N, C, 1, 1] in ONNX) or "2d"
        self.channels = {}  # graph node name -> C or F
        self.sources = {}   # parameter -> (its initializer, stored transposed?)

    # --- helpers -------------------------------------------------------------------------
    def refuse(self, n, why=""):
        what = f"node {n.name or '(unnamed)'} ({n.op_type})"
        if why:
            raise GraphError(f"{self.path}: {what}: {why}")
        raise GraphError(f"{self.path}: {what} is not supported; supported: "
                         f"{', '.join(SUPPORTED)}")

    def attrs(self, n):
        onnx = _onnx()
        return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}

    def param_shape(self, n, name):
        """Dims of a parameter: an initializer, or a graph input with static dims."""
        if name in self.inits:
            return tuple(self.inits[name].dims)
        s = self.shapes.get(name)
        if s is not None and name not in self.value and all(d is not None for d in s):
            return s
        self.refuse(n, f"input {name!r} must be a constant (an initializer) with static dims")

    def const(self, n, name):
        if name in self.consts:
            return self.consts[name]
        if name in self.inits:
            return tensor_value(self.inits[name], self.path)
        self.refuse(n, f"input {name!r} must be a constant")

    def src(self, n, i=0):
        name = n.input[i]
        if name not in self.value:
            self.refuse(n, f"input {name!r} is not a tensor of the network "
                           "(a constant where a tensor is expected?)")
        return self.value[name]

    def new_name(self, n, params=None):
        """The parameters' stem (conv1 for conv1.weight), else the ONNX node's name."""
        base = None
        if params and params.endswith(".weight"):
            base = params[:-len(".weight")]
        if not base:
            base = (n.name or n.op_type).lstrip("/").replace("/", ".") or n.op_type
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def emit(self, n, op, inputs, kind, channels, params=(), transposed=False, **attrs):
        """A graph node; params = the ONNX names of its weight and bias, in that order."""
        name = self.new_name(n, params[0] if params else None)
        self.nodes.append({"name": name, "op": op, "inputs": inputs, **attrs})
        for kind_, onnx_name in zip(("weight", "bias"), params):
            self.sources[f"{name}.{kind_}"] = (onnx_name, transposed and kind_ == "weight")
        self.kind[name], self.channels[name] = kind, channels
        self.set_output(n, name)
        return name

    def set_output(self, n, name):
        self.value[n.output[0]] = name
        for o in n.output[1:]:
            if o and self.readers.get(o):
                self.refuse(n, f"its output {o!r} is used; only the first output is supported")

    def need4d(self, n, x):
        if self.kind[x] != "4d":
            self.refuse(n, "needs an [N, C, H, W] input with a spatial extent; it follows a "
                           "global average pool or a linear layer")

    def square(self, n, a, key, default):
        v = list(a.get(key, default))
        if len(set(v)) > 1:
            self.refuse(n, f"{key} {v} is not square; only equal values are supported")
        return v[0] if v else default[0]

    def window(self, n, a, pads_ok=True):
        """kernel, stride, pad of Conv/MaxPool/AveragePool attributes."""
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            self.refuse(n, f"auto_pad {a['auto_pad']!r} is not supported; give explicit pads")
        if any(d != 1 for d in a.get("dilations", [])):
            self.refuse(n, f"dilations {list(a['dilations'])} are not supported")
        if a.get("ceil_mode", 0):
            self.refuse(n, "ceil_mode is not supported")
        k = self.square(n, a, "kernel_shape", [None])
        s = self.square(n, a, "strides", [1])
        p = self.square(n, a, "pads", [0])
        if p and not pads_ok:
            self.refuse(n, f"padding {p} is not supported for {n.op_type}")
        return k, s, p

    # --- ops -----------------------------------------------------------------------------
    def conv(self, n, a):
        x = self.src(n)
        self.need4d(n, x)
        if a.get("group", 1) != 1:
            self.refuse(n, f"group {a['group']} is not supported; only one group")
        w = self.param_shape(n, n.input[1])
        if len(w) != 4 or w[2] != w[3]:
            self.refuse(n, f"weight of shape {list(w)} is not [O, I, K, K]")
        k, s, p = self.window(n, {"kernel_shape": [w[2], w[3]], **a})
        if k != w[2]:
            self.refuse(n, f"kernel_shape {k} differs from the weight's {w[2]}")
        if w[1] != self.channels[x]:
            self.refuse(n, f"weight expects {w[1]} input channels, its input has "
                           f"{self.channels[x]}")
        bias = len(n.input) > 2 and bool(n.input[2])
        if bias and self.param_shape(n, n.input[2]) != (w[0],):
            self.refuse(n, f"bias of shape {list(self.param_shape(n, n.input[2]))} is not [{w[0]}]")
        self.emit(n, "conv2d", [x], "4d", w[0], tuple(n.input[1:3 if bias else 2]),
                  out_channels=w[0], kernel=k, stride=s, padding=p, bias=bias)

    def batchnorm(self, n, a):
        x = self.src(n)
        self.need4d(n, x)
        c = self.channels[x]
        for i in n.input[1:5]:
            if self.param_shape(n, i) != (c,):
                self.refuse(n, f"{i!r} is not a [{c}] vector")
        self.emit(n, "batchnorm", [x], "4d", c, tuple(n.input[1:3]),
                  eps=_f32(a.get("epsilon", 1e-5)), momentum=_f32(1.0 - _f32(a.get("momentum", 0.9))))

    def pool(self, n, a):
        x = self.src(n)
        self.need4d(n, x)
        if n.op_type == "MaxPool":
            if a.get("storage_order", 0):
                self.refuse(n, "storage_order 1 is not supported")
            k, s, p = self.window(n, a)
            if p > k // 2:
                self.refuse(n, f"padding {p} is more than half the kernel {k}")
            self.emit(n, "maxpool2d", [x], "4d", self.channels[x], kernel=k, stride=s, padding=p)
        else:
            k, s, _ = self.window(n, a, pads_ok=False)
            self.emit(n, "avgpool2d", [x], "4d", self.channels[x], kernel=k, stride=s)

    def concat(self, n, a):
        xs = [self.src(n, i) for i in range(len(n.input))]
        for x in xs:
            self.need4d(n, x)
        if a.get("axis") not in (1, -3):
            self.refuse(n, f"axis {a.get('axis')} is not the channel axis (1)")
        if len(xs) < 2:
            self.refuse(n, "needs two or more inputs")
        self.emit(n, "concat", xs, "4d", sum(self.channels[x] for x in xs))

    def add(self, n, a):
        if any(i not in self.value for i in n.input):
            self.refuse(n, "adds a constant; only a MatMul's bias add and the add of two "
                           "tensors are supported")
        xs = [self.src(n, 0), self.src(n, 1)]
        kinds = {self.kind[x] for x in xs}
        if kinds != {"4d"}:
            self.refuse(n, "adds tensors that are not both [N, C, H, W]")
        self.emit(n, "add", xs, "4d", self.channels[xs[0]])

    def linear(self, n, x, out, weight, bias, transposed):
        if self.kind[x] == "4d":
            self.refuse(n, "needs an [N, F] input (a global average pool, then Flatten)")
        if not bias:
            self.refuse(n, "has no bias; linear layers here have one")
        self.emit(n, "linear", [x], "2d", out, (weight, bias), transposed, out_features=out)

    def gemm(self, n, a):
        x = self.src(n)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            self.refuse(n, "only Y = A * B(^T) + C with alpha = beta = 1 and A not transposed")
        w = self.param_shape(n, n.input[1])
        if len(w) != 2:
            self.refuse(n, f"weight of shape {list(w)} is not a matrix")
        f_in, out = (w[1], w[0]) if a.get("transB", 0) else (w[0], w[1])
        if f_in != self.channels[x]:
            self.refuse(n, f"weight expects {f_in} input features, its input has "
                           f"{self.channels[x]}")
        bias = n.input[2] if len(n.input) > 2 and n.input[2] and \
            int(np.prod(self.param_shape(n, n.input[2]))) == out else None
        self.linear(n, x, out, n.input[1], bias, not a.get("transB", 0))

    def matmul(self, n, a, add):
        """MatMul(x, W [in, out]) followed by its only reader, Add(., b [out])."""
        x = self.src(n)
        w = self.param_shape(n, n.input[1])
        if len(w) != 2 or w[0] != self.channels[x]:
            self.refuse(n, f"weight of shape {list(w)} does not map {self.channels[x]} features")
        b = [i for i in add.input if i != n.output[0]] if add is not None else []
        ok = len(b) == 1 and int(np.prod(self.param_shape(add, b[0]))) == w[1]
        self.linear(n, x, w[1], n.input[1], b[0] if ok else None, True)
        if add is not None:
            self.value[add.output[0]] = self.value[n.output[0]]

    def reshape(self, n, a):
        """Flatten / Reshape of [N, C, H, W] to [N, C*H*W]: nothing after a global average
        pool ([N, C, 1, 1]), else a flatten whose size (H = W) is the one the linear layer
        reading it takes (its input features / C, a square)."""
        x = self.src(n)
        if n.op_type == "Flatten":
            ok = a.get("axis", 1) == 1
        else:
            shape = [int(v) for v in np.asarray(self.const(n, n.input[1])).reshape(-1)]
            ok = len(shape) == 2 and shape[0] in (0, -1) and shape[1] == -1 or \
                len(shape) == 2 and self.kind[x] != "4d" and shape[1] == self.channels[x]
        if self.kind[x] == "2d" or not ok:
            self.refuse(n, "only the flattening of [N, C, H, W] to [N, C*H*W] is supported")
        if self.kind[x] == "pooled":
            self.kind[x] = "2d"
            self.set_output(n, x)
            return
        size = self.flatten_size(n, x)
        self.emit(n, "flatten", [x], "2d", self.channels[x] * size * size, size=size)

    def flatten_size(self, n, x):
        rs = self.readers.get(n.output[0], [])
        r = rs[0] if len(rs) == 1 else None
        if r is None or r.op_type not in ("Gemm", "MatMul") or r.input[0] != n.output[0]:
            self.refuse(n, "flattens a spatial map for something other than one Gemm or "
                           "MatMul; its size is fixed by that layer's weight")
        w = self.param_shape(r, r.input[1])
        features = w[1] if r.op_type == "Gemm" and self.attrs(r).get("transB", 0) else w[0]
        c = self.channels[x]
        size = int(round((features / c) ** 0.5))
        if size * size * c != features:
            self.refuse(n, f"{features} features of the layer reading it are not {c} "
                           "channels times a square map")
        return size

    def passthrough(self, n, a):
        if n.op_type == "Dropout":
            ratio = float(self.const(n, n.input[1])) if len(n.input) > 1 and n.input[1] \
                else float(a.get("ratio", 0.5))
            training = bool(self.const(n, n.input[2])) if len(n.input) > 2 and n.input[2] \
                else False
            if training and ratio > 0:
                self.refuse(n, f"an active dropout (ratio {ratio:g}, training mode) is not a "
                               "pass-through; export the model without it")
        self.set_output(n, self.src(n))

    # --- whole graph ---------------------------------------------------------------------
    def data_input(self):
        params = {n.input[i] for n in self.g.node if n.op_type in ("Conv", "Gemm", "MatMul",
                                                                  "BatchNormalization")
                  for i in range(1, len(n.input))}
        params |= {i for n in self.g.node if n.op_type == "Add" for i in n.input
                   if len(self.shapes.get(i, ())) <= 1}  # a MatMul's bias
        ins = [v for v in self.g.input if v.name not in self.inits and v.name not in params]
        if len(ins) != 1:
            raise GraphError(f"{self.path}: the model needs exactly one image input, it has "
                             f"{[v.name for v in ins]}")
        v = ins[0]
        dims = self.shapes[v.name]
        if len(dims) != 4 or dims[1] is None or dims[1] < 1:
            raise GraphError(f"{self.path}: input {v.name!r} is not [N, C, H, W] with a fixed "
                             f"channel count (dims {list(dims)})")
        self.value[v.name] = INPUT
        self.kind[INPUT], self.channels[INPUT] = "4d", dims[1]
        return dims[1]

    def run(self, name):
        channels = self.data_input()
        ops = {"Conv": self.conv, "BatchNormalization": self.batchnorm, "MaxPool": self.pool,
               "AveragePool": self.pool, "Concat": self.concat, "Add": self.add,
               "Gemm": self.gemm, "Flatten": self.reshape, "Reshape": self.reshape,
               "Dropout": self.passthrough, "Identity": self.passthrough}
        fused = set()  # Adds taken as a MatMul's bias
        for n in self.g.node:
            if n.domain not in ("", "ai.onnx"):
                self.refuse(n)
            a = self.attrs(n)
            if id(n) in fused:
                continue
            if n.op_type == CONSTANT:
                if "value" not in a:
                    self.refuse(n, "only a Constant with a tensor 'value' is supported")
                self.consts[n.output[0]] = _onnx().numpy_helper.to_array(a["value"])
            elif n.op_type == "Relu":
                x = self.src(n)
                self.emit(n, "relu", [x], self.kind[x], self.channels[x])
            elif n.op_type == "GlobalAveragePool":
                x = self.src(n)
                self.need4d(n, x)
                self.emit(n, "global_avgpool", [x], "pooled", self.channels[x])
            elif n.op_type == "MatMul":
                rs = self.readers.get(n.output[0], [])
                add = rs[0] if len(rs) == 1 and rs[0] is not None and rs[0].op_type == "Add" \
                    else None
                self.matmul(n, a, add)
                if add is not None:
                    fused.add(id(add))
            elif n.op_type in ops:
                ops[n.op_type](n, a)
            else:
                self.refuse(n)
        if len(self.g.output) != 1:
            raise GraphError(f"{self.path}: the model needs one output (the logits), it has "
                             f"{len(self.g.output)}")
        out = self.value.get(self.g.output[0].name)
        if out is None or out == INPUT or self.kind[out] == "4d":
            raise GraphError(f"{self.path}: the output {self.g.output[0].name!r} is not the "
                             "[N, classes] logits of a linear layer")
        try:
            return Graph.from_dict({"name": name, "input_channels": channels,
                                    "nodes": self.nodes, "output": out})
        except GraphError as e:
            raise GraphError(f"{self.path}: {e}") from None


def load_onnx(path: str) -> Graph:
    """The graph of the ONNX model at path, named after the file."""
    return load_onnx_with_params(path, values=False)[0]


def load_onnx_with_params(path: str, values: bool = True) -> tuple:
    """(graph, parameters): the model's initializer values for the graph's parameters in
    the exported layouts (conv [O, I, KH, KW], linear [out, in]), float32."""
    model = read_model(path)
    imp = _Importer(model, path)
    graph = imp.run(os.path.splitext(os.path.basename(path))[0])
    if not values:
        return graph, None
    params = {}
    for name, shape in graph.params().items():
        onnx_name, transposed = imp.sources[name]
        if onnx_name not in imp.inits:
            raise GraphError(f"{path}: parameter {name} ({onnx_name!r}) has no initializer")
        v = tensor_value(imp.inits[onnx_name], path).astype(np.float32)
        v = v.T if transposed else v.reshape(shape)
        params[name] = np.ascontiguousarray(v)
    return graph, params
