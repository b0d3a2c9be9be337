"""Built-in networks by name, and `load` for a name or a path to a JSON graph."""
from __future__ import annotations

import os

from bnff.suites.densenet import densenet
from bnff.suites.graph import Graph, GraphError, load_json
from bnff.suites.resnet import resnet

BUILTIN = {
    "densenet121": densenet,
    "resnet50": resnet,
}


def load(name_or_path: str) -> Graph:
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]()
    if name_or_path.endswith(".json") or os.path.sep in name_or_path:
        return load_json(name_or_path)
    raise GraphError(f"unknown network {name_or_path!r}: give a built-in name "
                     f"({', '.join(BUILTIN)}) or a path to a .json graph")
