"""The package's shape: no import cycle, sub-packages import one way, no
private Keras API outside `_keras_internals.py`, no backend framework or
`keras.src` imported by library code."""

import ast
import pathlib

import keras
import numpy as np
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "keras_relora"
# Which sub-package may import which (arrows one way). The package root
# and its private modules (`_keras_internals`, `_checks`) are open to all.
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


def _without_init_imports(graph):
    # A sub-package's `__init__` imports its own modules; the package root
    # imports the sub-packages. Neither is a dependency of their code.
    kept = {name for name in graph if name.count(".") >= 2}
    return {name: graph[name] & kept for name in kept}


def test_no_import_cycle():
    cycle = _find_cycle(_without_init_imports(_graph()))
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_subpackages_import_one_way(subpackage):
    graph = _graph()
    for name, deps in graph.items():
        if not name.startswith(f"keras_relora.{subpackage}."):
            continue
        for dep in deps:
            parts = dep.split(".")
            if len(parts) < 2 or parts[1].startswith("_"):
                continue  # The root and its private shared modules.
            assert parts[1] in ALLOWED[subpackage], f"{name} imports {dep}"


def test_no_import_inside_a_function():
    # Imports at module level only (the import graph above is then the
    # whole truth), except of optional or backend packages.
    optional = (
        "torch",
        "jax",
        "tensorflow",
        "h5py",
        "matplotlib",
        "safetensors",
    )
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and (
                id(node) not in top
            ):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    names = [node.module or ""]
                for name in names:
                    assert name.split(".")[0] in optional, (
                        f"{path}:{node.lineno}: import {name} in a function"
                    )


def test_state_module_imports_no_subpackage():
    graph = _graph()
    deps = graph["keras_relora.adapt.state"]
    assert deps <= {"keras_relora._keras_internals"}, deps


def _keras_private_names():
    """The `_`-names (not dunders) of Keras objects the package handles:
    attributes and methods of built layers, models, variables, optimizers,
    and callbacks, from instances (so that attributes set in
    `__init__` count too)."""
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    einsum = keras.layers.EinsumDense("ab,bc->ac", output_shape=2)
    einsum.build((None, 3))
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    objects = [
        dense,
        einsum,
        model,
        model.optimizer,
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
        keras.Variable(np.zeros(2)),
        keras.callbacks.Callback(),
    ]
    names = set()
    for obj in objects:
        names.update(dir(obj))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


_SETTERS = ("setattr", "set_untracked")
_ACCESSORS = ("getattr", "hasattr", "setattr", "delattr", "set_untracked")


def _string_argument(node, functions):
    """The constant str second argument of a call of one of `functions`."""
    if not isinstance(node, ast.Call) or len(node.args) < 2:
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else None
    name = func.id if isinstance(func, ast.Name) else name
    argument = node.args[1]
    if name in functions and isinstance(argument, ast.Constant):
        return argument.value if isinstance(argument.value, str) else None
    return None


def _own_names(trees):
    """`_`-names the package gives its own objects: `x._name = ...`,
    `set_untracked(x, "_name", ...)`, methods and class attributes."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(
                node.ctx, ast.Store
            ):
                names.add(node.attr)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.Assign)):
                        targets = getattr(item, "targets", [])
                        names.update(t.id for t in targets if hasattr(t, "id"))
                        names.add(getattr(item, "name", None))
            name = _string_argument(node, _SETTERS)
            if name is not None:
                names.add(name)
    return names


def _private_uses(tree, private):
    """`(line, what)` for each use of a name of `private` in `tree`, and of
    `object.__setattr__` and `x.__class__ = ...`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in private:
                found.append((node.lineno, f".{node.attr}"))
            if node.attr == "__class__" and isinstance(node.ctx, ast.Store):
                found.append((node.lineno, "__class__ ="))
            if (
                node.attr == "__setattr__"
                and isinstance(node.value, ast.Name)
                and node.value.id == "object"
            ):
                found.append((node.lineno, "object.__setattr__"))
        name = _string_argument(node, _ACCESSORS)
        if name in private:
            found.append((node.lineno, repr(name)))
    return found


def test_private_keras_api_lives_in_one_module():
    paths = sorted(PACKAGE.rglob("*.py"))
    trees = {path: ast.parse(path.read_text()) for path in paths}
    private = _keras_private_names() - _own_names(trees.values())
    # The names this guard exists for are seen as Keras's.
    assert {"_tracker", "_untrack_variable", "_flatten_layers"} <= private
    assert {"_trainable_variables", "_value"} <= private
    for path, tree in trees.items():
        if path.name == "_keras_internals.py":
            continue
        uses = _private_uses(tree, private)
        assert not uses, f"{path}: private Keras API at {uses}"


def test_private_api_guard_sees_each_kind_of_use():
    private = {"_tracker", "_value"}
    source = (
        "layer._tracker.unlock()\n"
        "v = getattr(variable, '_value', None)\n"
        "object.__setattr__(model, 'fit', f)\n"
        "model.__class__ = Other\n"
        "self._mine = 1\n"
        "x = self._mine\n"
    )
    uses = sorted(_private_uses(ast.parse(source), private))
    assert uses == [
        (1, "._tracker"),
        (2, "'_value'"),
        (3, "object.__setattr__"),
        (4, "__class__ ="),
    ]
    assert "_mine" in _own_names([ast.parse(source)])


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


def test_make_test_runs_every_test_file():
    """`scripts/run_tests.sh` runs the suite in parts by folder: a test file
    outside those folders would never run."""
    import re

    root = PACKAGE.parent
    script = (root / "scripts" / "run_tests.sh").read_text()
    folders = set(re.findall(r"\b(tests/[a-z_]+)\b", script))
    assert folders == {
        "tests/unit",
        "tests/integration",
        "tests/benchmarks",
        "tests/examples",
    }
    tests = {p.relative_to(root) for p in (root / "tests").rglob("test_*.py")}
    outside = [p for p in tests if f"tests/{p.parts[1]}" not in folders]
    assert not outside, outside
