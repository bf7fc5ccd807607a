"""The package is layered: no import cycle between mocd_train's modules, counting imports inside functions too (they
hide a cycle rather than remove it). Static: the modules are parsed, not imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "mocd_train"
# the only in-function imports of the package itself: each keeps a light entry point light
ALLOWED_LATE = {
    ("mocd_train.config.schema", "mocd_train.rewards"),  # validation needs the reward registry, which imports torch
    ("mocd_train.cli", "mocd_train.assets"), ("mocd_train.cli", "mocd_train.rewards"),  # `mocd --help` stays fast
    ("mocd_train.cli", "mocd_train.wandb_report"), ("mocd_train.cli", "mocd_train.config"),
    ("mocd_train.cli", "mocd_train.stage"),
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(module-level, in-function) imports of package modules by one module."""
    tree = ast.parse(path.read_text())
    top_nodes = set()
    for node in tree.body:
        top_nodes.add(node)
        if isinstance(node, (ast.If, ast.Try)):
            top_nodes.update(node.body)
    top, late = set(), set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for t in targets:
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name and not name.startswith(t + "."):
                (top if node in top_nodes else late).add(t)
    return top, late


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_package():
    mods = modules()
    graph, late = {}, set()
    for name, path in mods.items():
        top, inner = imports(name, path, set(mods))
        graph[name] = top | inner
        late |= {(name, t) for t in inner}
    assert cycles(graph) == []
    assert late <= ALLOWED_LATE, f"in-function imports of the package: {sorted(late - ALLOWED_LATE)}"


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
