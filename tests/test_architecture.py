"""The three wings stay apart: the engine loads no Lightning, no module reaches into another's privates,
nothing imports the paper, and every public name of the engine and the face has
an example that runs."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_hessian

PACKAGE = Path(lightning_hessian.__file__).parent
CALLBACK = "lightning_hessian.callback"


def _modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages([str(PACKAGE)], prefix="lightning_hessian.")]


def _imports(module: str) -> list[tuple[str, str]]:
    """``(imported module, imported name)`` of every ``from ... import ...`` in a module, relative ones resolved."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found += [(node.module or "", alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def test_the_engine_imports_no_lightning_module():
    code = ("import sys, lightning_hessian.engine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
            "'lightning_fabric', 'torchmetrics')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_engine_imports_nothing_of_the_rest_of_the_package():
    for module in _modules():
        if module.startswith("lightning_hessian.engine"):
            outside = [m for m, _ in _imports(module)
                       if m.startswith("lightning_hessian") and not m.startswith("lightning_hessian.engine")]
            assert not outside, (module, outside)


def test_no_module_imports_a_private_name_of_another():
    for module in _modules():
        private = [(m, name) for m, name in _imports(module) if m != "__future__" and name.startswith("_")]
        assert not private, (module, private)


def test_the_benchmarks_import_no_private_name_of_the_package():
    benchmarks = PACKAGE.parent / "benchmarks"
    for path in sorted(benchmarks.glob("*.py")):
        private = [(node.module, alias.name) for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_hessian")
                   for alias in node.names
                   if alias.name.startswith("_") or any(part.startswith("_") for part in node.module.split("."))]
        assert not private, (path.name, private)


# Private names of other libraries that the package must use: Lightning's batch transfer path (what the
# training loop runs), a tensor's version counter, torch's normalization and dropout base classes, and the
# override point of a peer library's operator (benchmarks).
_FOREIGN_PRIVATE = {"_on_before_batch_transfer", "_version", "_NormBase", "_DropoutNd", "_BatchNorm", "_matmat",
                    "_BaseDataLoaderIter", "_indices", "_values"}


def test_no_code_reaches_into_a_private_attribute_of_another_object():
    """``x._name`` only on ``self`` and ``cls``: a private attribute is its class's own business."""
    paths = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "benchmarks").glob("*.py"))
    reached = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr not in _FOREIGN_PRIVATE:
                reached.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    assert not reached, reached


def test_nothing_imports_the_paper_wing():
    for module in _modules():
        if module.startswith("lightning_hessian.paper"):
            continue
        paper = [m for m, _ in _imports(module) if m.startswith("lightning_hessian.paper")]
        assert not paper, (module, paper)


def _public_api() -> list[tuple[str, object]]:
    """Every public class and function defined in the engine and the face (not the paper)."""
    callback = importlib.import_module(CALLBACK)
    found = []
    for module_name in _modules():
        if module_name.startswith("lightning_hessian.paper"):
            continue
        if any(part.startswith("_") for part in module_name.split(".")):
            continue
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if name.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            if module_name.startswith(f"{CALLBACK}.") and name not in callback.__all__:
                continue  # the callback's rooms serve it alone; its package exports what others may use
            if getattr(value, "__module__", None) == module_name:
                found.append((f"{module_name}.{name}", value))
    return found


@pytest.mark.parametrize(("name", "value"), _public_api(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_class_and_function_has_an_example(name, value):
    finder = doctest.DocTestFinder(recurse=inspect.isclass(value))
    examples = [test for test in finder.find(value, name) if test.examples]
    assert examples, f"{name} has no docstring example"
