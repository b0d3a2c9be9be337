"""The float64 reference training iteration, checked by finite differences through a whole
graph with a residual add, a concat and every op, and the `bnff` commands around it."""
import numpy as np
import pytest

from bnff.cli.main import main
from bnff.suites.problem import make_batch, make_params
from bnff.lowering.reference_step import train_step
from bnff.suites import networks

EXAMPLE = "bnff/suites/examples/vgg_residual.json"


def test_parameter_gradients_match_finite_differences():
    g = networks.load(EXAMPLE)
    params = {k: v.astype(np.float64) for k, v in make_params(g, 3).items()}
    x, labels = make_batch(g, 2, 12, 3)
    loss, grads = train_step(g, params, x, labels)
    rng = np.random.default_rng(0)
    for name in params:  # every parameter of every op, a few entries each
        for _ in range(3):
            i = tuple(rng.integers(0, s) for s in params[name].shape)
            p_plus = {**params, name: params[name].copy()}
            p_minus = {**params, name: params[name].copy()}
            p_plus[name][i] += 1e-6
            p_minus[name][i] -= 1e-6
            num = (train_step(g, p_plus, x, labels)[0] - train_step(g, p_minus, x, labels)[0]) / 2e-6
            assert grads[name][i] == pytest.approx(num, rel=1e-4, abs=1e-8), (name, i)


def test_seeded_problem_is_reproducible_and_exercises_bn():
    g = networks.load("resnet50")
    a, b = make_params(g, 7), make_params(g, 7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(v.dtype == np.float32 for v in a.values())
    gamma, beta = a["bn1.weight"], a["bn1.bias"]
    assert np.all((gamma >= 0.5) & (gamma <= 1.5)) and gamma.std() > 0.1
    assert np.abs(beta).max() > 0.1
    w = a["layer1.0.conv2.weight"]
    assert w.std() == pytest.approx(np.sqrt(2 / (64 * 9)), rel=0.05)
    assert not np.array_equal(make_params(g, 8)["fc.weight"], a["fc.weight"])


def test_check_dump(tmp_path, capsys):
    out = tmp_path / "d.npz"
    assert main(["check", EXAMPLE, "--batch", "2", "--image", "16", "--seed", "5",
                 "--dump", str(out)]) == 0
    assert "vgg_residual" in capsys.readouterr().out
    d = np.load(out, allow_pickle=False)
    g = networks.load(EXAMPLE)
    assert d["input"].dtype == np.float32 and d["input"].shape == (2, 3, 16, 16)
    assert d["labels"].dtype == np.int64 and d["labels"].shape == (2,)
    for name, shape in g.params().items():
        assert d[f"param:{name}"].shape == shape and d[f"grad:{name}"].shape == shape
    params = {k[6:]: d[k] for k in d.files if k.startswith("param:")}
    loss, grads = train_step(g, params, d["input"], d["labels"])
    assert float(d["loss"]) == loss
    assert np.array_equal(d["grad:conv1.weight"], grads["conv1.weight"])


@pytest.mark.parametrize("argv,message", [
    (["check", "nonet"], "unknown network"),
    (["check", "densenet121", "--image", "20"], "too small"),
    (["check", EXAMPLE, "--image", "16", "--dump", "x.txt"], "ending in .npz"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_networks_and_show(capsys):
    assert main(["networks"]) == 0
    out = capsys.readouterr().out
    assert "7,978,856" in out and "25,557,032" in out
    assert main(["show", "resnet50", "--image", "64"]) == 0
    assert "layer4.2.conv3" in capsys.readouterr().out
    assert main(["show", "densenet121", "--json"]) == 0
    assert networks.load("densenet121").to_json() in capsys.readouterr().out


@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_builtin_networks_train_at_small_size(name):
    g = networks.load(name)
    x, labels = make_batch(g, 1, 32, 0)
    loss, grads = train_step(g, make_params(g, 0), x, labels)
    assert np.isfinite(loss) and loss > 0
    assert set(grads) == set(g.params())
    assert all(np.isfinite(v).all() for v in grads.values())
