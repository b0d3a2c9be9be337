"""Network graphs: built-in networks, the JSON format and its errors."""
import json

import pytest

from bnff.suites import networks
from bnff.suites.graph import Graph, GraphError

EXAMPLE = "bnff/suites/examples/vgg_residual.json"


@pytest.mark.parametrize("name,params,convs", [("densenet121", 7_978_856, 120),
                                               ("resnet50", 25_557_032, 53)])
def test_builtin_parameter_counts(name, params, convs):
    g = networks.load(name)
    assert g.num_params() == params
    assert sum(n.op == "conv2d" for n in g.nodes) == convs
    assert g.infer_shapes(16, 224)[g.output] == (16, 1000)


def test_densenet_layer_sees_all_earlier_features():
    g = networks.load("densenet121")
    cat = g.by_name["block2.layer12.cat"]
    assert len(cat.inputs) == 12 and cat.inputs[0] == "trans1.pool"
    assert g.infer_shapes(1, 224)["block2.layer12.cat"] == (1, 128 + 11 * 32, 28, 28)
    assert g.infer_shapes(1, 224)["block4.cat"] == (1, 1024, 7, 7)


def test_resnet_v15_strides_on_3x3():
    g = networks.load("resnet50")
    assert g.by_name["layer2.0.conv1"]["stride"] == 1
    assert g.by_name["layer2.0.conv2"]["stride"] == 2
    assert g.by_name["layer2.0.downsample.conv"]["stride"] == 2


@pytest.mark.parametrize("name", ["densenet121", "resnet50", EXAMPLE])
def test_json_round_trip(tmp_path, name):
    g = networks.load(name)
    path = tmp_path / "g.json"
    path.write_text(g.to_json())
    back = networks.load(str(path))
    assert back == g and back.num_params() == g.num_params()
    assert back.infer_shapes(2, 64) == g.infer_shapes(2, 64)


def test_defaults_are_filled_in():
    g = Graph.from_dict({"name": "t", "input_channels": 2, "output": "p", "nodes": [
        {"name": "c", "op": "conv2d", "inputs": ["input"], "out_channels": 4, "kernel": 3},
        {"name": "b", "op": "batchnorm", "inputs": ["c"]},
        {"name": "p", "op": "maxpool2d", "inputs": ["b"], "kernel": 2}]})
    assert g.by_name["c"].attrs == {"out_channels": 4, "kernel": 3, "stride": 1, "padding": 0,
                                     "bias": False}
    assert g.by_name["b"].attrs == {"eps": 1e-5, "momentum": 0.1}
    assert g.by_name["p"]["stride"] == 2
    assert g.infer_shapes(1, 9)["p"] == (1, 4, 3, 3)


def _example():
    with open(EXAMPLE) as f:
        return json.load(f)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["nodes"][0].update(op="conv3d"), "unknown op"),
    (lambda d: d["nodes"][0].pop("kernel"), "needs attribute 'kernel'"),
    (lambda d: d["nodes"][0].update(kernel=0), "'kernel' must be an integer >= 1"),
    (lambda d: d["nodes"][0].update(bias=1), "'bias' must be true or false"),
    (lambda d: d["nodes"][0].update(groups=2), "unknown attribute"),
    (lambda d: d["nodes"][1].update(inputs=["relu1"]), "the graph has a cycle: bn1 -> relu1 -> bn1"),
    (lambda d: d["nodes"][1].update(name="conv1"), "duplicate node name"),
    (lambda d: d["nodes"][5].update(inputs=["bn2", "input"]), "add inputs differ"),
    (lambda d: d["nodes"][9].update(inputs=["pool1"]), "two or more inputs"),
    (lambda d: d["nodes"][15].update(inputs=["pool2"]), "needs an [N, F] input"),
    (lambda d: d.update(output="nope"), "output 'nope' is not a node"),
    (lambda d: d.pop("nodes"), "graph has no 'nodes'"),
])
def test_bad_graphs_are_refused_clearly(edit, message):
    d = _example()
    edit(d)
    with pytest.raises(GraphError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Graph.from_dict(d).infer_shapes(2, 16)


def test_too_small_image_is_refused():
    with pytest.raises(GraphError, match="too small"):
        networks.load("densenet121").infer_shapes(1, 16)


def test_unknown_network_and_bad_file(tmp_path):
    with pytest.raises(GraphError, match="unknown network"):
        networks.load("vgg16")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GraphError, match="not valid JSON"):
        networks.load(str(bad))
    with pytest.raises(GraphError, match="cannot read"):
        networks.load(str(tmp_path / "missing.json"))
