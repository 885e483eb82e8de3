"""Module structure: no import cycles between the project's modules, no private name imported across modules, no
function outside tests longer than 80 lines, and a measuring child (exporters.speed) that imports no torch.

The graph is read from the source (``ast``), so imports inside functions count as well: a cycle hidden behind a
lazy import is still a cycle. An edge ``a -> b`` exists when module ``a`` imports module ``b`` or a name from it
(``from .b import x``). Importing a package (``from .importance import get_method``) is an edge to the
package's ``__init__`` only.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edgeprune", "exporters", "device_profiles")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _absolute(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """(graph, private-name imports) over the project's modules."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                graph[mod] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(mod, is_pkg, node)
                if target not in mods:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:                     # from .pkg import module
                        graph[mod].add(sub)
                    else:
                        graph[mod].add(target)
                        if a.name.startswith("_") and not a.name.startswith("__") and target != mod:
                            private.append(f"{mod} imports {target}.{a.name}")
    for m in graph:
        graph[m].discard(m)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph, _ = imports(modules())
    assert cycles(graph) == []


def test_no_private_names_across_modules():
    _, private = imports(modules())
    assert private == []


def test_the_walk_sees_a_cycle(tmp_path):
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]


def test_no_long_functions_outside_tests():
    """Functions fit a screen: none outside tests is longer than 80 lines (def line to last line)."""
    long = []
    for pkg in PACKAGES + ("scripts",):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for n in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80:
                    long.append(f"{f.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def test_speed_child_and_procmem_import_no_torch(tmp_path):
    """The measuring child (``python -m exporters.speed``) must hold the runtime alone: the files pushed to a
    device for it (``exporters.remote.SPEED_BUNDLE``) import, in a fresh interpreter that sees nothing else of
    the project, without torch or transformers (torch alone adds ~240 MB to every measured peak), and the
    peak-RSS reader they share with the engine (``edgeprune.procmem``) is the bundle's own copy."""
    import os
    import subprocess
    import sys

    from exporters.remote import _speed_bundle

    bench = _speed_bundle(tmp_path)
    code = ("import sys, exporters.speed, exporters.runtimes, llama_cpp, onnxruntime, edgeprune.procmem as m\n"
            "assert m.peak_rss_mb() > 0 and m.mem_available() > 0\n"
            "print(m.__file__)\n"
            "print(sorted({x.split('.')[0] for x in sys.modules} & {'torch', 'transformers'}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=bench, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-800:]
    where, heavy = r.stdout.splitlines()[-2:]
    assert where == str(bench / "edgeprune" / "procmem.py")
    assert heavy == "[]"
