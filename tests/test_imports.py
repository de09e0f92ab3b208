"""The package's import graph has no cycles, lazy imports inside functions included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moe_tutorial"


def imports_of(path: Path) -> set[str]:
    """Modules of the package that `path` imports anywhere in it (top level or inside functions),
    except under `if __name__ == "__main__":`, which is an entry point, not a dependency."""
    package = path.parent.relative_to(PACKAGE.parent).as_posix().replace("/", ".")
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not is_main_guard(node)]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {n for n in names if module_path(n)} or {target}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {n for n in names if n.startswith("moe_tutorial")}
    return {n for n in found if module_path(n)}


def is_main_guard(node) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test)


def module_path(name: str):
    parts = name.split(".")[1:]
    for candidate in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
        if parts and candidate.exists():
            return candidate
    return None


def graph() -> dict:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = imports_of(path) - {name}
    return modules


def find_cycle(edges: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycles():
    edges = graph()
    assert "moe_tutorial.model" in edges and "moe_tutorial.config" in edges["moe_tutorial.model"]
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_low_level_modules_import_nothing_above_them():
    edges = graph()
    assert edges["moe_tutorial.config"] == set()
    assert edges["moe_tutorial.downloads"] == set()
    assert "moe_tutorial.train" not in edges["moe_tutorial.pretrained"]  # checkpoint I/O only


def test_the_package_map_names_what_exists():
    """The package docstring's map ("read first" column) names real modules, classes and methods."""
    import importlib
    import re

    import moe_tutorial

    first = re.findall(r"^\d\d [^\n]*?  ((?:\w+\.\w+(?:\.\w+)?)(?:, then \w+\.\w+(?:\.\w+)?)?)$", moe_tutorial.__doc__,
                       re.M)
    names = [name for entry in first for name in entry.split(", then ")]
    assert len(names) >= 8, names  # every chapter's row
    for name in names:
        module, *attributes = name.split(".")
        obj = importlib.import_module(f"moe_tutorial.{module}")
        for attribute in attributes:
            obj = getattr(obj, attribute)  # AttributeError names what the map gets wrong
