"""The house rules, checked on the source: one direction of imports, no circles, prefect only in the
Prefect layer, short functions, and the package list that installs tasks/ and flows/ under npuflow."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# folder on disk -> import name (tasks/ and flows/ install as npuflow.tasks / npuflow.flows)
SOURCES = {"npuflow": "npuflow", "tasks": "npuflow.tasks", "flows": "npuflow.flows"}
# Layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS = (
    ("npuflow.demo",),  # the demo model and corpus: imports nothing of npuflow
    ("npuflow.core",),  # config, settings, errors, artifacts, store, text, names
    ("npuflow.formats",),  # on-disk layouts of quantized weights (read by runtime, written by quant)
    ("npuflow.runtime", "npuflow.eval"),  # loading and generation; quality metrics
    ("npuflow.quant",),  # quantization (sensitivity and fallback run the runtime)
    ("npuflow.bench", "npuflow.stages"),  # benchmark; fetch, convert, validate
    ("npuflow.registry",),  # MLflow registry, promotion, rollback, nightly check
    ("npuflow.serving",),  # the server, canary load, rollout analysis, k8s manifests
    ("npuflow.tasks",),  # Prefect tasks
    ("npuflow.flows",),  # Prefect flows
    ("npuflow.cli",),  # the command line
)
MAX_FUNCTION_LINES = 80  # longer needs a reason in the docstring, starting "Long:"


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in SOURCES.items():
        for p in sorted((ROOT / folder).rglob("*.py")):
            rel = p.relative_to(ROOT / folder).with_suffix("").parts
            parts = [name, *rel]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """module -> project modules it imports (a `from pkg import sub` counts as importing pkg.sub)."""
    return {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def _layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return -1  # npuflow/__init__.py: the version only


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in MODULES if _layer(m) < 0 and m != "npuflow"]
    assert not unplaced, f"modules outside every layer (add their folder to LAYERS): {unplaced}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = [f"{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})"
              for m, deps in _graph().items() for i in sorted(deps) if _layer(i) > _layer(m)]
    assert not upward, "imports against the layer direction:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    graph = _graph()
    # a package's __init__ is imported by each of its modules: leave those edges out
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert not _cycles(graph), f"import circles: {_cycles(graph)}"


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_only_the_prefect_layer_imports_prefect() -> None:
    library = [m for m, p in MODULES.items() if p.is_relative_to(ROOT / "npuflow")]
    offenders = [m for m in library if any(i == "prefect" or i.startswith("prefect.") for i in _imports(MODULES[m]))]
    assert not offenders, f"library modules importing prefect (only tasks/ and flows/ may): {offenders}"


def test_functions_are_short_or_say_why() -> None:
    long = []
    for m, p in MODULES.items():
        if not p.is_relative_to(ROOT / "npuflow"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > MAX_FUNCTION_LINES and "Long:" not in doc:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without a 'Long:' reason: {long}"


def test_the_package_list_installs_every_folder_under_npuflow() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert listed == on_disk, f"pyproject [tool.setuptools] packages differs: missing {on_disk - listed}, extra {listed - on_disk}"
    assert not any(n.split(".")[0] != "npuflow" for n in listed), "a package would install outside npuflow"
    assert cfg["package-dir"] == {"npuflow.tasks": "tasks", "npuflow.flows": "flows"}


def test_the_console_script_is_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["npuflow"].partition(":")
    assert module in MODULES and func in {n.name for n in ast.parse(MODULES[module].read_text()).body
                                          if isinstance(n, ast.FunctionDef)}
