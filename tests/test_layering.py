"""The import structure of delt and delt_ext, read with ``ast`` (nothing is imported).

``delt`` declares its floors in ``python/delt/__init__.py`` (``LAYERS``, lowest first). A module
may import modules of lower floors and ones listed before it on its own floor, at module level
or inside a function alike; the import graph has no cycle; ``delt_ext`` never imports ``delt``;
no module (benchmarks included) imports another module's private (``_name``) names.

``DELT_LAYERING_ROOT=/path/to/checkout pytest tests/test_layering.py`` checks another checkout;
one that declares no ``LAYERS`` is held to this checkout's.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("DELT_LAYERING_ROOT", HERE)).resolve()
PACKAGES = {"delt": ROOT / "python" / "delt", "delt_ext": ROOT / "delt_ext"}
EXEMPT = {"__init__", "__main__"}  # the package's docstring and `python -m delt`


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. "delt.recover"
    target: str  # the module imported from, e.g. "delt.synthesis"
    names: tuple[str, ...]  # the names taken from it (from-imports), else ()
    line: int


def _module_name(package: str, path: Path) -> str:
    parts = path.relative_to(PACKAGES[package]).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def _package_folder(target: str) -> Path | None:
    """The folder of a (sub)package of ours, e.g. ``delt.methods``; None for a module."""
    root, *rest = target.split(".")
    if root not in PACKAGES:
        return None
    folder = PACKAGES[root].joinpath(*rest)
    return folder if (folder / "__init__.py").is_file() else None


def _is_submodule(target: str, name: str) -> bool:
    package = _package_folder(target)
    if package is None:
        return False
    return (
        (package / f"{name}.py").is_file()
        or (package / name / "__init__.py").is_file()
        or name == "_C"  # _C: the compiled library
    )


def _imports(path: Path, module: str) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            plain = [a.name for a in node.names if not _is_submodule(node.module, a.name)]
            if plain:
                found.append(Import(module, node.module, tuple(plain), node.lineno))
            for alias in node.names:
                if _is_submodule(node.module, alias.name):
                    found.append(Import(module, f"{node.module}.{alias.name}", (), node.lineno))
    return found


def _sources() -> dict[str, Path]:
    return {
        _module_name(package, path): path
        for package, folder in PACKAGES.items()
        for path in sorted(folder.rglob("*.py"))
    }


def _all_imports() -> list[Import]:
    return [imp for module, path in _sources().items() for imp in _imports(path, module)]


def _ours(target: str) -> bool:
    return target.split(".")[0] in PACKAGES


def _declared_layers() -> tuple[tuple[str, ...], ...]:
    for init in (PACKAGES["delt"] / "__init__.py", HERE / "python" / "delt" / "__init__.py"):
        tree = ast.parse(init.read_text())
        for node in tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == "LAYERS":
                return ast.literal_eval(node.value)
    raise AssertionError("python/delt/__init__.py declares no LAYERS")


def _rank() -> dict[str, tuple[int, int]]:
    return {
        f"delt.{name}": (floor, position)
        for floor, names in enumerate(_declared_layers())
        for position, name in enumerate(names)
    }


def test_the_package_declares_its_layers():
    tree = ast.parse((PACKAGES["delt"] / "__init__.py").read_text())
    names = {
        node.target.id if isinstance(node, ast.AnnAssign) else node.targets[0].id
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
    }
    assert "LAYERS" in names, f"{PACKAGES['delt'] / '__init__.py'} declares no LAYERS"
    docstring = ast.get_docstring(tree) or ""
    missing = [name for floor in _declared_layers() for name in floor if name not in docstring]
    assert not missing, f"the package docstring's map leaves out {missing}"


def _local(module: str) -> str:
    """``delt.methods.pdd`` -> ``methods.pdd``."""
    return module.split(".", 1)[1] if "." in module else "__init__"


def test_every_module_is_in_the_declared_order():
    declared = [name for floor in _declared_layers() for name in floor]
    present = sorted(
        _local(module)
        for module in _sources()
        if module.startswith("delt.") and _local(module) not in EXEMPT
    )
    assert sorted(set(declared)) == sorted(declared), "a module is declared twice"
    assert present == sorted(declared), (
        f"undeclared: {sorted(set(present) - set(declared))}; "
        f"declared but absent: {sorted(set(declared) - set(present))}"
    )


def test_no_module_imports_one_to_its_right():
    rank = _rank()
    wrong = []
    for imp in _all_imports():
        if not imp.importer.startswith("delt.") or _local(imp.importer) in EXEMPT:
            continue
        target = imp.target
        if target == "delt":
            wrong.append(f"{imp.importer}:{imp.line} imports the delt package itself")
        elif target.startswith("delt.") and target in rank and imp.importer in rank:
            if rank[target] >= rank[imp.importer]:
                wrong.append(f"{imp.importer}:{imp.line} imports {target}")
    assert not wrong, "imports against the declared order:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {module: set() for module in _sources()}
    for imp in _all_imports():
        if imp.target in graph and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_delt_ext_never_imports_delt():
    wrong = [
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for imp in _all_imports()
        if imp.importer.split(".")[0] == "delt_ext" and imp.target.split(".")[0] == "delt"
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("scope", ["packages", "benchmarks"])
def test_no_module_imports_another_modules_private_names(scope):
    if scope == "packages":
        imports = _all_imports()
    else:
        imports = [
            imp
            for path in sorted((ROOT / "benchmarks").rglob("*.py"))
            for imp in _imports(path, str(path.relative_to(ROOT)))
        ]
    wrong = [
        f"{imp.importer}:{imp.line} imports {imp.target}.{name}"
        for imp in imports
        if _ours(imp.target) and imp.target != imp.importer
        for name in imp.names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)


# --------------------------------------------------------------------------------------------
# Methods are data: no config typed Any, no code outside a method's module that branches on its
# name.


def _method_names() -> set[str]:
    """The names the methods of ``delt.methods`` register (``name = "..."`` of a Method class,
    a module constant such as ``NAME = "pdd"``, ``PixelMethod("sre2l", ...)``)."""
    names = set()
    for path in sorted((PACKAGES["delt"] / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if any(t == "name" or t.isupper() for t in targets) and isinstance(
                    node.value.value, str
                ):
                    names.add(node.value.value)
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "PixelMethod"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value)
    return names


def test_the_registered_method_names_are_found():
    assert {"sre2l", "cda", "delt", "pdd", "rded", "random-real"} <= _method_names()


def _outside_the_methods() -> dict[str, Path]:
    return {
        module: path
        for module, path in _sources().items()
        if module.startswith("delt.")
        and not module.startswith("delt.methods")
        and module not in ("delt.method",)
    }


def test_no_comparison_with_a_method_name_outside_the_methods():
    names = _method_names()
    constants = {"NAME", "PROGRESSIVE", "RDED", "RANDOM_REAL"}

    def named(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(named(item) for item in node.elts)
        if isinstance(node, ast.Starred):
            return named(node.value)
        return isinstance(node, ast.Name) and node.id in constants

    wrong = [
        f"{module}:{node.lineno}: {ast.unparse(node)}"
        for module, path in _outside_the_methods().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Compare) and any(named(n) for n in [node.left, *node.comparators])
    ]
    assert not wrong, "method names compared outside delt.methods:\n" + "\n".join(wrong)


def test_no_config_parameter_is_typed_any():
    wrong = []
    for module, path in _sources().items():
        if not module.startswith("delt"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            arguments = node.args
            for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
                annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                if "config" in arg.arg and annotation in ("Any", "typing.Any"):
                    wrong.append(f"{module}:{node.lineno} {node.name}({arg.arg}: Any)")
    assert not wrong, "config parameters typed Any:\n" + "\n".join(wrong)
