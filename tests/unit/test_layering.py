"""The module graph of megatrain/ and data_prep/ (every import, lazy ones included) has no cycle,
and its layers hold (docs/architecture.md): imports point down only."""

import ast

import pytest

from tests.helpers import REPO

PACKAGES = ("megatrain", "data_prep")


def module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
    }
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert not node.level, f"{path}: relative import; the project imports absolutely"
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[module] |= {n for n in names if n in files and n not in (module, *PACKAGES)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = module_graph()


def test_there_are_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert "megatrain.dist" in GRAPH["megatrain.train"]  # lazy and plain imports are both seen


def imports(module: str) -> set[str]:
    return GRAPH[module]


@pytest.mark.parametrize(
    "module", ["megatrain.errors", "megatrain.files", "megatrain.hashing", "megatrain.tokens"]
)
def test_the_bottom_layer_imports_nothing_of_ours(module):
    assert imports(module) == set()


def test_the_shard_format_depends_on_nothing_above_it():
    assert imports("megatrain.shards") <= {"megatrain.errors", "megatrain.files"}


def test_the_model_knows_nothing_of_parallelism_or_the_loop():
    assert imports("megatrain.model") == {"megatrain.config"}


def test_prep_never_imports_the_trainer():
    allowed = {
        f"megatrain.{m}"
        for m in ("errors", "files", "schema", "shards", "dist", "hashing", "tokens", "locks")
    }
    for module, deps in GRAPH.items():
        if module.startswith("data_prep"):
            assert {d for d in deps if d.startswith("megatrain")} <= allowed, module


@pytest.mark.parametrize("observer", ["sinks", "report", "carbon", "energy", "hardware"])
def test_observers_are_handed_numbers(observer):
    trainer = {f"megatrain.{m}" for m in ("train", "parallel", "dist", "checkpoint", "metrics")}
    assert not imports(f"megatrain.{observer}") & trainer


@pytest.mark.parametrize("planner", ["memory", "forecast"])
def test_the_plan_builds_nothing(planner):
    loop = {f"megatrain.{m}" for m in ("train", "dist", "checkpoint", "metrics", "requeue")}
    assert not imports(f"megatrain.{planner}") & loop


def test_only_the_command_line_reaches_into_everything():
    assert not any("megatrain.cli" in deps for deps in GRAPH.values())
    users_of_prep = {m for m, deps in GRAPH.items() if any(d.startswith("data_prep") for d in deps)}
    assert {m for m in users_of_prep if m.startswith("megatrain")} == {"megatrain.cli"}
