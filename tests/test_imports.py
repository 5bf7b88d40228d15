"""The package's import graph has no cycle, and the math modules stay clear of torch.distributed."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "expert_parallel"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each expert_parallel module -> the expert_parallel modules it imports (anywhere in it)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:  # `from . import comm` names a module; `from .x import y` a name
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    done, on_path = set(), []

    def visit(module: str) -> None:
        if module in on_path:
            raise AssertionError(f"import cycle: {' -> '.join(on_path[on_path.index(module) :] + [module])}")
        if module in done:
            return
        on_path.append(module)
        for target in sorted(graph[module]):
            if target != "expert_parallel":  # a submodule importing its package's __init__ is not a cycle
                visit(target)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_math_modules_do_not_touch_torch_distributed():
    math = (
        "config",
        "router",
        "permutation",
        "dispatchers",
        "experts",
        "layer",
        "plan",
        "checks",
        "recompute",
    )
    for name in math:
        assert "torch.distributed" not in (PACKAGE / f"{name}.py").read_text(), name
