"""The public API's shape (issue #23): the top-level ``__all__`` holds the workflow verbs, the result and spec
types and the subpackages; internals live in their subpackages; every ``ms.X`` / ``meansparse.X.Y`` name the
documentation's code uses resolves through a public path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import meansparse as ms

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

VERBS = {"prepare", "sites", "calibrate", "set_alpha", "straight_through", "learn_statistics",
         "register_activation", "remove", "operators", "evaluate", "search_alpha", "search_per_site",
         "search_schedule", "fuse", "unfuse", "fused_sites", "save", "load"}
TYPES = {"MeanSparse", "Site", "SiteInfo", "AlphaSchedule", "EvaluationSpec", "Ladder", "Report",
         "AlphaSearchResult"}
SUBPACKAGES = {"accel", "core", "data", "evaluation", "models", "placement", "zoo"}
#: internals that must stay in their subpackages (the first three were top-level names before issue #23)
INTERNALS = {"Moments": "core", "MeanSparseActivation": "placement", "tune_cpu_allocator": "accel",
             "MeanSparseOutput": "placement", "FusedMeanSparse": "accel", "whole_model_compiled": "accel",
             "PreparedRecord": "placement", "get_record": "placement", "sparsify": "core", "in_band": "core",
             "StraightThrough": "core", "gradient_mode": "placement", "PRESETS": "placement"}

#: code in markdown: fenced blocks and inline spans
_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
#: a dotted name rooted at the package (not a file name such as ``gelu-meansparse.safetensors``)
_NAME = re.compile(r"(?<![\w.\-/\"'])(?:ms|meansparse)(?:\.[A-Za-z_]\w*)+")
#: ``from meansparse.x import a, b`` in a code block
_FROM = re.compile(r"from (meansparse(?:\.\w+)*) import \(?([\w, ]+)")
_FILES = {"safetensors", "json", "md", "py", "png", "pt", "txt"}


def documented_names() -> dict[str, list[str]]:
    """Every package-rooted dotted name in the docs' code, with the files that use it."""
    found: dict[str, set[str]] = {}
    for path in DOCS:
        for block in _CODE.findall(path.read_text(encoding="utf-8")):
            names = _NAME.findall(block)
            for module, imported in _FROM.findall(block):
                names += [f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()]
            for name in names:
                if name.rpartition(".")[2] not in _FILES:
                    found.setdefault(name, set()).add(path.name)
    return {name: sorted(files) for name, files in found.items()}


#: run in a fresh interpreter: ``ms.`` names after ``import meansparse`` alone (no other import may have set a
#: submodule attribute), then ``meansparse.`` names as module paths (import the longest module prefix)
_RESOLVER = textwrap.dedent("""
    import importlib, json, sys
    import meansparse
    names = json.loads(sys.stdin.read())
    bad = {}
    def walk(obj, parts):
        for part in parts:
            if part.startswith("_"):
                return f"private component {part!r}"
            if not hasattr(obj, part):
                return f"no attribute {part!r}"
            obj = getattr(obj, part)
    for name in [n for n in names if n.startswith("ms.")]:
        parts = name.split(".")[1:]
        if parts[0] not in meansparse.__all__:
            bad[name] = f"{parts[0]!r} is not in meansparse.__all__"
        elif (why := walk(meansparse, parts)):
            bad[name] = why
    for name in [n for n in names if n.startswith("meansparse.")]:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                module = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        if any(p.startswith("_") for p in parts[1:cut]):
            bad[name] = "private module"
        elif (why := walk(module, parts[cut:])):
            bad[name] = why
    print(json.dumps(bad))
""")


def unresolved(names) -> dict[str, str]:
    """The names that do not resolve through a public path, and why (in a fresh interpreter)."""
    out = subprocess.run([sys.executable, "-c", _RESOLVER], input=json.dumps(sorted(names)), text=True,
                         capture_output=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_every_name_the_docs_use_is_reachable_through_a_public_path():
    names = documented_names()
    assert "ms.accel.whole_model_compiled" in names and "ms.prepare" in names  # the parser sees the docs
    bad = unresolved(names)
    assert not bad, {name: (why, names[name]) for name, why in bad.items()}


def test_the_resolver_refuses_accidental_and_private_paths():
    bad = unresolved(["ms.search.AlphaObjective", "ms.Moments", "ms.accel.nope", "meansparse._compile.x",
                      "meansparse.core._private", "meansparse.search.AlphaObjective", "ms.core.Moments"])
    assert sorted(bad) == ["meansparse._compile.x", "meansparse.core._private", "ms.Moments", "ms.accel.nope",
                           "ms.search.AlphaObjective"]


def test_the_doc_parser_skips_file_names_and_reads_from_imports(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text('`ms.save(m, "gelu-meansparse.safetensors")` and\n```python\n'
                   "from meansparse.data import Batches, load_dataset\nms.core.Moments()\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [doc])
    assert set(documented_names()) == {"ms.save", "meansparse.data", "meansparse.data.Batches",
                                       "meansparse.data.load_dataset", "ms.core.Moments"}


def test_top_level_all_is_verbs_types_and_subpackages():
    assert set(ms.__all__) == VERBS | TYPES | SUBPACKAGES | {"__version__"}
    assert len(ms.__all__) == len(set(ms.__all__))
    for name in SUBPACKAGES:
        assert getattr(ms, name).__name__ == f"meansparse.{name}"


def test_top_level_all_holds_no_internal():
    assert not set(ms.__all__) & set(INTERNALS)
    for name, where in INTERNALS.items():
        assert hasattr(getattr(ms, where), name), f"meansparse.{where}.{name}"


@pytest.mark.parametrize("name", ["Moments", "MeanSparseActivation", "tune_cpu_allocator"])
def test_a_moved_name_still_resolves_with_a_deprecation_warning(name):
    with pytest.warns(DeprecationWarning, match=f"meansparse.{INTERNALS[name]}.{name}"):
        obj = getattr(ms, name)
    assert obj is getattr(getattr(ms, INTERNALS[name]), name)
    with pytest.raises(AttributeError):
        ms.no_such_name  # noqa: B018
