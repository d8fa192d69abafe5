"""The package's shape: no import cycles between its modules (lazy imports inside functions included, since a
cycle hidden in a function is still two modules that cannot be understood apart)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastp2phd"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_submodule(package: Path, name: str) -> bool:
    """A Python file, a folder or a compiled extension (``_C``) of ``package``."""
    return (package / f"{name}.py").is_file() or (package / name).is_dir() or any(package.glob(f"{name}.*.so"))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                folder = modules.get(base, Path()).parent if base in modules else None
                if folder is not None and _is_submodule(folder, alias.name):
                    found.add(f"{base}.{alias.name}")
                else:
                    found.add(base)
    return {module for module in found if module in modules and module != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["fastp2phd.options"] and graph["fastp2phd.training"]  # the walk sees imports at all
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_command_line_modules_import_argparse():
    """Below the CLI the library takes specs and plain values, never an argparse Namespace."""
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "argparse" for name in names):
                importers.add(path.relative_to(PACKAGE).as_posix())
    assert importers == {"cli.py", "options.py", "original_flags.py"}


MAX_MODULE_LINES = 450  # The networks' own definitions (models/) are exempt by design: a network reads best whole.


def test_no_module_does_three_jobs():
    """A module over MAX_MODULE_LINES lines is split by job into sibling modules (issue 22 item 6)."""
    lengths = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
               for path in PACKAGE.rglob("*.py") if path.relative_to(PACKAGE).parts[0] != "models"}
    assert len(lengths) > 50 and "features.py" in lengths  # the walk sees the package
    too_long = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert too_long == {}
