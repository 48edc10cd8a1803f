"""The import rule of docs/architecture.md, read from the sources (only the contract is imported).

- Backends (``kernels/`` installed as ``fastcl.kernels``, ``fastcl.torch_backend``, ``fastcl.cuda_backend``)
  import only the standard library, torch, triton, the contract module ``fastcl.contract`` and their own
  package (the CUDA backend also its compiled extension ``fastcl._C``): never a layer above them.
- No import cycle anywhere in fastcl, counting every import statement (module level or inside a function)
  and the imports made through ``importlib.import_module``: of a string literal, or of a name built at run
  time, which may then be any module whose dotted name (or name below the file's package) stands in the
  file's module-level tables or loop literals (``dispatch._MODULES``, ``fastcl.SUBMODULES``,
  ``fastcl.kernels._EXPORTS``).

Known violations are listed by name below, each asserted to still exist: when a change removes one, this
test fails until its entry is deleted, so the list can only shrink.
"""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest

from fastcl.contract import BlockBackward, BlockForward

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fastcl": ROOT / "fastcl", "fastcl.kernels": ROOT / "kernels"}  # pyproject's package-dir
CONTRACT = "fastcl.contract"
BACKENDS = ("fastcl.kernels", "fastcl.torch_backend", "fastcl.cuda_backend")
BACKEND_LIBRARIES = {"torch", "triton"}
EXTENSIONS = {"fastcl.cuda_backend": "fastcl._C"}  # compiled modules (csrc/) a backend loads as its own

# (importer, imported): imports that break the rule today, each with the change that removes it.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _sources() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(package, root, path)] = path
    return found


SOURCES = _sources()


def _known(name: str) -> str:
    """The module ``name`` stands for: itself, or the nearest enclosing module we have the source of
    (``from fastcl.contract import Layout`` reads as ``fastcl.contract``); a name outside fastcl as is."""
    if not name.startswith("fastcl") or name in EXTENSIONS.values():
        return name
    while name not in SOURCES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name``'s source may import: statements anywhere in it, and importlib.import_module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    strings = _listed_strings(tree)
    spelled = {s for s in strings if s in SOURCES} | {f"{package}.{s}" for s in strings if f"{package}.{s}" in SOURCES}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from fastcl import dispatch` imports the module fastcl.dispatch
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in SOURCES else base)
        elif isinstance(node, ast.Call) and _calls_import_module(node):
            argument = node.args[0] if node.args else None
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.add(argument.value)
            else:
                found |= spelled
    return {_known(imported) for imported in found} - {name}


def _listed_strings(tree: ast.Module) -> set[str]:
    """The strings a run-time module name can be built from: those of the module-level assignments
    (tables such as ``_MODULES``, ``SUBMODULES``) and of the literals a ``for`` loop walks."""
    places = [node.value for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value]
    places += [node.iter for node in ast.walk(tree) if isinstance(node, ast.For)]
    return {
        node.value
        for place in places
        for node in ast.walk(place)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def _calls_import_module(node: ast.Call) -> bool:
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


GRAPH = {name: _imports(name, path) for name, path in SOURCES.items()}


def _backend(name: str) -> str | None:
    return next((b for b in BACKENDS if name == b or name.startswith(b + ".")), None)


def _allowed(backend: str, imported: str) -> bool:
    top = imported.partition(".")[0]
    return (
        top in sys.stdlib_module_names
        or top in BACKEND_LIBRARIES
        or imported == CONTRACT
        or imported == backend
        or imported.startswith(backend + ".")
        or imported == EXTENSIONS.get(backend)
    )


def _violations() -> set[tuple[str, str]]:
    return {
        (name, imported)
        for name, imports in GRAPH.items()
        if (backend := _backend(name)) is not None
        for imported in imports
        if not _allowed(backend, imported)
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in graph:
                continue
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_static_and_importlib_imports():
    """The walk itself: a plain import, a relative one, and both importlib forms are edges."""
    assert CONTRACT in GRAPH["fastcl.kernels.block"]
    assert "fastcl.kernels._common" in GRAPH["fastcl.kernels.block"]
    assert {"fastcl.torch_backend", "fastcl.kernels", "fastcl.cuda_backend"} <= GRAPH["fastcl.dispatch"]
    assert "fastcl.kernels.block" in GRAPH["fastcl.kernels"]  # f"{__name__}.{module}" over _EXPORTS
    assert GRAPH[CONTRACT] <= {"torch"} | set(sys.stdlib_module_names)


def test_backends_import_only_torch_triton_the_contract_and_their_own_package():
    violations = _violations()
    unknown = sorted(violations - KNOWN_VIOLATIONS.keys())
    assert not unknown, f"backend modules import layers above them (docs/architecture.md): {unknown}"
    gone = sorted(KNOWN_VIOLATIONS.keys() - violations)
    assert not gone, f"fixed, so delete these entries of KNOWN_VIOLATIONS: {gone}"


def test_no_import_cycles():
    known = KNOWN_VIOLATIONS.keys()
    graph = {name: imports - {b for a, b in known if a == name} for name, imports in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_self_check_sits_above_dispatch_and_the_registry():
    """dispatch asks "auto"'s choice of the layer that runs the self-check (it runs losses from the registry)."""
    assert "fastcl.selfcheck" not in GRAPH["fastcl.dispatch"]
    assert {"fastcl.dispatch", "fastcl.registry"} <= GRAPH["fastcl.selfcheck"]


def _parameters(path: Path, function: str) -> list[str]:
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_exposes_the_primitive_with_the_contract_signature(backend):
    """block_forward / block_backward in each backend's package, named and ordered as the contract's Protocols."""
    contract = {
        "block_forward": list(inspect.signature(BlockForward.__call__).parameters)[1:],
        "block_backward": list(inspect.signature(BlockBackward.__call__).parameters)[1:],
    }
    primitive = SOURCES[f"{backend}.block"]
    package = ast.parse(SOURCES[backend].read_text())
    exported = {alias.name for node in ast.walk(package) if isinstance(node, ast.ImportFrom) for alias in node.names}
    exported |= _listed_strings(package)  # a lazy package (fastcl.kernels) names its exports in a table
    for function, parameters in contract.items():
        assert function in exported, f"{backend} does not expose {function}"
        assert _parameters(primitive, function) == parameters, (backend, function)
