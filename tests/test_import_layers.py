"""The import contract of the package, read from the source with ``ast`` (no module is imported).

Arrows point one way (docs: the layout table of README.md):

    layer 0  functional/ (pure math, seeds), validation.py, reference.py
    layer 1  policies/, rewards/, metrics/       each: layer 0 and itself only
    layer 2  data/, evaluation/, callbacks.py, figures.py, loggers.py, strategies.py, modules/
                                                  layers 0-1 and each other
    layer 3  cli.py, __main__.py                 everything but digits/
    digits/  the digits miniature                 everything but cli.py / __main__.py;
                                                  nothing outside digits/ imports it

Every import counts: module-level and inside functions, ``import x`` and ``from x import y``,
relative ones resolved, and ``importlib.import_module`` of a literal name (or of the names of the
CLI's ``CLASS_MODULES``). And no import cycle among the package's modules, hidden behind a
function-level import or not.
"""

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "lightning_sdrl"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYER_0 = {"package", "functional", "validation", "reference", "frozen"}
LAYER_1 = {"policies", "rewards", "metrics"}
LAYER_2 = {"data", "evaluation", "callbacks", "figures", "loggers", "modules", "strategies", "reward_server"}
LAYER_3 = {"cli", "__main__"}

ALLOWED = {
    # layer 0: the package's __init__ (its version), pure math, argument checks, reference sets
    "package": set(),
    "functional": {"package", "functional"},
    "validation": {"package", "validation"},
    "reference": {"package", "functional", "validation", "reference"},
    "frozen": {"package", "frozen"},
    # layer 1: each of them over layer 0 only (a reward knows no policy and no DataModule)
    "policies": LAYER_0 | {"policies"},
    "rewards": LAYER_0 | {"rewards"},
    "metrics": LAYER_0 | {"metrics"},
    # layer 2: over layers 0 and 1, and each other
    **{group: LAYER_0 | LAYER_1 | LAYER_2 for group in LAYER_2},
    # layer 3: the command line, over everything but the digits miniature (configs name its classes)
    **{group: LAYER_0 | LAYER_1 | LAYER_2 | LAYER_3 for group in LAYER_3},
    # the digits miniature: over everything but the command line
    "digits": LAYER_0 | LAYER_1 | LAYER_2 | {"digits"},
}
"""Which groups a module of each group may import (see the module docstring)."""


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` at ``line`` (``in_function``: inside a function body)."""

    importer: str
    imported: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "function-level" if self.in_function else "module-level"
        return (
            f"{self.importer} ({group(self.importer)}) -> {self.imported} ({group(self.imported)}), "
            f"line {self.line}, {where}"
        )


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def group(module: str) -> str:
    """``lightning_sdrl.rewards.base`` -> ``rewards``; ``lightning_sdrl`` -> ``package``."""
    parts = module.split(".")
    return "package" if len(parts) == 1 else parts[1]


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _literal_strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def imports_of(source: str, importer: str, is_package: bool, modules: set[str]) -> list[Edge]:
    """The imports of package modules by ``source`` (the module ``importer``), at any depth."""
    tree = ast.parse(source)
    class_modules: list[str] = []
    for node in tree.body:  # the CLI imports the names of this tuple with importlib
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CLASS_MODULES" for t in node.targets):
            class_modules = _literal_strings(node.value)
    edges: list[Edge] = []

    def add(name: str, node: ast.AST, in_function: bool) -> None:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            edges.append(Edge(importer, name, node.lineno, in_function))

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, in_function)
        elif isinstance(node, ast.ImportFrom):
            source_module = _resolve(node, importer, is_package)
            for alias in node.names:
                submodule = f"{source_module}.{alias.name}"
                add(submodule if submodule in modules else source_module, node, in_function)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == (
            "import_module"
        ):
            names = _literal_strings(node.args[0]) if node.args else []
            for name in names or class_modules:
                add(name, node, in_function)
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return edges


def package_graph() -> tuple[set[str], list[Edge]]:
    files = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p) for p in files}
    edges = [
        edge
        for path in files
        for edge in imports_of(path.read_text(), module_name(path), path.name == "__init__.py", modules)
        if edge.imported != edge.importer
    ]
    return modules, list(dict.fromkeys(edges))  # one edge per line, however many names it imports


def cycles(modules: set[str], edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    successors: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        if edge.imported in modules:
            successors[edge.importer].add(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for successor in sorted(successors[module]):
            if successor not in index:
                connect(successor)
                low[module] = min(low[module], low[successor])
            elif successor in on_stack:
                low[module] = min(low[module], index[successor])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            connect(module)
    return components


def test_the_walker_sees_every_kind_of_import():
    source = (
        "import lightning_sdrl.functional.ddim\n"
        "from lightning_sdrl.policies import base\n"
        "from lightning_sdrl.policies import DiffusionPolicy\n"
        "from . import attribute\n"
        "from ..data.sampling import PromptBatch\n"
        "import torch\n"
        "def f():\n"
        "    from lightning_sdrl.digits.policy import DigitsPolicy\n"
        "    importlib.import_module('lightning_sdrl.modules.ddpo')\n"
    )
    modules = {"lightning_sdrl.policies.base", "lightning_sdrl.rewards.attribute"}
    edges = imports_of(source, "lightning_sdrl.rewards.simple", False, modules)
    assert [(e.imported, e.line, e.in_function) for e in edges] == [
        ("lightning_sdrl.functional.ddim", 1, False),
        ("lightning_sdrl.policies.base", 2, False),
        ("lightning_sdrl.policies", 3, False),
        ("lightning_sdrl.rewards.attribute", 4, False),
        ("lightning_sdrl.data.sampling", 5, False),
        ("lightning_sdrl.digits.policy", 8, True),
        ("lightning_sdrl.modules.ddpo", 9, True),
    ]
    init = imports_of("from .base import Reward\n", "lightning_sdrl.rewards", True, modules)
    assert [e.imported for e in init] == ["lightning_sdrl.rewards.base"]
    cli = imports_of(
        "CLASS_MODULES = ('lightning_sdrl.digits.policy',)\nfor n in CLASS_MODULES:\n    importlib.import_module(n)\n",
        "lightning_sdrl.cli",
        False,
        modules,
    )
    assert [e.imported for e in cli] == ["lightning_sdrl.digits.policy"]


def test_the_cycle_finder_finds_a_cycle_behind_a_function_level_import():
    edges = [Edge("a", "b", 1, False), Edge("b", "c", 1, False), Edge("c", "a", 9, True), Edge("c", "d", 2, False)]
    assert cycles({"a", "b", "c", "d"}, edges) == [["a", "b", "c"]]
    assert cycles({"a", "b", "c", "d"}, edges[:2] + edges[3:]) == []


def test_every_module_has_a_layer():
    modules, _ = package_graph()
    unknown = sorted(m for m in modules if group(m) not in ALLOWED)
    assert not unknown, f"modules in no layer (add their group to ALLOWED in {__file__}): {unknown}"


def test_nothing_outside_digits_imports_digits():
    _, edges = package_graph()
    wrong = [str(e) for e in edges if group(e.imported) == "digits" and group(e.importer) != "digits"]
    assert not wrong, "imports of lightning_sdrl.digits from outside it:\n" + "\n".join(wrong)


def test_imports_follow_the_layers():
    _, edges = package_graph()
    wrong = [str(e) for e in edges if group(e.imported) not in ALLOWED.get(group(e.importer), set())]
    assert not wrong, "imports against the layers (see ALLOWED in tests/test_import_layers.py):\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules, edges = package_graph()
    found = cycles(modules, edges)
    lines = []
    for component in found:
        members = set(component)
        lines.append(" <-> ".join(component))
        lines += [f"    {e}" for e in edges if e.importer in members and e.imported in members]
    assert not found, "import cycles among lightning_sdrl modules:\n" + "\n".join(lines)
