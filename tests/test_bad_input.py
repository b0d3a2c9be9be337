"""Bad input to every command: one line on stderr naming the problem, exit 2, no traceback, and
no output file created or changed (issue 14, items 1 and 8). Nothing here compiles or times:
every case is refused before any work starts."""
import copy
import json
import os

import pytest

from bnff.cli.args import check_memory, UserError
from bnff.cli.main import main

EXAMPLE = "bnff/suites/examples/vgg_residual.json"
with open(EXAMPLE) as _f:
    GRAPH = json.load(_f)


def run_bad(argv, capsys, match):
    """Runs argv, which must fail with exit 2 and one stderr line containing `match`."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def edited(**changes):
    """The example graph with node attributes changed: {node name: {attr: value or None}}."""
    d = copy.deepcopy(GRAPH)
    for node in d["nodes"]:
        for k, v in changes.get(node["name"], {}).items():
            if v is None:
                node.pop(k)
            else:
                node[k] = v
    return d


GRAPHS = {  # file content -> what the message names
    "missing": (None, "cannot read"),
    "not json": ("conv1 -> bn1", "is not valid JSON"),
    "binary": (b"\xff\xfe\x00\x81", "is not valid JSON"),
    "not an object": ("[1, 2]", "a graph is a JSON object"),
    "truncated": (json.dumps(GRAPH)[:200], "is not valid JSON"),
    "unknown op": (edited(bn1={"op": "dropout"}), "unknown op 'dropout'"),
    "unknown input": (edited(bn1={"inputs": ["conv9"]}), "input 'conv9' is not the graph input"),
    "missing input": (edited(bn1={"inputs": None}), "has no 'inputs'"),
    "cycle": (edited(conv1={"inputs": ["relu1"]}), "cycle: conv1 -> bn1 -> relu1 -> conv1"),
    "add channels": (edited(conv2={"out_channels": 8}), "add inputs differ"),
    "concat spatial": (edited(branch={"stride": 2}), "concat inputs differ"),
    "zero channels": (edited(conv1={"out_channels": 0}), "'out_channels' must be an integer >= 1"),
    "zero kernel": (edited(conv1={"kernel": 0}), "'kernel' must be an integer >= 1"),
    "negative stride": (edited(conv3={"stride": -1}), "'stride' must be an integer >= 1"),
    "nan eps": (json.dumps(edited(bn1={"eps": float("nan")})), "'eps' must be a finite number"),
    "code as data": (edited(bn1={"op": "__import__('os').system('false')"}), "unknown op"),
}


@pytest.mark.parametrize("case", GRAPHS)
@pytest.mark.parametrize("command", ["show", "check", "micro", "bench"])
def test_bad_graph_files(tmp_path, capsys, case, command):
    content, match = GRAPHS[case]
    path = tmp_path / "g.json"
    if isinstance(content, dict):
        path.write_text(json.dumps(content))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "out.csv"
    argv = {"show": ["show", str(path)],
            "check": ["check", str(path), "--dump", str(tmp_path / "d.npz")],
            "micro": ["micro", str(path), "--csv", str(out)],
            "bench": ["bench", str(path), "--csv", str(out)]}[command]
    run_bad(argv, capsys, match)
    assert sorted(os.listdir(tmp_path)) == ([] if content is None else ["g.json"])


def test_spatial_size_reaching_zero(capsys):
    run_bad(["show", EXAMPLE, "--image", "2"], capsys, "too small")
    run_bad(["bench", EXAMPLE, "--image", "3"], capsys, "too small")


@pytest.mark.parametrize("argv,match", [
    (["show", "nonet"], "unknown network 'nonet'"),
    (["check", "nonet"], "unknown network 'nonet'"),
    (["micro", "nonet"], "unknown network 'nonet'"),
    (["bench", "resnet50", "nonet"], "unknown network 'nonet'"),
    (["check", EXAMPLE, "--schedule", "nope"], "invalid choice: 'nope'"),
    (["bench", EXAMPLE, "--schedules", "baseline,nope"], "unknown schedule(s) 'nope'"),
    (["micro", EXAMPLE, "--batch", "2", "--image", "16", "--stage", "nope"],
     "unknown stage 'nope'"),
    (["micro", EXAMPLE, "--batch", "2", "--image", "16", "--stage", "relu_fwd",
      "--variant", "nope"], "has no variant 'nope'"),
    (["micro", EXAMPLE, "--batch", "2", "--image", "16", "--variant", "nope"],
     "no stage matches"),
    (["bench", EXAMPLE, "--batch", "x"], "expected a positive integer, got 'x'"),
    (["bench", EXAMPLE, "--batch", "0"], "expected a positive integer, got '0'"),
    (["check", EXAMPLE, "--image", "-3"], "expected a positive integer, got '-3'"),
    (["micro", EXAMPLE, "--image", "1.5"], "expected a positive integer, got '1.5'"),
    (["bench", EXAMPLE, "--threads", "0"], "thread counts must be between 1 and"),
    (["roofline", "--threads", "999"], "thread counts must be between 1 and"),
    (["micro", EXAMPLE, "--threads", "two"], "bad thread list 'two'"),
    (["bench", EXAMPLE, "--repeat", "0"], "expected a positive integer, got '0'"),
    (["bench", EXAMPLE, "--repeat", "many"], "expected a positive integer, got 'many'"),
    (["roofline", "--reps", "-1"], "expected a positive integer, got '-1'"),
    (["roofline", "--array-mib", "nan"], "expected a positive number, got 'nan'"),
    (["micro", EXAMPLE, "--min-time", "-1"], "expected a number >= 0, got '-1'"),
    (["bench", EXAMPLE, "--seed", "-1"], "expected an integer >= 0, got '-1'"),
    (["bench", EXAMPLE, "--resume"], "--resume needs --csv"),
    (["networks", "--image", "0"], "expected a positive integer, got '0'"),
])
def test_bad_arguments(capsys, argv, match):
    run_bad(argv, capsys, match)


def test_unwritable_outputs(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    under_file = str(f / "out.csv")
    run_bad(["bench", EXAMPLE, "--csv", under_file], capsys, "is not a folder")
    run_bad(["micro", EXAMPLE, "--csv", under_file], capsys, "is not a folder")
    run_bad(["roofline", "--csv", under_file], capsys, "is not a folder")
    run_bad(["check", EXAMPLE, "--dump", str(f / "d.npz")], capsys, "is not a folder")
    run_bad(["bench", EXAMPLE, "--csv", str(tmp_path)], capsys, "it is a folder")
    run_bad(["bench", EXAMPLE, "--plot", str(f / "plots")], capsys, "is not a folder")
    run_bad(["report", "--results", str(tmp_path), "--out", under_file], capsys,
            "is not a folder")
    assert os.listdir(tmp_path) == ["file"] and f.read_text() == "x"


def test_a_csv_with_other_columns_is_refused_unchanged(tmp_path, capsys):
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    for argv in (["bench", EXAMPLE], ["micro", EXAMPLE], ["roofline"]):
        run_bad(argv + ["--csv", str(out)], capsys, "has other columns")
    assert out.read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("argv", [
    ["bench", EXAMPLE, "--batch", "100000", "--image", "512"],
    ["bench", "resnet50", "--batch", "16", "--memory-gib", "0.1"],
    ["check", EXAMPLE, "--batch", "100000", "--image", "512"],
    ["micro", EXAMPLE, "--batch", "100000", "--image", "512"],
    ["roofline", "--array-mib", "100000000"],
])
def test_runs_that_do_not_fit_in_memory(tmp_path, capsys, argv):
    out = tmp_path / "out.csv"
    run_bad(argv + (["--csv", str(out)] if argv[0] != "check" else []), capsys, "GiB")
    assert not out.exists()


def test_memory_check_counts_against_available():
    with pytest.raises(UserError, match="needs 1.00 GiB but 1.0 GiB are available"):
        check_memory(2**30, "x", available=2**30)
    check_memory(2**29, "x", available=2**30)


def test_inputs_are_data_only():
    """Files are read as data: JSON parsed, .npz with allow_pickle=False; nothing in bnff/
    evaluates, executes or unpickles anything."""
    for root, _, files in os.walk("bnff"):
        # the kernels read no input; a register tile's source is generated there from constants
        # and exec'd (conv_direct_bww._tile_source), so exec( is allowed in kernels/ alone
        compute = root.startswith(os.path.join("bnff", "kernels"))
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(root, name)).read()
                for bad in ("eval(", "exec(", "pickle.load", "yaml.load", "__import__("):
                    assert bad not in text or (compute and bad == "exec("), (name, bad)
                for i in range(text.count("np.load(")):
                    call = text.split("np.load(")[i + 1].split(")")[0]
                    assert "allow_pickle=False" in call, name
