"""The import graph of vsa_train follows docs/design.md, 'Layers and import directions': every import (also one
inside a function) points to a lower layer or stays inside its own package, and no modules import each other in
a cycle. Read from the source with `ast`, so it holds whatever is imported at run time."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vsa_train"

# The layers of docs/design.md, lowest first. A unit is a top-level module or a subpackage of vsa_train.
LAYERS = [
    {"errors"},  # the expected failures: imported by every layer
    # nothing else of vsa_train
    {"ops", "fields", "files", "diffusion", "distributed", "preemption", "launcher", "provenance"},
    {"models", "data", "sections", "metrics", "evaluation", "runlock"},
    {"config_schema", "flops", "parallel", "progress"},
    {"checkpoint", "schedules"},
    {"rundir", "training_run"},
    {"sampling", "analysis", "grid"},
    {"periodic", "integrations"},
    {"trainer"},
    {"bench"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """The vsa_train modules `name` imports, anywhere in its code."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: up from this module's package
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).rstrip(".")
            else:
                base = node.module
            for alias in node.names:  # `from . import x`: the module x, else the module holding x
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: vsa_train/__init__.py


def _arrows_against_the_layers(graph: dict) -> list[str]:
    """One line per import that points up or sideways (into another unit of the same layer)."""
    bad = []
    for module, targets in sorted(graph.items()):
        unit = _unit(module)
        for target in sorted(targets):
            other = _unit(target)
            if other != unit and (unit is None or other is None or LAYER[other] >= LAYER[unit]):
                bad.append(f"{module} (layer {LAYER.get(unit)}) imports {target} (layer {LAYER.get(other)})")
    return bad


def _cycle(graph: dict) -> list[str] | None:
    """Some import cycle of the graph (depth-first search for a back edge), or None."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_every_unit_has_a_layer():
    assert {_unit(m) for m in MODULES} - {None} == set(LAYER)


def test_imports_point_down_or_stay_in_their_package():
    assert _arrows_against_the_layers(GRAPH) == []


def test_no_import_cycles():
    assert _cycle(GRAPH) is None


def test_the_rules_named_in_the_design_notes():
    """ops is a kernel library on its own; models know no data, loop or run directory; data knows no model."""
    def units(prefix):
        return {_unit(t) for m in MODULES if m.startswith(prefix) for t in GRAPH[m]} - {prefix.split(".")[1]}

    assert units("vsa_train.ops") == set()
    assert units("vsa_train.models") <= {"ops", "fields", "errors"}
    assert units("vsa_train.data") <= {"fields", "errors"}


def test_the_checks_catch_what_they_look_for():
    """Today's graph plus one upward arrow (models -> trainer, as models/wan.py -> integrations/ once was) and
    plus one cycle (data/encoders.py <-> data/videos.py, as it once was)."""
    upward = {**GRAPH, "vsa_train.models.wan": GRAPH["vsa_train.models.wan"] | {"vsa_train.trainer"}}
    assert _arrows_against_the_layers(upward) == [
        "vsa_train.models.wan (layer 2) imports vsa_train.trainer (layer 8)"]
    cyclic = {**GRAPH, "vsa_train.data.encoders": GRAPH["vsa_train.data.encoders"] | {"vsa_train.data.videos"}}
    assert _cycle(cyclic) == ["vsa_train.data.encoders", "vsa_train.data.videos", "vsa_train.data.encoders"]


def test_no_function_over_60_lines():
    """docs/design.md: functions stay short enough to read in one screen (kernels included)."""
    long = []
    for name, path in sorted(MODULES.items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
