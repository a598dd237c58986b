"""The app's modules import each other without a loop.

The graph holds the imports of app modules at a module's top level, those under `if TYPE_CHECKING:`
included (a loop there still ties the modules' meanings together, and breaks once the hint is needed at
run time). Imports inside functions are left out: they are the deliberate, lazy ones (an optional extra,
a heavy library imported only by the command that needs it)."""

import ast
from pathlib import Path

APP = Path(__file__).parent.parent / "app"


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """The import statements at the module's top level and inside its top-level if/try blocks."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            pending.extend([*node.body, *node.orelse, *getattr(node, "finalbody", []),
                            *(statement for handler in getattr(node, "handlers", []) for statement in handler.body)])
    return found


def import_graph() -> dict[str, set[str]]:
    """Each app module and the app modules it imports at its top level."""
    paths = {module_name(path): path for path in APP.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from app import x` names a module x; `from app.x import y` names x (or x.y, a module).
                candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            targets |= {candidate for candidate in candidates if candidate in paths and candidate != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One loop of the graph as the modules along it (first repeated last), or [] when there is none."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        trail.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        trail.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert {"app.tiling", "app.output.rows", "app.decode"} <= graph["app.detector"]  # from app import decode: a module
    assert "app.config" in graph["app.tiling"] and "app.output.dataset" in graph["app.output.rows"]  # from app.x import y
    assert "app.summary" in graph["app.cli"]  # under `if TYPE_CHECKING:`
    assert "app.model" not in graph["app.config"]  # imported inside a function: left out
    assert {"app.bench.harness", "app.bench.tiles"} <= graph["app.bench"] and "app.bench.harness" in graph["app.bench.tiles"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_import_loop_in_the_app():
    cycle = find_cycle(import_graph())
    assert not cycle, " -> ".join(cycle)
