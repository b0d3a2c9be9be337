"""The package's layers point one way: no import cycles (imports inside functions count), no
module below the commands imports a command, and commands import no other command."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "bnff"


def module_name(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports():
    """{module: {bnff modules it imports}}, `from a import b` counted as a.b when that is a
    module, else a."""
    mods = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module in mods:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else node.module)
        graph[name] = {d for d in deps if d != name and not d.endswith("__init__")}
    return graph


def test_no_import_cycles():
    graph, state, stack = imports(), {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)


def test_commands_sit_on_top():
    graph = imports()
    for m, deps in graph.items():
        cli = {d for d in deps if d.startswith("bnff.cli")}
        if not m.startswith("bnff.cli"):
            assert not cli, f"{m} imports the command layer: {cli}"
        elif m != "bnff.cli.main":
            assert cli <= {"bnff.cli.args"}, f"command {m} imports a command: {cli}"
