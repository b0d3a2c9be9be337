"""Network graphs: the JSON format, validation, and shape inference.

A graph is `{"name", "input_channels", "nodes": [...], "output"}`; the graph input is
the tensor `input` [N, input_channels, S, S]; nodes come after their inputs. Each node is
`{"name", "op", "inputs": [...], ...attributes}` with the ops and attributes of `OPS`.
Parameters are `<node>.weight` / `<node>.bias`: conv weight [out, in, kh, kw] and, with
`bias: true`, bias [out]; batchnorm weight = gamma and bias = beta [C]; linear weight
[out, in] and bias [out].
Shapes are NCHW, or [N, F] after `global_avgpool`, `flatten` and `linear` (a `relu` takes
either). `flatten` turns an [N, C, size, size] input into [N, C*size*size] in NCHW order; its
`size` is fixed so that the features, and the parameters of the linear layer reading them, do
not depend on the image size (the input must be size x size, else a GraphError).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

INPUT = "input"


class GraphError(ValueError):
    """A graph that is malformed, or that does not fit the requested input size."""


# op -> (number of inputs or None for two or more, required attributes, defaults)
OPS = {
    "conv2d": (1, ("out_channels", "kernel"), {"stride": 1, "padding": 0, "bias": False}),
    "batchnorm": (1, (), {"eps": 1e-5, "momentum": 0.1}),
    "relu": (1, (), {}),
    "maxpool2d": (1, ("kernel",), {"stride": None, "padding": 0}),
    "avgpool2d": (1, ("kernel",), {"stride": None}),
    "global_avgpool": (1, (), {}),
    "flatten": (1, ("size",), {}),
    "concat": (None, (), {}),
    "add": (2, (), {}),
    "linear": (1, ("out_features",), {}),
}
_INT_ATTRS = ("out_channels", "kernel", "stride", "padding", "out_features", "size")


@dataclass
class Node:
    name: str
    op: str
    inputs: list
    attrs: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.attrs[key]

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs), **self.attrs}


def _node_from_dict(d: dict, index: int) -> Node:
    if not isinstance(d, dict):
        raise GraphError(f"node #{index} is not an object")
    for key in ("name", "op", "inputs"):
        if key not in d:
            raise GraphError(f"node #{index} ({d.get('name', '?')}) has no '{key}'")
    name, op, inputs = d["name"], d["op"], d["inputs"]
    if not isinstance(name, str) or not name or name == INPUT:
        raise GraphError(f"node #{index}: bad name {name!r}")
    if op not in OPS:
        raise GraphError(f"node {name}: unknown op {op!r} (known: {', '.join(OPS)})")
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise GraphError(f"node {name}: 'inputs' must be a list of node names")
    arity, required, defaults = OPS[op]
    if arity is None and len(inputs) < 2:
        raise GraphError(f"node {name}: {op} needs two or more inputs, got {len(inputs)}")
    if arity is not None and len(inputs) != arity:
        raise GraphError(f"node {name}: {op} takes {arity} input(s), got {len(inputs)}")
    attrs = {k: v for k, v in d.items() if k not in ("name", "op", "inputs")}
    unknown = set(attrs) - set(required) - set(defaults)
    if unknown:
        raise GraphError(f"node {name}: unknown attribute(s) {sorted(unknown)} for {op}")
    for key in required:
        if key not in attrs:
            raise GraphError(f"node {name}: {op} needs attribute '{key}'")
    attrs = {**defaults, **attrs}
    if "stride" in attrs and attrs["stride"] is None:
        attrs["stride"] = attrs["kernel"]
    for key in _INT_ATTRS:
        if key in attrs:
            v = attrs[key]
            low = 0 if key == "padding" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise GraphError(f"node {name}: '{key}' must be an integer >= {low}, got {v!r}")
    if op == "conv2d" and not isinstance(attrs["bias"], bool):
        raise GraphError(f"node {name}: 'bias' must be true or false, got {attrs['bias']!r}")
    if op == "batchnorm":
        for key in ("eps", "momentum"):
            v = attrs[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise GraphError(f"node {name}: '{key}' must be a finite number >= 0, got {v!r}")
    return Node(name, op, list(inputs), attrs)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class Graph:
    def __init__(self, name: str, input_channels: int, nodes: list, output: str):
        self.name = name
        self.input_channels = input_channels
        self.nodes = nodes
        self.output = output
        self.by_name = {n.name: n for n in nodes}
        self._check()
        self.channels = self._infer(None)  # name -> C (or F), independent of batch and image

    # --- JSON -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        if not isinstance(d, dict):
            raise GraphError("a graph is a JSON object with name, input_channels, nodes, output")
        for key in ("name", "input_channels", "nodes", "output"):
            if key not in d:
                raise GraphError(f"graph has no '{key}'")
        c = d["input_channels"]
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise GraphError(f"input_channels must be a positive integer, got {c!r}")
        if not isinstance(d["nodes"], list) or not d["nodes"]:
            raise GraphError("'nodes' must be a non-empty list")
        if not isinstance(d["name"], str) or not isinstance(d["output"], str):
            raise GraphError("'name' and 'output' must be strings")
        nodes = [_node_from_dict(n, i) for i, n in enumerate(d["nodes"])]
        return cls(d["name"], c, nodes, d["output"])

    def to_dict(self) -> dict:
        return {"name": self.name, "input_channels": self.input_channels,
                "nodes": [n.to_dict() for n in self.nodes], "output": self.output}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __eq__(self, other) -> bool:
        return isinstance(other, Graph) and self.to_dict() == other.to_dict()

    # --- structure ------------------------------------------------------------------------
    def _check(self) -> None:
        seen = {INPUT}
        for n in self.nodes:
            if n.name in seen:
                raise GraphError(f"duplicate node name {n.name!r}")
            for i in n.inputs:
                if i not in seen:
                    if i not in self.by_name:
                        raise GraphError(f"node {n.name}: input {i!r} is not the graph input "
                                         "or a node")
                    cycle = self._cycle(n.name)
                    if cycle:
                        raise GraphError("the graph has a cycle: " + " -> ".join(cycle))
                    raise GraphError(f"node {n.name}: input {i!r} comes after it; list nodes "
                                     "after their inputs")
            seen.add(n.name)
        if self.output not in self.by_name:
            raise GraphError(f"output {self.output!r} is not a node")

    def _cycle(self, start: str) -> list:
        """A path start -> ... -> start along inputs, or [] if start is on no cycle."""
        stack, seen = [(start, [start])], set()
        while stack:
            name, path = stack.pop()
            for i in self.by_name[name].inputs if name in self.by_name else ():
                if i == start:
                    return list(reversed(path + [start]))
                if i not in seen:
                    seen.add(i)
                    stack.append((i, path + [i]))
        return []

    def consumers(self) -> dict:
        """name -> list of nodes reading it."""
        out = {INPUT: [], **{n.name: [] for n in self.nodes}}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out

    def params(self) -> dict:
        """Parameter name -> shape, in node order."""
        ps = {}
        for n in self.nodes:
            cin = self.channels[n.inputs[0]] if n.inputs else None
            if n.op == "conv2d":
                ps[f"{n.name}.weight"] = (n["out_channels"], cin, n["kernel"], n["kernel"])
                if n["bias"]:
                    ps[f"{n.name}.bias"] = (n["out_channels"],)
            elif n.op == "batchnorm":
                ps[f"{n.name}.weight"] = (cin,)
                ps[f"{n.name}.bias"] = (cin,)
            elif n.op == "linear":
                ps[f"{n.name}.weight"] = (n["out_features"], cin)
                ps[f"{n.name}.bias"] = (n["out_features"],)
        return ps

    def num_params(self) -> int:
        total = 0
        for shape in self.params().values():
            size = 1
            for s in shape:
                size *= s
            total += size
        return total

    # --- shapes ---------------------------------------------------------------------------
    def infer_shapes(self, batch: int, image: int) -> dict:
        """name -> shape for `input` and every node at this batch and image size."""
        if batch < 1 or image < 1:
            raise GraphError(f"batch and image must be positive, got {batch} and {image}")
        return self._infer((batch, image))

    def _infer(self, size):
        """With size=None, channels only (a 4-d shape is tracked as its channel count)."""
        if size is None:
            shapes = {INPUT: ("4d", self.input_channels)}
        else:
            shapes = {INPUT: (size[0], self.input_channels, size[1], size[1])}
        for n in self.nodes:
            ins = [shapes[i] for i in n.inputs]
            shapes[n.name] = self._out_shape(n, ins, size is None)
        if size is None:
            return {k: v[1] for k, v in shapes.items()}
        return shapes

    @staticmethod
    def _out_shape(n: Node, ins: list, channels_only: bool):
        x = ins[0]
        is4d = len(x) == 4 or x[0] == "4d"
        if n.op not in ("linear", "relu") and not is4d:
            raise GraphError(f"node {n.name}: {n.op} needs an [N, C, H, W] input, got {x}")
        if n.op == "linear":
            if is4d:
                raise GraphError(f"node {n.name}: linear needs an [N, F] input "
                                 "(add a global_avgpool before it)")
            return ("2d", n["out_features"]) if channels_only else (x[0], n["out_features"])
        if n.op == "global_avgpool":
            return ("2d", x[1]) if channels_only else (x[0], x[1])
        if n.op == "flatten":
            size = n["size"]
            if not channels_only and (x[2], x[3]) != (size, size):
                raise GraphError(f"node {n.name}: flatten expects a {size}x{size} input, got "
                                 f"{x[2]}x{x[3]}; choose the --image that gives it")
            return ("2d", x[1] * size * size) if channels_only else (x[0], x[1] * size * size)
        if n.op == "concat":
            if not all(len(s) == 4 or s[0] == "4d" for s in ins):
                raise GraphError(f"node {n.name}: concat inputs must all be [N, C, H, W]")
            c = sum(s[1] for s in ins)
            if channels_only:
                return ("4d", c)
            if any((s[0], s[2], s[3]) != (x[0], x[2], x[3]) for s in ins):
                raise GraphError(f"node {n.name}: concat inputs differ in batch or spatial size: "
                                 f"{[tuple(s) for s in ins]}")
            return (x[0], c, x[2], x[3])
        if n.op == "add":
            if ins[0][1] != ins[1][1] or (not channels_only and tuple(ins[0]) != tuple(ins[1])):
                raise GraphError(f"node {n.name}: add inputs differ in shape: {ins[0]} vs {ins[1]}")
            return x
        if n.op in ("batchnorm", "relu"):
            return x
        k, s = n["kernel"], n["stride"]
        p = n.attrs.get("padding", 0)
        c = n["out_channels"] if n.op == "conv2d" else x[1]
        if channels_only:
            return ("4d", c)
        if n.op == "maxpool2d" and p > k // 2:
            raise GraphError(f"node {n.name}: padding {p} is more than half the kernel {k}")
        oh, ow = conv_out(x[2], k, s, p), conv_out(x[3], k, s, p)
        if oh < 1 or ow < 1:
            raise GraphError(f"node {n.name}: input {x[2]}x{x[3]} is too small for a {n.op} "
                             f"with kernel {k}, stride {s}, padding {p}; use a larger --image")
        return (x[0], c, oh, ow)


def load_json(path: str) -> Graph:
    """The graph in a JSON file: parsed as data only (json.load; nothing is evaluated or
    imported), every error a one-line GraphError."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise GraphError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise GraphError(f"{path} is nested too deeply to be a graph") from None
    try:
        return Graph.from_dict(d)
    except GraphError as e:
        raise GraphError(f"{path}: {e}") from None


class Builder:
    """Builds a graph node by node; each method returns the new node's name."""

    def __init__(self, name: str, input_channels: int):
        self.name, self.input_channels, self.nodes = name, input_channels, []

    def add(self, name: str, op: str, inputs, **attrs) -> str:
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        self.nodes.append({"name": name, "op": op, "inputs": inputs, **attrs})
        return name

    def graph(self, output: str) -> Graph:
        return Graph.from_dict({"name": self.name, "input_channels": self.input_channels,
                                "nodes": self.nodes, "output": output})
