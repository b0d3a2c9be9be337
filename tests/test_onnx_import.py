"""ONNX import: every supported op, every refused case, external data, the CLI, and round
trips of the built-in networks through the exporter. Models are built with onnx.helper."""
import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bnff.cli.main import main  # noqa: E402
from bnff.suites import networks  # noqa: E402
from bnff.suites.graph import GraphError  # noqa: E402
from bnff.suites.onnx_export import to_onnx  # noqa: E402
from bnff.suites.onnx_import import SUPPORTED, load_onnx, load_onnx_with_params  # noqa: E402
from bnff.suites.problem import make_params  # noqa: E402

RNG = np.random.default_rng(0)


class Model:
    """A model under construction: nodes, initializers (random values), one image input."""

    def __init__(self, channels=3, side=8):
        self.nodes, self.inits, self.k = [], [], 0
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                   ["N", channels, side, side])

    def init(self, name, shape):
        self.inits.append(numpy_helper.from_array(
            RNG.standard_normal(shape).astype(np.float32), name))
        return name

    def node(self, op, inputs, name=None, outputs=1, **attrs):
        self.k += 1
        name = name or f"{op.lower()}{self.k}"
        outs = [f"{name}:out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name, **attrs))
        return outs[0]

    def conv(self, x, cin, cout, k=3, bias=False, name=None, **attrs):
        name = name or f"conv{self.k + 1}"
        ins = [x, self.init(f"{name}.weight", (cout, cin, k, k))]
        if bias:
            ins.append(self.init(f"{name}.bias", (cout,)))
        attrs = {"kernel_shape": [k, k], "pads": [k // 2] * 4, **attrs}
        return self.node("Conv", ins, name, **attrs)

    def bn(self, x, c, name=None, **attrs):
        name = name or f"bn{self.k + 1}"
        ins = [x] + [self.init(f"{name}.{v}", (c,)) for v in ("weight", "bias", "mean", "var")]
        return self.node("BatchNormalization", ins, name, **attrs)

    def gemm(self, x, fin, fout, name="fc", **attrs):
        return self.node("Gemm", [x, self.init(f"{name}.weight", (fout, fin)),
                                  self.init(f"{name}.bias", (fout,))], name, transB=1, **attrs)

    def head(self, x, c, classes=5):
        """GlobalAveragePool, Flatten, Gemm: the logits."""
        return self.gemm(self.node("Flatten", [self.node("GlobalAveragePool", [x])], axis=1),
                         c, classes)

    def save(self, path, out, opset=17):
        y = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", None])
        g = helper.make_graph(self.nodes, "m", [self.input], [y], self.inits)
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), path)
        return str(path)


def every_op(tmp_path):
    m = Model()
    x = m.conv("x", 3, 8, bias=True, name="stem")
    x = m.bn(x, 8, name="stem_bn", epsilon=1e-3, momentum=0.8)
    x = m.node("Relu", [x], "r0")
    x = m.node("MaxPool", [x], "mp", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    a = m.conv(x, 8, 4, k=1, name="a", pads=[0] * 4)
    b = m.conv(x, 8, 4, k=3, name="b")
    x = m.node("Concat", [a, b], "cat", axis=1)
    x = m.node("Add", [x, m.node("Identity", [x], "id")], "add")
    x = m.node("AveragePool", [x], "ap", kernel_shape=[2, 2], strides=[2, 2])
    x = m.node("GlobalAveragePool", [x], "gap")
    shape = m.node("Constant", [], "shape", value=numpy_helper.from_array(
        np.array([-1, 8], np.int64)))
    x = m.node("Reshape", [x, shape], "flat")
    x = m.node("Dropout", [x], "drop")
    x = m.node("Relu", [m.gemm(x, 8, 6, name="fc1")], "r1")
    mm = m.node("MatMul", [x, m.init("fc2.weight", (6, 5))], "fc2")
    return m.save(tmp_path / "every.onnx", m.node("Add", [mm, m.init("fc2.bias", (5,))], "fc2b"))


EXPECTED = [
    {"name": "stem", "op": "conv2d", "inputs": ["input"], "out_channels": 8, "kernel": 3,
     "stride": 1, "padding": 1, "bias": True},
    {"name": "stem_bn", "op": "batchnorm", "inputs": ["stem"], "eps": 1e-3, "momentum": 0.2},
    {"name": "r0", "op": "relu", "inputs": ["stem_bn"]},
    {"name": "mp", "op": "maxpool2d", "inputs": ["r0"], "kernel": 3, "stride": 2, "padding": 1},
    {"name": "a", "op": "conv2d", "inputs": ["mp"], "out_channels": 4, "kernel": 1,
     "stride": 1, "padding": 0, "bias": False},
    {"name": "b", "op": "conv2d", "inputs": ["mp"], "out_channels": 4, "kernel": 3,
     "stride": 1, "padding": 1, "bias": False},
    {"name": "cat", "op": "concat", "inputs": ["a", "b"]},
    {"name": "add", "op": "add", "inputs": ["cat", "cat"]},
    {"name": "ap", "op": "avgpool2d", "inputs": ["add"], "kernel": 2, "stride": 2},
    {"name": "gap", "op": "global_avgpool", "inputs": ["ap"]},
    {"name": "fc1", "op": "linear", "inputs": ["gap"], "out_features": 6},
    {"name": "r1", "op": "relu", "inputs": ["fc1"]},
    {"name": "fc2", "op": "linear", "inputs": ["r1"], "out_features": 5},
]


def test_every_supported_op(tmp_path):
    path = every_op(tmp_path)
    g = load_onnx(path)
    assert g.to_dict() == {"name": "every", "input_channels": 3, "nodes": EXPECTED,
                           "output": "fc2"}
    g, params = load_onnx_with_params(path)
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(params["stem.bias"], inits["stem.bias"])
    assert np.array_equal(params["fc2.weight"], inits["fc2.weight"].T)  # MatMul: [in, out]
    assert np.array_equal(params["fc1.weight"], inits["fc1.weight"])
    assert g.infer_shapes(2, 16)["fc2"] == (2, 5)


def test_flatten_of_a_spatial_map(tmp_path):
    """VGG's classifier: the map flattened in NCHW order, its size fixed by the Gemm."""
    m = Model()
    path = m.save(tmp_path / "f.onnx", m.gemm(m.node("Flatten", ["x"], "fl", axis=1), 192, 5))
    g = load_onnx(path)
    assert g.by_name["fl"].to_dict() == {"name": "fl", "op": "flatten", "inputs": ["input"],
                                         "size": 8}
    assert g.infer_shapes(2, 8)["fl"] == (2, 192)
    with pytest.raises(GraphError, match="flatten expects a 8x8 input, got 16x16"):
        g.infer_shapes(2, 16)


def refused(tmp_path, build, opset=17):
    m = Model()
    out = build(m)
    return m.save(tmp_path / "bad.onnx", out, opset)


def active_dropout(m):
    """A Dropout with ratio 0.5 and training_mode a constant true."""
    t = m.node("Constant", [], "t", value=numpy_helper.from_array(np.array(True)))
    r = m.node("Constant", [], "r", value=numpy_helper.from_array(np.array(0.5, np.float32)))
    return m.head(m.node("Dropout", [m.conv("x", 3, 4), r, t], "dr"), 4)


CASES = [
    (lambda m: m.head(m.node("Sigmoid", [m.conv("x", 3, 4)], "sig"), 4),
     r"node sig \(Sigmoid\) is not supported; supported: Conv, BatchNormalization"),
    (lambda m: m.head(m.conv("x", 3, 4, name="g", group=1, dilations=[2, 2]), 4),
     r"node g \(Conv\): dilations \[2, 2\]"),
    (lambda m: m.head(m.node("Conv", ["x", m.init("g.weight", (4, 1, 3, 3))], "g", group=3,
                             kernel_shape=[3, 3]), 4), r"node g \(Conv\): group 3"),
    (lambda m: m.head(m.conv("x", 3, 4, name="s", strides=[1, 2]), 4),
     r"node s \(Conv\): strides \[1, 2\] is not square"),
    (lambda m: m.head(m.conv("x", 3, 4, name="p", pads=[1, 1, 0, 0]), 4),
     r"node p \(Conv\): pads \[1, 1, 0, 0\] is not square"),
    (lambda m: m.head(m.node("MaxPool", ["x"], "mp", kernel_shape=[2, 2], ceil_mode=1), 3),
     r"node mp \(MaxPool\): ceil_mode"),
    (lambda m: m.head(m.node("AveragePool", ["x"], "ap", kernel_shape=[3, 3],
                             pads=[1, 1, 1, 1]), 3), r"node ap \(AveragePool\): padding 1"),
    (lambda m: m.head(m.node("Concat", ["x", "x"], "c", axis=2), 3),
     r"node c \(Concat\): axis 2 is not the channel axis"),
    (lambda m: m.gemm(m.node("Flatten", ["x"], "fl", axis=2), 192, 5),
     r"node fl \(Flatten\): only the flattening of \[N, C, H, W\] to \[N, C\*H\*W\]"),
    (lambda m: m.gemm(m.node("Flatten", ["x"], "fl", axis=1), 150, 5),
     r"node fl \(Flatten\): 150 features of the layer reading it are not 3 channels"),
    (lambda m: m.gemm(m.node("Relu", [m.node("Flatten", ["x"], "fl", axis=1)]), 192, 5),
     r"node fl \(Flatten\): flattens a spatial map for something other than one Gemm"),
    (active_dropout, r"node dr \(Dropout\): an active dropout \(ratio 0.5, training mode\)"),
    (lambda m: m.gemm(m.node("Flatten", [m.node("GlobalAveragePool", ["x"])]), 3, 5, alpha=2.0),
     r"node fc \(Gemm\): only Y = A \* B"),
    (lambda m: m.node("Gemm", [m.node("Flatten", [m.node("GlobalAveragePool", ["x"])]),
                               m.init("fc.weight", (5, 3))], "fc", transB=1),
     r"node fc \(Gemm\): has no bias"),
    (lambda m: m.node("MatMul", [m.node("Flatten", [m.node("GlobalAveragePool", ["x"])]),
                                 m.init("mm.weight", (3, 5))], "mm"),
     r"node mm \(MatMul\): has no bias"),
    (lambda m: m.head(m.node("Add", ["x", m.init("k", (3, 1, 1))], "addk"), 3),
     r"node addk \(Add\): adds a constant"),
    (lambda m: m.head(m.node("Relu", [m.node("BatchNormalization", ["x"] + [
        m.init(f"bn.{v}", (3,)) for v in ("weight", "bias", "mean", "var")], "bn", outputs=2,
        training_mode=1)[:-1] + "1"], "r"), 3),
     r"node bn \(BatchNormalization\): its output 'bn:out1' is used"),
    (lambda m: m.node("Relu", [m.conv("x", 3, 4)], "last"),
     r"the output 'last:out0' is not the \[N, classes\] logits"),
    (lambda m: m.head(m.node("Conv", [m.node("GlobalAveragePool", ["x"], "gp"),
                                      m.init("c.weight", (4, 3, 1, 1))], "c",
                             kernel_shape=[1, 1]), 4),
     r"node c \(Conv\): needs an \[N, C, H, W\] input with a spatial extent"),
    (lambda m: m.head(m.conv("x", 5, 4, name="wrong"), 4),
     r"node wrong \(Conv\): weight expects 5 input channels, its input has 3"),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_unsupported_models_are_refused_in_one_line(tmp_path, case):
    build, message = CASES[case]
    path = refused(tmp_path, build)
    with pytest.raises(GraphError, match=message) as e:
        load_onnx(path)
    assert "\n" not in str(e.value)


def test_unsupported_message_lists_the_supported_set(tmp_path):
    path = refused(tmp_path, lambda m: m.head(m.node("Sigmoid", ["x"], "s"), 3))
    with pytest.raises(GraphError) as e:
        load_onnx(path)
    assert str(e.value).endswith("supported: " + ", ".join(SUPPORTED))


def test_model_needs_one_image_input_with_fixed_channels(tmp_path):
    m = Model()
    m.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", 8, 8])
    path = m.save(tmp_path / "m.onnx", m.head("x", 3))
    with pytest.raises(GraphError, match="is not \\[N, C, H, W\\] with a fixed channel count"):
        load_onnx(path)


def external_model(tmp_path, location, truncate=0):
    """A model whose conv weight lives in an external file at `location` (written when it
    names a file of the model's folder other than missing.bin)."""
    m = Model()
    path = m.save(tmp_path / "ext.onnx", m.head(m.conv("x", 3, 4, name="c"), 4))
    model = onnx.load(path)
    t = next(t for t in model.graph.initializer if t.name == "c.weight")
    data = t.raw_data or numpy_helper.to_array(t).tobytes()
    target = os.path.join(tmp_path, location) if not os.path.isabs(location) else location
    if os.path.dirname(os.path.abspath(target)) == str(tmp_path) and location != "missing.bin":
        with open(target, "wb") as f:
            f.write(data[:len(data) - truncate])
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    onnx.save(model, path)
    return path, numpy_helper.to_array(numpy_helper.from_array(
        np.frombuffer(data, np.float32).reshape(4, 3, 3, 3)))


def test_external_data_inside_the_folder_is_read(tmp_path):
    path, weight = external_model(tmp_path, "weights.bin")
    g, params = load_onnx_with_params(path)
    assert np.array_equal(params["c.weight"], weight)


@pytest.mark.parametrize("location,message", [
    ("/etc/passwd", "outside the model's folder; refused"),
    ("../outside.bin", "outside the model's folder; refused"),
    ("sub/../../outside.bin", "outside the model's folder; refused"),
    ("missing.bin", "external data file 'missing.bin' of tensor 'c.weight' is missing"),
])
def test_external_data_outside_or_missing_is_refused(tmp_path, location, message):
    path, _ = external_model(tmp_path, location)
    with pytest.raises(GraphError, match=message):
        load_onnx(path)


def test_truncated_external_data_is_one_line(tmp_path):
    path, _ = external_model(tmp_path, "weights.bin", truncate=8)
    with pytest.raises(GraphError, match="external data file 'weights.bin' is truncated"):
        load_onnx(path)


def test_truncated_and_corrupt_models_are_one_line(tmp_path, capsys):
    path = every_op(tmp_path)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[:len(data) // 2])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 64)
    for p in (cut, bad):
        assert main(["show", str(p)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bnff show: error: ") and err.count("\n") == 1
        assert "not a readable ONNX model" in err or "not an ONNX model" in err


def test_import_command(tmp_path, capsys):
    path = every_op(tmp_path)
    out = tmp_path / "every.json"
    assert main(["import", path, "-o", str(out)]) == 0
    assert networks.load(str(out)) == load_onnx(path)
    assert main(["import", path]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == EXPECTED
    assert main(["show", path, "--image", "16"]) == 0  # every NET takes a .onnx path
    assert "every: 13 nodes" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "none.onnx")]) == 2
    assert capsys.readouterr().err.startswith("bnff import: error: cannot read")


@pytest.mark.parametrize("name", list(networks.BUILTIN))
def test_builtin_round_trip(tmp_path, name):
    g = networks.load(name)
    model = to_onnx(g)
    onnx.checker.check_model(model)
    path = tmp_path / f"{g.name}.onnx"
    onnx.save(model, path)
    assert load_onnx(str(path)) == g


def test_export_with_parameters_round_trips_them(tmp_path):
    g = networks.load("resnet18")
    params = make_params(g, 0)
    path = tmp_path / "resnet18.onnx"
    onnx.save(to_onnx(g, params, image=32), path)
    back, values = load_onnx_with_params(str(path))
    assert back == g and set(values) == set(params)
    assert all(np.array_equal(values[k], v) for k, v in params.items())
