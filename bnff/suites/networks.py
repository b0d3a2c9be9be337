"""Built-in networks by name, and `load` for a name or a path to a JSON graph or ONNX model."""
from __future__ import annotations

import os
from functools import partial

from bnff.suites.densenet import BLOCKS as DENSENETS, densenet
from bnff.suites.graph import Graph, GraphError, load_json
from bnff.suites.resnet import STAGES as RESNETS, resnet
from bnff.suites.vgg import vgg

BUILTIN = {
    **{name: partial(densenet, name) for name in DENSENETS},
    **{name: partial(resnet, name) for name in RESNETS},
    "vgg16_bn": vgg,
}


def load(name_or_path: str) -> Graph:
    """A built-in network, a JSON graph, or an ONNX model (bnff.suites.onnx_import)."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]()
    if name_or_path.lower().endswith(".onnx"):
        from bnff.suites.onnx_import import load_onnx
        return load_onnx(name_or_path)
    if name_or_path.endswith(".json") or os.path.sep in name_or_path:
        return load_json(name_or_path)
    raise GraphError(f"unknown network {name_or_path!r}: give a built-in name "
                     f"({', '.join(BUILTIN)}), a path to a .json graph or to a .onnx model")
