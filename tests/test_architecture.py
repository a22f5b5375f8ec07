"""The package's import graph points one way: no cycles among squad_ds's modules, counting the imports made inside
functions (a cycle hidden in a function still ties the modules together), not counting `if TYPE_CHECKING:` ones."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "squad_ds"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {package module it imports: line}."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                while name and name not in modules:  # `from pkg import name` names a module or a symbol in one
                    name = name.rpartition(".")[0]
                if name and name != mod and name != "squad_ds":
                    graph[mod].setdefault(name, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20
    found = cycles(graph)
    detail = [f"{a} -> {b} (line {graph[a][b]})" for c in found for a in c for b in graph[a] if b in c]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_the_checker_sees_a_cycle_made_inside_a_function(tmp_path):
    pkg = tmp_path / "squad_ds"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from squad_ds.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from squad_ds import a\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["squad_ds.a", "squad_ds.sub.b"]]
    assert graph["squad_ds.c"] == {}


@pytest.mark.parametrize("module", ["errors", "atomic"])
def test_foundation_modules_import_nothing_of_the_package(module):
    assert import_graph()[f"squad_ds.{module}"] == {}


# Lower layers first (modules and packages; docs/ARCHITECTURE.md's table, and README's short list by these names,
# show them top down); a module may import its own layer and the ones before it, never a later one.
LAYERS = [
    ("foundation", ("squad_ds.errors", "squad_ds.atomic", "squad_ds.config", "squad_ds.options", "squad_ds.distributed",
                    "squad_ds.logs", "squad_ds.preempt", "squad_ds.model_record")),
    ("data", ("squad_ds.data", "squad_ds.sample_data")),
    ("scoring", ("squad_ds.scoring",)),
    ("modeling", ("squad_ds.modeling",)),
    ("training", ("squad_ds.training",)),
    ("entry points", ("squad_ds.plot", "squad_ds.train", "squad_ds.predict", "squad_ds.ask", "squad_ds.serve",
                      "squad_ds.effective", "squad_ds.hosts", "squad_ds.plan")),
    ("tune", ("squad_ds.tune",)),
    ("search", ("squad_ds.search",)),
    ("cli", ("squad_ds.cli",)),
]


def layer_of(module: str) -> int:
    if module == "squad_ds":  # the package's __init__: `from squad_ds import QuestionAnswerer`, a door at the top
        return len(LAYERS) - 1
    for i, (_, members) in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = [f"{a} -> {b} (line {line})" for a, deps in graph.items() for b, line in deps.items()
              if layer_of(b) > layer_of(a)]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def test_scoring_needs_no_torch():
    for path in (PACKAGE / "scoring").glob("*.py"):
        assert "torch" not in {n.split(".")[0] for n in _imported_names(path)}, path


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


ROOT = PACKAGE.parent


def test_architecture_page_lists_the_layers_top_down():
    """docs/ARCHITECTURE.md's table is the layer order shown to readers: every module or folder it names belongs to
    a layer, each row's layer is at or below the one above it, and every layer is there."""
    import re

    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = page.split("| folder / module | owns |", 1)[1].split("\n\n", 1)[0]
    layers = []
    for row in table.splitlines()[2:]:
        named = re.match(r"\| \**`([\w/.]+)`", row)
        if named:
            path = named.group(1).removesuffix(".py").rstrip("/")
            layers.append((path, layer_of("squad_ds." + path.replace("/", "."))))
    assert len(layers) > 15
    upward = [f"{a} above {b}" for (a, la), (b, lb) in zip(layers, layers[1:]) if lb > la]
    assert not upward, "docs/ARCHITECTURE.md's table lists a lower layer above a higher one: " + ", ".join(upward)
    assert {layer for _, layer in layers} == set(range(len(LAYERS)))


def readme_layer_list(readme: str) -> list[tuple[str, list[str]]]:
    """README's short list under "## Architecture": (layer name, the modules and folders it names), in order."""
    import re

    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^- \*\*([\w ]+)\*\* \(([^)]*)\)", section, re.M)
    return [(name, re.findall(r"`([\w/.]+)`", named)) for name, named in items]


def layer_list_problems(items: list[tuple[str, list[str]]]) -> list[str]:
    names = [name for name, _ in LAYERS][::-1]  # top down
    problems = []
    if [name for name, _ in items] != names:
        problems.append(f"layers {[name for name, _ in items]}, expected top down {names}")
    index = {name: i for i, (name, _) in enumerate(LAYERS)}
    for name, paths in items:
        for path in paths:
            layer = layer_of("squad_ds." + path.removesuffix(".py").rstrip("/").replace("/", "."))
            if name in index and layer != index[name]:
                problems.append(f"{path} is in {LAYERS[layer][0]}, listed under {name}")
    return problems


def test_readme_lists_the_layers_top_down():
    """README's short layer list names every layer, top down, each with modules that are in it, and links the full
    table."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/ARCHITECTURE.md)" in readme
    items = readme_layer_list(readme)
    problems = layer_list_problems(items)
    assert not problems, "README's layer list: " + "; ".join(problems)
    assert sum(len(paths) for _, paths in items) >= len(LAYERS)


def test_the_layer_list_check_sees_a_wrong_order_and_a_misplaced_module():
    good = readme_layer_list((ROOT / "README.md").read_text(encoding="utf-8"))
    swapped = [good[1], good[0], *good[2:]]
    assert any("expected top down" in p for p in layer_list_problems(swapped))
    misplaced = [(name, ["train.py"] if name == "scoring" else paths) for name, paths in good]
    assert layer_list_problems(misplaced) == ["train.py is in entry points, listed under scoring"]
    assert any("expected top down" in p for p in layer_list_problems(good[:-1]))
