"""No import cycles in ``agl``.

Two checks. (1) Static: the graph of every ``import`` in ``agl`` (module level *and* inside functions, plus string
literals naming an ``agl`` module, which is how ``agl.cli`` loads its subcommands with importlib) has no cycle. A
cycle hidden behind a lazy import still couples two modules both ways (``driftcaps.metrics`` <-> ``report``, the
subcommands importing ``CLIError`` back from ``agl.cli``), so it counts. Imports of a module's own parent packages
and ``if __name__ == "__main__":`` blocks are not edges. (2) Dynamic: every module imports cleanly when it is the
first ``agl`` module imported into a fresh interpreter (a fork of one process that has the heavy third-party
packages loaded but no ``agl`` module), which catches a cycle that only breaks in one import order.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "agl"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _is_main_guard(node: ast.AST) -> bool:
    t = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(t, ast.Compare) and isinstance(t.left, ast.Name)
            and t.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                for c in t.comparators))


def _imported_names(tree: ast.AST, module: str, is_pkg: bool) -> set[str]:
    """Dotted names a module may import: ``import a.b``, ``from a import b`` (a and a.b), relative imports resolved,
    and string constants (importlib targets)."""
    package = module if is_pkg else module.rpartition(".")[0]
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_main_guard(node):
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("agl."):
            names.add(node.value)
        stack.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        deps = _imported_names(ast.parse(path.read_text(encoding="utf-8")), name, is_pkg)
        # a parent package is always being imported already when its child is: not an edge
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_lazy_two_module_cycle():
    graph = {"agl.a": {"agl.b"}, "agl.b": {"agl.a"}, "agl.c": {"agl.a"}}
    assert find_cycles(graph) == [["agl.a", "agl.b"]]
    assert find_cycles({"agl.a": {"agl.b"}, "agl.b": set()}) == []
    lazy = ast.parse("def f():\n    from agl.b import g\n")
    assert _imported_names(lazy, "agl.a", False) == {"agl.b", "agl.b.g"}
    cli = ast.parse("_COMMANDS = {'x': 'agl.sub'}\nif __name__ == '__main__':\n    import agl.cli\n")
    assert _imported_names(cli, "agl.cli", False) == {"agl.sub"}


def test_no_import_cycle_in_agl():
    graph = import_graph()
    assert "agl.driftcaps.report" in graph and "agl.cli" in graph  # the walk found the package
    assert "agl.fisher_cli" in graph["agl.cli"]  # importlib targets are edges
    cycles = find_cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) + ")"
                       for c in cycles)
    assert not cycles, f"import cycles: {detail}"


def test_subcommands_take_clierror_from_agl_errors():
    from agl.cli import CLIError as from_cli
    from agl.errors import CLIError

    assert from_cli is CLIError
    # the dispatcher imports its subcommands, never the reverse (a subcommand importing CLIError back from agl.cli
    # would be a cycle through a lazy import)
    importers = sorted(m for m, deps in import_graph().items() if "agl.cli" in deps)
    assert not importers, f"{importers} import agl.cli: take CLIError from agl.errors"


_FORK_EACH = textwrap.dedent("""
    import importlib, os, sys, traceback
    import numpy, torch  # heavy third-party imports once; no agl module is loaded in this parent
    try:
        import transformers, peft  # noqa: F401
    except ImportError:
        pass
    assert not [m for m in sys.modules if m == "agl" or m.startswith("agl.")]
    failed = []
    for name in sys.argv[1:]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                importlib.import_module(name)
                code = 0
            except BaseException:
                os.write(w, traceback.format_exc().encode()[-3000:])
                code = 1
            os._exit(code)
        os.close(w)
        msg = b""
        while chunk := os.read(r, 65536):
            msg += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(f"{name}:\\n{msg.decode(errors='replace')}")
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.slow  # > 5 s: left out of `make test-fast`
def test_every_module_imports_first_in_a_fresh_interpreter():
    mods = [m for m in _modules() if not m.endswith("__main__")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _FORK_EACH, *mods], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"modules that fail to import first:\n{r.stdout}\n{r.stderr[-3000:]}"
