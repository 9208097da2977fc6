"""The import graph of refine_llm, read from the source (AST), and the rules it keeps.

    python -m refine_llm.devtools.imports            # cycles, private imports, long modules, layer rules
    python -m refine_llm.devtools.imports --graph    # every edge, "a -> b"

Every ``import`` counts, including the ones inside functions: a cycle hidden in a function body is
still a cycle (it only fails later, at the first call that closes it). An edge goes to the module a
statement names: ``from refine_llm.scoring import cache`` is an edge to ``refine_llm.scoring.cache``
when that is a module, else to ``refine_llm.scoring`` (its ``__init__``).

Rules (``main`` prints each violation and exits 1 when there is one; tests/test_architecture.py asserts there
are none):
- no cycle among refine_llm's modules;
- no module imports a private name (``_x``) of another module;
- no module is longer than ``MAX_LINES``;
- the layer rules of docs/architecture.md (``LAYERS``): what each package may import of ours; which modules
  may import the heavy optional libraries (``OPTIONAL``); the library never imports scripts/, eval/ or tests/.
Nothing here imports the code it reads.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "refine_llm"
ROOT = Path(__file__).resolve().parents[1]  # refine_llm/
MAX_LINES = 600

# Who may import whom (docs/architecture.md). Keys and values are module names under refine_llm (a key covers
# its submodules; a value allows the module and its submodules). LEAVES may be imported by every module but
# config (which imports nothing of ours). A module without an entry may import anything of the library.
LEAVES = ("errors", "io", "progress", "markdown", "vocab", "config")
LAYERS: dict[str, tuple[str, ...]] = {
    "config": (),
    "errors": (),
    "io": ("errors",),
    "progress": (),
    "markdown": (),
    "vocab": (),
    "training": (),
    "probes": ("errors",),  # torch only: the one logistic probe (gate head, steering)
    "metrics": ("errors",),  # never torch-heavy code, never a model
    "prompts": ("errors",),
    "questions": LEAVES + ("cliargs",),
    "cliargs": LEAVES,
    "forward": LEAVES,
    "rewards": ("metrics",),
    "methods": LEAVES + ("metrics", "probes"),
    "bandit": LEAVES + ("methods", "rewards", "training", "metrics"),
    "baselines": LEAVES + ("models", "forward", "scoring", "rewards", "metrics", "training", "probes"),
    "scoring": LEAVES + ("forward", "prompts", "models", "model_check", "questions", "metrics", "cliargs"),
    "serving": ("methods", "config", "errors", "vocab"),  # the processors: no trainer, scorer or dataset
    "serving.launch": ("methods", "config", "errors", "vocab", "models", "model_check"),  # it resolves the model
    "seeds": LEAVES + ("metrics",),
    "report": LEAVES + ("metrics", "seeds", "bbq.report"),
    "evaluation": LEAVES + ("methods", "metrics"),
    "models": LEAVES,
    "model_check": LEAVES + ("models",),
    "devtools": (),
}
# The heavy optional libraries, imported only inside the modules that need them.
OPTIONAL: dict[str, tuple[str, ...]] = {
    "vllm": ("scoring.backends.vllm", "serving.vllm", "serving.launch"),
    "ray": ("scoring.backends.ray",),
    "peft": ("baselines.lora", "baselines.cda", "testbed"),
    "trl": ("baselines.cda",),
    "bitsandbytes": ("models",),
    "lm_eval": ("lm_eval_head",),
}
NEVER = ("scripts", "tests", "eval", "conftest")  # the library never imports its callers


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module
    names: tuple[str, ...]  # names taken from dst (``from dst import a, b``), () for ``import dst``
    line: int
    local: bool  # inside a function or method


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}


def _resolve(mod: str, level: int, target: str | None, is_pkg: bool) -> str:
    """An absolute module name for a (possibly relative) import inside ``mod``."""
    if not level:
        return target or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def edges(root: Path = ROOT) -> list[Edge]:
    mods = modules(root)
    out: list[Edge] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_pkg = path.name == "__init__.py"
        func_lines: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        func_lines.add(id(sub))
        for node in ast.walk(tree):
            local = id(node) in func_lines
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
                        # ``import a.b.c``: the deepest prefix that is a module
                        name = a.name
                        while name not in mods and "." in name:
                            name = name.rsplit(".", 1)[0]
                        out.append(Edge(mod, name, (), node.lineno, local))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node.level, node.module, is_pkg)
                if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                    continue
                plain: list[str] = []
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # ``from pkg import submodule``
                        out.append(Edge(mod, sub, (), node.lineno, local))
                    else:
                        plain.append(a.name)
                if plain:
                    out.append(Edge(mod, target, tuple(plain), node.lineno, local))
        out += _private_attributes(mod, tree, mods)
    return [e for e in out if e.src != e.dst]


def _private_attributes(mod: str, tree: ast.AST, mods: dict[str, Path]) -> list[Edge]:
    """``metrics._Cells``, where ``metrics`` names one of our modules in this file: a private name taken
    from another module as surely as ``from refine_llm.metrics import _Cells``."""
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE) and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in mods:
                    alias[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in mods:
                    alias[a.asname] = a.name
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in alias
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append(Edge(mod, alias[node.value.id], (node.attr,), node.lineno, True))
    return out


def graph(es: list[Edge]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for e in es:
        g.setdefault(e.src, set()).add(e.dst)
        g.setdefault(e.dst, set())
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted: every
    import cycle lies inside one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def private_imports(es: list[Edge]) -> list[Edge]:
    """``from other_module import _name`` across modules (a package may use its own submodules' names)."""
    return [e for e in es if any(n.startswith("_") and not n.startswith("__") for n in e.names)]


def _rule(mod: str, table: dict[str, tuple[str, ...]]):
    """The most specific entry of ``table`` for ``refine_llm.<mod>`` (None: no rule)."""
    name = _short(mod)
    best = None
    for key in table:
        if name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return best


def _within(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def layer_violations(es: list[Edge]) -> list[str]:
    """Edges that break ``LAYERS`` (an import between two submodules of one package is the package's own)."""
    out = []
    for e in es:
        key = _rule(e.src, LAYERS)
        src, dst = _short(e.src), _short(e.dst)
        if key is None or dst == PACKAGE or _within(dst, (key.split(".")[0],)):
            continue
        if not _within(dst, LAYERS[key]):
            out.append(f"{src}:{e.line} imports {dst} (rule {key}: {', '.join(LAYERS[key]) or 'nothing of ours'})")
    return out


def external_imports(root: Path = ROOT) -> list[tuple[str, str, int]]:
    """(module, imported top-level name, line) of every import of something outside refine_llm."""
    out = []
    for mod, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                out += [(mod, a.name.split(".")[0], node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.append((mod, node.module.split(".")[0], node.lineno))
    return [x for x in out if x[1] != PACKAGE]


def optional_violations(root: Path = ROOT) -> list[str]:
    """Imports of a heavy optional library outside its modules (``OPTIONAL``), and of the library's callers."""
    out = []
    for mod, lib, line in external_imports(root):
        if lib in OPTIONAL and not _within(_short(mod), OPTIONAL[lib]):
            out.append(f"{_short(mod)}:{line} imports {lib} (only {', '.join(OPTIONAL[lib])} may)")
        if lib in NEVER:
            out.append(f"{_short(mod)}:{line} imports {lib} (the library never imports its callers)")
    return out


def long_modules(root: Path = ROOT, limit: int = MAX_LINES) -> dict[str, int]:
    return {m: n for m, p in modules(root).items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit}


def _short(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m refine_llm.devtools.imports", description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", action="store_true", help="Print every edge of the import graph.")
    args = p.parse_args(argv)
    es = edges()
    if args.graph:
        for e in sorted(es, key=lambda e: (e.src, e.dst, e.line)):
            print(f"{_short(e.src)} -> {_short(e.dst)}" + (" (in a function)" if e.local else ""))
        return 0
    cyc = cycles(graph(es))
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(_short(m) for m in c))
    priv = private_imports(es)
    print(f"private names imported from another module: {len(priv)}")
    for e in priv:
        print(f"  {_short(e.src)}:{e.line} imports {', '.join(n for n in e.names if n.startswith('_'))} from {_short(e.dst)}")
    long = long_modules()
    print(f"modules over {MAX_LINES} lines: {len(long)}")
    for m, n in sorted(long.items()):
        print(f"  {_short(m)}: {n}")
    layers = layer_violations(es) + optional_violations()
    print(f"imports against the layer rules: {len(layers)}")
    for v in layers:
        print(f"  {v}")
    return 1 if (cyc or priv or long or layers) else 0


if __name__ == "__main__":
    sys.exit(main())
