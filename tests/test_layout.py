"""The package layout is the architecture: phase 1 (extraction), phase 2 (training) and inference
are sibling packages over a shared base, none imports another, the base imports none of them,
and no import runs in a circle. Read from the import statements of every module."""

import ast
from pathlib import Path

import captioner

PACKAGE_ROOT = Path(captioner.__file__).parent
PHASES = ("captioner.extraction", "captioner.training", "captioner.inference")
TOP = ("captioner.synthetic", "captioner.demo", "captioner.cli", "captioner.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every captioner module `path` imports (`from captioner.x import y` counts as
    captioner.x.y when that is a module, else captioner.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in found if name.split(".")[0] == "captioner"}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_ROOT.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path) & modules for path in paths}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_phase_package_imports_another():
    crossings = [
        f"{module} imports {imported}"
        for module, imported_modules in import_graph().items()
        for imported in imported_modules
        for phase in PHASES
        for other in PHASES
        if phase != other and within(module, phase) and within(imported, other)
    ]
    assert crossings == []


def test_the_shared_base_imports_no_phase_and_nothing_above_it():
    above = PHASES + TOP
    base = [m for m in import_graph() if not any(within(m, p) for p in above)]
    assert "captioner.store" in base and "captioner.models.decode" in base
    graph = import_graph()
    reaching_up = [
        f"{module} imports {imported}"
        for module in base
        for imported in graph[module]
        if any(within(imported, package) for package in above)
    ]
    assert reaching_up == []


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ re-exporting its own modules is not a cycle between modules.
    edges = {
        module: {m for m in imported if not within(module, m)} for module, imported in graph.items()
    }
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(edges[module]):
            if state.get(imported) == "open":
                cycles.append(path[path.index(imported) :] + [imported])
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
