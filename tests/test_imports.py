"""The app's modules import each other without a loop, and the commands import only what they need.

The graph holds every import of an app module: at a module's top level, under `if TYPE_CHECKING:` or
`if __name__ == "__main__":`, and inside functions. A loop through a lazy import inside a function is a
loop all the same: the two modules still need each other, and only the order of the calls keeps it from
breaking."""

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).parent.parent / "app"


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def app_sources() -> dict[str, Path]:
    return {module_name(path): path for path in APP.rglob("*.py")}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Each app module and the app modules it imports, anywhere in its source."""
    paths = app_sources()
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from app import x` names a module x; `from app.x import y` names x (or x.y, a module).
                candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
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
    assert {"app.tiling", "app.output.rows", "app.decode"} <= graph["app.detector_stage"]  # from app import decode: a module
    assert "app.config" in graph["app.tiling"] and "app.result_schema" in graph["app.output.rows"]  # from app.x import y
    assert "app.summary" in graph["app.cli"]  # under `if TYPE_CHECKING:`
    assert "app.detector" in graph["app.detector_stage"] and "app.model" in graph["app.config"]  # inside a function
    assert "app.cli" in graph["app.report"]  # under `if __name__ == "__main__":`
    assert {"app.bench.harness", "app.bench.tiles"} <= graph["app.bench"] and "app.bench.harness" in graph["app.bench.tiles"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_import_loop_in_the_app():
    cycle = find_cycle(import_graph())
    assert not cycle, " -> ".join(cycle)


def test_the_input_side_does_not_import_the_output_package():
    """Listing, inventories and decoding share the row schema and the error kinds with the output side
    through app.result_schema, not through app.output."""
    graph = import_graph()
    for name in ("app.decode", "app.listing", "app.inventory"):
        assert not {target for target in graph[name] if target == "app.output" or target.startswith("app.output.")}, name


@pytest.mark.slow
def test_the_result_commands_import_without_hydra_and_the_driver_without_torch():
    """report, export and evaluate take their exit codes and parser from app.exit_codes, not from app.cli,
    which loads Hydra; the job's driver (app.pipeline, app.commit) takes the device error's marker from
    app.device without loading torch, which only the detector actors need. One fresh interpreter imports
    the commands, then the driver, and prints the top-level packages loaded after each."""
    program = ("import sys\n"
               "def loaded(): print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))\n"
               "import app.report, app.export, app.evaluate\n"
               "loaded()\n"
               "import app.pipeline, app.commit\n"
               "loaded()\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=APP.parent, capture_output=True, text=True, timeout=120,
                            check=True)
    commands, driver = (set(line.split()) for line in result.stdout.splitlines())
    assert "app" in commands and not {"hydra", "torch"} & commands
    assert "ray" in driver and "torch" not in driver


def test_hydra_only_through_its_public_api_and_sys_argv_never_replaced():
    """app.cli parses `ray-detect run`'s arguments itself and composes the config with Hydra's compose
    API: no module imports Hydra's private modules, nor assigns sys.argv (or an item of it)."""
    found = []
    for name, path in sorted(app_sources().items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(name, alias.name) for alias in node.names if alias.name.startswith("hydra._internal")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hydra._internal"):
                found.append((name, node.module))
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(part, ast.Attribute) and ast.unparse(part) == "sys.argv"
                       for target in targets for part in ast.walk(target)):
                    found.append((name, ast.unparse(node)))
    assert found == []
