"""The package's shape: no import cycle, rooms import one way, no backend
framework or `keras.src` imported by library code."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_relora"
# Which room may import which (arrows one way); "" is the package root.
ALLOWED = {
    "layers": {"layers"},
    "adapt": {"adapt", "layers"},
    "reducer": {"reducer", "adapt", "layers"},
    "saving": {"saving", "reducer", "adapt", "layers"},
}


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path, modules):
    """Package modules that `path` imports, at any depth of its code.

    `from a.b import c` counts as an import of `a.b.c` where that is a
    module, else of `a.b`.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _graph():
    modules = _modules()
    return {
        name: _imports(path, modules) - {name} for name, path in modules.items()
    }


def _find_cycle(graph):
    """A list of modules forming a cycle, or None (depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack = []

    def visit(node):
        colour[node] = GREY
        stack.append(node)
        for child in sorted(graph[node]):
            if colour[child] == GREY:
                return stack[stack.index(child) :] + [child]
            if colour[child] == WHITE:
                cycle = visit(child)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _package_imports_its_rooms(graph):
    # A room's `__init__` imports its own modules; the package root
    # imports the rooms. Neither is a dependency of the rooms' code.
    kept = {name for name in graph if name.count(".") >= 2}
    return {name: graph[name] & kept for name in kept}


def test_no_import_cycle():
    cycle = _find_cycle(_package_imports_its_rooms(_graph()))
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_one_way(room):
    graph = _graph()
    for name, deps in graph.items():
        if not name.startswith(f"keras_relora.{room}."):
            continue
        for dep in deps:
            parts = dep.split(".")
            if len(parts) < 2 or parts[1].startswith("_"):
                continue  # The root and its private shared modules.
            assert parts[1] in ALLOWED[room], f"{name} imports {dep}"


def test_state_module_imports_no_room():
    graph = _graph()
    deps = graph["keras_relora.adapt.state"]
    assert deps <= {"keras_relora._keras_internals"}, deps


def test_private_keras_api_lives_in_one_module():
    private = (
        "._tracker",
        "._track_variables",
        "._flatten_layers",
        "._deferred_initialize",
        "._value",
        "object.__setattr__",
        "__class__ =",
    )
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_keras_internals.py":
            continue
        text = path.read_text()
        for needle in private:
            assert needle not in text, f"{needle!r} in {path}"


def test_no_backend_framework_or_keras_src_at_module_level():
    banned = ("torch", "jax", "tensorflow", "transformers", "peft")
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # Module level only.
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root not in banned, f"{path}: import {name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("keras.src"), path
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("keras.src"), path


def test_no_module_over_the_size_limit():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 450, f"{path} has {lines} lines: split it"


def test_wheel_packages_are_the_library_only():
    import setuptools
    import tomllib

    root = PACKAGE.parent
    with open(root / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    found = setuptools.find_packages(str(root), include=include)
    assert "keras_relora" in found
    assert all(p.split(".")[0] == "keras_relora" for p in found), found
    assert "relora_offline" in setuptools.find_packages(str(root))
