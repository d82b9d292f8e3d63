"""Imports only go down: clip_model -> components/common (and the other shared packages) -> the stages ->
pipelines. No module imports a layer above it or a sibling stage, and no modules import each other, directly
or round a longer loop. Read from the source with ast (every import, also the ones inside functions), so
nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clip_model", "components", "pipelines")
# components/ packages every stage may use: below the stages, above clip_model
SHARED = ("common", "inference", "synthetic")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a `from package import module` counts as the module)."""
    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(filter(None, (resolve(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(head + ([base] if base else []))
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
                if target:
                    found.add(target)
    found.discard(name)
    return found


def layer(name: str) -> tuple[int, str]:
    """(rank, group): a module may import its own group or a lower rank, nothing else."""
    top, _, rest = name.partition(".")
    if top == "clip_model":
        return 0, "clip_model"
    if top == "pipelines":
        return 3, "pipelines"
    sub = rest.partition(".")[0]
    if not sub or sub in SHARED:
        return 1, sub or "components"
    return 2, sub


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module are import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_checker_sees_what_it_should():
    edges = graph()
    assert len(edges) > 100 and "components.common.storage" in edges["components.shard.stage"]
    assert layer("components.train.loop") == (2, "train") and layer("components.common.storage") == (1, "common")
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_only_go_down():
    upward = []
    for name, targets in sorted(graph().items()):
        rank, group = layer(name)
        for target in sorted(targets):
            t_rank, t_group = layer(target)
            if t_rank > rank or (t_rank == rank and t_group != group and rank != 1):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that go up or sideways between stages:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = strongly_connected(graph())
    assert not cycles, "modules that import each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)
