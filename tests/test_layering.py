"""The import graph points one way: no module of nudgefast imports one that imports it back (through
any chain, function-level imports included), and the layers keep their direction: the runner never
imports the engine, the kernels import nothing above them, params.py imports nothing of ours."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"nudgefast": ROOT / "nudgefast", "nudgefast.kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts]) if parts else pkg
            if pkg == "nudgefast" and parts[:1] == ["kernels"]:
                continue
            mods[name] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()

    def add(target: str):
        # the longest known module that `target` names (an attribute import names its module)
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            if not mod.startswith("nudgefast"):
                continue
            for a in node.names:
                full = f"{mod}.{a.name}"
                add(full if full in known else mod)
    return found


def graph() -> dict[str, set[str]]:
    mods = module_files()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles():
    g = graph()
    assert "nudgefast.engine.engine" in g and "nudgefast.runner.runner" in g  # the walk found the layers
    # package __init__ files re-export their children; a child importing its own package's
    # __init__ is not a layering cycle of the code itself, so drop those edges
    g = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in g.items()}
    assert cycles(g) == []


def test_the_layers_point_down():
    g = graph()
    for m, targets in g.items():
        if m.startswith("nudgefast.runner"):
            assert not any(t.startswith(("nudgefast.engine", "nudgefast.api", "nudgefast.serve", "nudgefast.bench"))
                           for t in targets), f"{m} imports upward: {targets}"
        if m.startswith("nudgefast.kernels"):
            assert all(t.startswith("nudgefast.kernels") or t == "nudgefast" for t in targets), f"{m}: {targets}"
        if m.startswith("nudgefast.engine"):
            assert not any(t.startswith(("nudgefast.api", "nudgefast.serve", "nudgefast.bench")) for t in targets), m
    assert g["nudgefast.params"] == set()


def test_a_planted_cycle_is_found():
    """The checker itself: a two-module cycle and a three-module cycle are reported."""
    g = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(cycles(g)) == [["a", "b"], ["c", "d", "e"]]
