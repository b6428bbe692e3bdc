"""The package's architecture, checked on its source: every import (module level or inside a function) is
parsed, and the import graph must be acyclic, respect the layers of docs/architecture.md, never go through
the top-level ``meansparse/__init__`` and never take another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import meansparse

ROOT = Path(meansparse.__file__).parent
FILES = sorted(ROOT.rglob("*.py"))

#: Layer -> the layers it may import (besides itself).  The first component of a module's name under
#: ``meansparse`` is its layer; ``meansparse/__init__`` (the public API) may import everything.
#: The base layer (docs/architecture.md): torch only, importable by every layer whose row says "base".
BASE = {"_utils", "_compile", "version", "distributed", "pgd"}
ALLOWED: dict[str, set[str]] = {
    **{m: set() for m in BASE},
    "core": BASE,
    "placement": {"core"} | BASE,
    "accel": {"core", "placement"} | BASE,
    "calibration": {"core", "placement"} | BASE,
    "serialization": {"core", "placement"} | BASE,
    "data": BASE,  # atomic file writes (atomic_path)
    "models": BASE,  # the tensor hash checkpoints record (tensors_sha256)
    # core: import_reference installs statistics in the operators; serialization: a trained checkpoint's operators
    "zoo": {"core", "placement", "serialization", "models"},
    "evaluation": {"core", "placement"} | BASE,
    # search, training, plots: "the layers above them in this table"; search: accel, fastpath: a search runs its
    # whole α grid on one execution path
    "search": {"core", "placement", "evaluation", "accel", "fastpath"} | BASE,
    "training": {"core", "placement", "calibration", "serialization", "evaluation", "zoo", "data", "models"} | BASE,
    "plots": {"core"} | BASE,
    "fastpath": {"core", "accel", "evaluation", "_utils"},
    "pipeline_report": {"core", "accel", "data", "evaluation", "search", "plots"},
    "pipeline": {"core", "placement", "accel", "calibration", "serialization", "evaluation", "search", "data",
                 "models", "training", "plots", "zoo", "fastpath", "pipeline_report", "_utils"},
    "cli": {"core", "placement", "accel", "calibration", "serialization", "evaluation", "search", "data",
            "models", "training", "pipeline", "distributed", "zoo", "fastpath", "_utils", "_compile", "version"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("meansparse", *parts))


MODULES = {module_name(p): p for p in FILES}


def imports(path: Path, name: str | None = None) -> list[tuple[str, str]]:
    """(imported module, imported name or "") for every import statement in ``path`` (module ``name``);
    ``from pkg import x`` resolves to the module ``pkg.x`` when there is one."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, "") if sub in MODULES else (target, alias.name))
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for source, path in MODULES.items():
        for target, _ in imports(path):
            if target in MODULES and target != source:
                edges[source].add(target)
    return edges


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_source_tree_is_found():
    assert len(MODULES) > 40 and "meansparse.core.operator" in MODULES


def test_the_import_graph_is_acyclic():
    edges, state, cycles = graph(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_the_top_level_package():
    offenders = [(s, t) for s, ts in graph().items() if s != "meansparse" for t in ts if t == "meansparse"]
    assert not offenders


def test_no_module_imports_another_modules_private_names():
    offenders = [(module_name(p), t, n) for p in FILES for t, n in imports(p)
                 if t.startswith("meansparse") and n.startswith("_") and n != "__version__"]
    assert not offenders


@pytest.mark.parametrize("source", sorted(m for m in MODULES if m != "meansparse"))
def test_each_module_imports_only_lower_layers(source):
    own = layer(source)
    assert own in ALLOWED, f"{source}: layer {own!r} is not in the architecture table"
    bad = sorted(t for t in graph()[source] if layer(t) != own and layer(t) not in ALLOWED[own])
    assert not bad, f"{source} ({own}) imports {bad}; allowed layers: {sorted(ALLOWED[own])}"


def test_a_violation_would_be_caught(tmp_path):
    """The parser sees function-level imports, relative ones and private names (the checks above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..operator import _hidden\n    from ... import prepare\n")
    found = imports(bad, "meansparse.core.band.bad")
    assert ("meansparse.core.operator", "_hidden") in found and ("meansparse", "prepare") in found


def test_torch_distributed_is_used_through_the_base_layers_helpers():
    """Rank, world size and collectives go through ``meansparse.distributed`` (base layer: core, calibration
    and the rest may import it), not through checks written again next to their use."""
    users = sorted(module_name(p) for p in FILES for t, _ in imports(p) if t.startswith("torch.distributed"))
    assert set(users) == {"meansparse.distributed"}, users


def test_the_base_layer_is_importable_by_the_layers_docs_put_above_it():
    assert all("distributed" in ALLOWED[name] for name in ("core", "placement", "calibration", "accel"))


#: the most parameters a public function (or class) of the package takes: an evaluation's settings travel in one
#: EvaluationSpec, not loose through signatures (issue #23)
MAX_PARAMETERS = 13
#: public callables allowed more, and why
WIDER = {
    # a result record: one field per reported quantity, built by the runner and by Report.from_json
    "Report": "a result record",
}


def _public_callables() -> list[tuple[str, object]]:
    import importlib
    import inspect
    import pkgutil

    packages = ["meansparse"] + [f"meansparse.{m.name}" for m in pkgutil.iter_modules(meansparse.__path__) if m.ispkg]
    packages += ["meansparse.evaluation.attacks"]
    out = []
    for package in packages:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((f"{package}.{name}", obj))
    return out


def test_no_public_function_takes_more_than_13_parameters():
    import inspect

    found = _public_callables()
    assert any(name == "meansparse.evaluate" for name, _ in found)
    wide = []
    for name, obj in found:
        try:
            signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
        except (TypeError, ValueError):  # a builtin without a signature
            continue
        count = len([p for p in signature.parameters.values() if p.name != "self"])
        if count > MAX_PARAMETERS and name.rpartition(".")[2] not in WIDER:
            wide.append(f"{name}: {count}")
    assert not wide, f"more than {MAX_PARAMETERS} parameters: {wide}"


#: the longest a function of the package may be (issue #23): longer ones get split along their phases
MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
