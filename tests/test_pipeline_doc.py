"""docs/pipeline.md walks through the real code path: its snippets are MoELayer.forward and the island
it calls (steps 2-5), to the letter, docstrings left out."""

import ast
import re
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "## The forward, step by step"


def method_source(name: str) -> str:
    """MoELayer.<name> as written in layer.py, without its docstring, dedented."""
    source = (REPO / "expert_parallel" / "layer.py").read_text()
    layer = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "MoELayer")
    method = next(n for n in layer.body if isinstance(n, ast.FunctionDef) and n.name == name)
    docstring = method.body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant), name
    lines = source.splitlines()
    kept = lines[method.lineno - 1 : docstring.lineno - 1] + lines[docstring.end_lineno : method.end_lineno]
    return textwrap.dedent("\n".join(kept)) + "\n"


def walk_through_snippets() -> list[str]:
    text = (REPO / "docs" / "pipeline.md").read_text()
    assert SECTION in text, f"docs/pipeline.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_walk_through_is_the_layers_forward_and_its_island():
    snippets = walk_through_snippets()
    assert snippets == [method_source("forward"), method_source("_dispatch_experts_combine")]


def test_the_numbered_steps_appear_in_order():
    names = []
    for method in ("forward", "_dispatch_experts_combine"):
        steps = re.findall(r"# (\d)\. (\w+)", method_source(method))
        assert [n for n, _ in steps] == sorted(n for n, _ in steps), method
        names += [name for _, name in steps]
    assert {"route", "plan", "dispatch", "experts", "combine", "stats"} <= set(names)
