"""The layout tells the pipeline: what each package may import (function-level imports included), no import
circle, and no library function over 60 lines. An AST scan of cllm/, no imports run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cllm"

# package -> the cllm packages/modules it must not import (data is the bottom stage; training and evaluation sit
# side by side; only the front doors import the commands)
FORBIDDEN = {
    "cllm.decoding": ("cllm.data", "cllm.training", "cllm.eval", "cllm.commands", "cllm.serve", "cllm.models"),
    "cllm.data": ("cllm.training", "cllm.eval", "cllm.commands", "cllm.serve"),
    "cllm.training": ("cllm.eval", "cllm.commands", "cllm.serve"),
    "cllm.eval": ("cllm.training", "cllm.commands", "cllm.serve"),
    "cllm.serve": ("cllm.commands",),
    "cllm.pipeline": ("cllm.commands", "cllm.serve"),
    "cllm.models": ("cllm.data", "cllm.training", "cllm.eval", "cllm.commands", "cllm.serve"),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The cllm modules `name` imports anywhere in its file (a `from pkg import mod` counts as importing mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_the_scan_sees_imports_and_circles():
    # the scan itself can fail: a known edge is found, and a made-up circle is reported
    graph = _graph()
    assert "cllm.decoding.registry" in graph["cllm.eval.runner"]
    assert "cllm.data.trajectories" in graph["cllm.data.collect"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_each_stage_imports_only_what_its_folder_allows():
    bad = []
    for m, deps in _graph().items():
        for owner, forbidden in FORBIDDEN.items():
            if m == owner or m.startswith(owner + "."):
                bad += [f"{m} imports {d}" for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden)]
    assert bad == []


def test_no_library_function_over_60_lines():
    long = []
    for p in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{p.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_commands_stay_thin():
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (ROOT / "commands").glob("*.py"))
    assert lines <= 1100, lines


def _n_params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return len(names) - (names[:1] in (["self"], ["cls"]))


def test_no_library_function_takes_more_than_8_parameters():
    """Options travel as objects (each method's options dataclass, a config), not as long positional lists."""
    wide = []
    for p in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _n_params(node) > 8:
                wide.append(f"{p.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({_n_params(node)})")
    assert wide == []
    assert _n_params(ast.parse("def f(self, a, *b, c, **d): pass").body[0]) == 4  # the count itself
