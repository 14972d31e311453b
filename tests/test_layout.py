"""The layout's rules, checked from the source: no import cycles, dependencies point down.

Every ``import`` and ``from ... import`` statement counts, at module level or inside a function
(a lazy import still ties the two modules together), and ``if TYPE_CHECKING:`` imports count too.
The graph is checked at three grains: modules, concepts (``fast.engine``, ``fast.blocks``, ...,
``spec``, ``kernels``, ``conformance``) and top-level packages.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spec", "fast", "kernels", "conformance")

# Which concept may import which (an edge not listed is a layering error). ``fast`` itself is
# the lazy re-export package: nothing inside the project imports it.
ALLOWED: Mapping[str, frozenset[str]] = {
    "spec": frozenset(),
    "kernels": frozenset({"spec"}),
    "fast.blocks": frozenset({"spec"}),
    "fast.model": frozenset({"spec", "kernels"}),
    "fast.tokenizer": frozenset({"spec"}),
    "fast.loader": frozenset({"spec", "fast.model", "fast.tokenizer"}),
    # tensor parallelism: below the engine, which hands it its step machinery (EngineKit)
    "fast.distributed": frozenset({"spec", "kernels", "fast.model", "fast.loader"}),
    "fast.engine": frozenset(
        {
            "spec",
            "kernels",
            "fast.blocks",
            "fast.model",
            "fast.loader",
            "fast.tokenizer",
            "fast.distributed",
        }
    ),
    # fast.distributed: its spawn helper (children that leave Ctrl-C to the parent)
    "fast.api": frozenset(
        {
            "spec",
            "fast.engine",
            "fast.loader",
            "fast.model",
            "fast.tokenizer",
            "kernels",
            "fast.distributed",
        }
    ),
    "fast": frozenset(),
    "conformance": frozenset({"spec", "kernels", "fast.blocks", "fast.engine", "fast.model"}),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for package in PACKAGES
        for p in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def imported_names(path: Path, name: str) -> Iterable[str]:
    """Every module name an import statement in ``path`` may refer to."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's ``__init__`` counts as a module)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target in imported_names(path, name):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def concept(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "fast" else parts[0]


def collapse(graph: Mapping[str, set[str]], key: object) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        ka = key(a)  # type: ignore[operator]
        out.setdefault(ka, set())
        for b in targets:
            kb = key(b)  # type: ignore[operator]
            if ka != kb:
                out[ka].add(kb)
    return out


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules() -> None:
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_concepts() -> None:
    assert cycles(collapse(import_graph(), concept)) == []


def test_no_import_cycle_between_packages() -> None:
    assert cycles(collapse(import_graph(), lambda m: m.split(".")[0])) == []


def test_dependencies_point_down() -> None:
    wrong = sorted(
        f"{a} -> {b}"
        for a, targets in collapse(import_graph(), concept).items()
        for b in targets
        if b not in ALLOWED[a]
    )
    assert wrong == []


def test_every_concept_has_a_rule() -> None:
    assert set(collapse(import_graph(), concept)) <= set(ALLOWED)


def test_spec_imports_only_the_standard_library_and_numpy() -> None:
    allowed = set(sys.stdlib_module_names) | {"numpy", "spec"}
    for name, path in project_modules().items():
        if not name.startswith("spec"):
            continue
        for target in imported_names(path, name):
            top = target.split(".")[0]
            if top:
                assert top in allowed, f"{name} imports {target}"


def test_the_checker_sees_a_cycle() -> None:
    """The cycle finder is not vacuous: a planted two- and three-node cycle are found."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ["fast", "kernels", "spec"])
def test_the_product_does_not_import_its_test_suite(package: str) -> None:
    graph = import_graph()
    offenders = [
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a.split(".")[0] == package
        for b in targets
        if b.split(".")[0] == "conformance"
    ]
    assert offenders == []
