"""The code's one-way rules, checked from the source (no imports run):

1. the imports between the project's modules form no circle: every import counts, function-local
   and ``if TYPE_CHECKING:`` ones included;
2. no private name (``_x``, not ``__dunder__``) crosses a file: neither ``from m import _x`` nor
   ``m._x`` on an imported module, nor ``obj._x`` (``obj`` not ``self``/``cls``) where ``_x`` is
   defined in another project file and not in this one (a method or attribute of a foreign class);
3. no file is over ``MAX_LINES`` lines.

    python scripts/check_imports.py            # prints each violation, exits 1 if there is one
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exitrank", "ranker_svc", "retriever_svc", "trainer", "bench")
GENERATED = ("exitrank/v1/",)
MAX_LINES = 500


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every project source file (generated stubs excluded)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(GENERATED):
                continue
            name = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            found[name] = path
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int, str | None]]:
    """(imported project module, line, private name imported or None) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    aliases[alias.asname or alias.name] = alias.name
                    yield alias.name, node.lineno, None
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from package import module`
                    aliases[alias.asname or alias.name] = sub
                    yield sub, node.lineno, None
                elif target in known:
                    yield target, node.lineno, alias.name if _private(alias.name) else None
    for node in ast.walk(tree):  # module._private on an imported project module
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            if node.value.id in aliases:
                yield aliases[node.value.id], node.lineno, node.attr


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def private_definitions(tree: ast.AST) -> set[str]:
    """Private names a file defines: functions, classes, methods, and attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _private(n)}


def foreign_private_attributes(trees: dict[str, ast.AST]) -> Iterator[tuple[str, int, str]]:
    """(module, line, name) of each ``obj._x`` whose ``_x`` only other project files define."""
    defined = {name: private_definitions(tree) for name, tree in trees.items()}
    everywhere = set().union(*defined.values()) if defined else set()
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            if node.attr in everywhere and node.attr not in defined[name]:
                yield name, node.lineno, node.attr


def violations(root: Path = ROOT) -> list[str]:
    known = modules(root)
    trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in known.items()}
    graph: dict[str, set[str]] = {name: set() for name in known}
    problems = []
    for name, path in known.items():
        rel = path.relative_to(root)
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{rel}: {lines} lines (at most {MAX_LINES})")
        for target, line, private in imports_of(name, path, known):
            if target == name:
                continue
            graph[name].add(target)
            if private is not None:
                problems.append(f"{rel}:{line}: private name {private} of {target}")
    for name, line, attr in foreign_private_attributes(trees):
        problems.append(f"{known[name].relative_to(root)}:{line}: private attribute {attr} of another file's object")
    for component in cycles(graph):
        problems.append("import circle: " + " <-> ".join(component))
    return problems


def main() -> int:
    problems = violations()
    for problem in problems:
        print(problem)
    print(f"{len(problems)} violation(s)" if problems else "imports: one-way, no private names crossing files")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
