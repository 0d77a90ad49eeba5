"""The package's layers, checked from the source: no import cycle, and no import that runs back up.

Layers, lowest first (a module may import its own layer and the ones below):
leaves (errors, io, signals, progress, warnings_filter, metric_names, uncertainty) < config < models < data < training
< evaluation < study (storage, plan, record) < results < sweep < entry modules (__main__, cli and the ``python -m sdsweep.<command>`` modules).
Imports inside functions count too (they still run); imports under ``if TYPE_CHECKING:`` do not. A module
started by name in another process counts as an import too: ``[sys.executable, "-m", "sdsweep.x.y"]``, or the
name passed straight to a process-starting call (``subprocess.Popen("sdsweep.x.y", ...)``,
``set_forkserver_preload(["sdsweep.x.y"])``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdsweep"
LAYERS = [
    "leaves",
    "config",
    "models",
    "data",
    "training",
    "evaluation",
    "study",
    "results",
    "sweep",
    "entry",
]
ENTRY_MODULES = {"__main__", "cli", "report", "export", "generate", "rate", "app", "confirm", "submit"}
MAX_LINES = 420  # issue #16: "no module over about 400 lines"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself
        return 0
    if len(parts) == 2:  # a top-level module: a leaf or an entry point
        return LAYERS.index("entry") if parts[1] in ENTRY_MODULES else 0
    return LAYERS.index(parts[1])


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


# Calls that start a process (or a fork server) running a module given by name.
LAUNCHERS = {"Popen", "run", "call", "check_call", "check_output", "set_forkserver_preload", "run_module"}


def _strings(node: ast.AST) -> list[str]:
    """A constant string, or the constant strings of a list or tuple."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def launched_modules(node: ast.AST) -> list[str]:
    """Module names this node starts in another process: the word after ``"-m"`` in a list or tuple, or a
    constant (or constants in a list) passed to a launcher call."""
    names: list[str] = []
    if isinstance(node, (ast.List, ast.Tuple)):
        for first, second in zip(node.elts, node.elts[1:]):
            if _strings(first) == ["-m"]:
                names += _strings(second)
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in LAUNCHERS:
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                names += _strings(arg)
    return [n for n in names if n.startswith("sdsweep.")]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The sdsweep modules that ``path`` imports (``from sdsweep.x import y`` counts y when y is a module),
    or starts by name in another process (``launched_modules``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                continue
            found.update(launched_modules(child))
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names if alias.name.startswith("sdsweep"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("sdsweep"):
                for alias in child.names:
                    submodule = f"{child.module}.{alias.name}"
                    found.add(submodule if submodule in modules else child.module)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def test_no_import_runs_back_up_a_layer():
    graph = import_graph()
    upward = sorted(
        f"{module} ({LAYERS[layer_of(module)]}) imports {target} ({LAYERS[layer_of(target)]})"
        for module, targets in graph.items()
        for target in targets
        if target != "sdsweep" and layer_of(target) > layer_of(module)
    )
    assert len(graph) > 40  # the walk saw the package
    assert upward == []


def test_no_import_cycle():
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def walk(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if target == "sdsweep" or target.startswith("sdsweep") and module.startswith(target + "."):
                continue  # a package's __init__ is not a dependency edge worth a cycle
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                walk(target, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    assert cycles == []


def test_no_module_is_over_about_400_lines():
    long = sorted(
        f"{module_name(p)}: {n} lines"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    )
    assert long == []


def test_a_module_started_by_name_counts_as_an_import():
    """``python -m sdsweep.x.y`` from a subprocess call is a dependency the layer rules see."""
    source = (
        "import subprocess, sys\n"
        "def start(spec):\n"
        "    subprocess.Popen([sys.executable, '-m', 'sdsweep.sweep.worker', spec])\n"
        "    subprocess.run('sdsweep.results.report')\n"
    )
    tree = ast.parse(source)
    found = {name for node in ast.walk(tree) for name in launched_modules(node)}
    assert found == {"sdsweep.sweep.worker", "sdsweep.results.report"}
