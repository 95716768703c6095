"""No import circle inside drp/: its files import one another in one direction only (read from the source
with `ast`, imports inside functions included, so a circle cannot hide behind a late import)."""

import ast
from pathlib import Path

DRP = Path(__file__).resolve().parent.parent / "drp"


def module_name(path, root):
    """drp/bench/run.py -> "drp.bench.run"; drp/bench/__init__.py -> "drp.bench"."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root):
    """{module: the package's modules it imports}, for every .py file under `root` (a package folder).

    `from . import x` imports the module x when there is one (not the package itself, whose __init__
    has already run); `from .x import name` imports the module x.
    """
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                if not node.level:
                    base = node.module
                elif node.module:
                    base = f"{base}.{node.module}"
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = sorted(m for m in found if m in files and m != name)
    return graph


def find_circle(graph):
    """One import circle as a list [a, b, …, a], or None."""
    state = {}  # module -> "open" while its imports are being followed, "done" after

    def visit(module, path):
        state[module] = "open"
        for imported in graph[module]:
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state:
                circle = visit(imported, path + [imported])
                if circle:
                    return circle
        state[module] = "done"
        return None

    for module in graph:
        if module not in state:
            circle = visit(module, [module])
            if circle:
                return circle
    return None


def test_no_file_of_drp_imports_a_file_that_imports_it_back():
    graph = import_graph(DRP)
    assert len(graph) > 40 and "drp.weight_files" in graph["drp.convert_ip_adapter"]  # the graph was read
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_a_circle_through_an_import_inside_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("from . import b\n\ndef f():\n    return b\n")
    (package / "b.py").write_text("def g():\n    from .sub.c import h\n    return h\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from .. import a\n")
    graph = import_graph(package)
    assert graph["pkg"] == ["pkg.a"] and graph["pkg.a"] == ["pkg.b"]  # `from . import b`: the module b
    assert find_circle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (package / "sub" / "c.py").write_text("from .. import d\n")  # a name of the package: its __init__ imports a
    assert find_circle(import_graph(package)) == ["pkg", "pkg.a", "pkg.b", "pkg.sub.c", "pkg"]
    (package / "sub" / "c.py").write_text("import os\n")
    assert find_circle(import_graph(package)) is None
