"""The package's layout rules (ARCHITECTURE.md), read from the source with ``ast``:

- no import cycle between lowbit's modules, counting imports inside functions too (a lazy import that
  closes a cycle is still a cycle);
- no private name (``_x``) crosses a package: not imported from another package, not read as an
  attribute of a module imported from another package;
- what needs the ``llm`` extra (transformers, tokenizers, gguf) is imported only under ``lowbit/llm/``
  and the causal-LM task, and only inside functions there, so ``import lowbit`` works without it;
- removed names stay removed.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"
EXTRA = ("transformers", "tokenizers", "gguf", "accelerate")


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    """The package a module belongs to (a package's __init__ belongs to the package itself)."""
    path = MODULES[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = _package(module).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str], bool]]:
    """(imported lowbit module, names imported from it, at module level) for every import statement."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lowbit"):
                    out.append((a.name, [], id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if not target.startswith("lowbit"):
                continue
            names = [a.name for a in node.names]
            # `from lowbit.pkg import mod` imports the submodule lowbit.pkg.mod
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out.append((target, [n for n in names if f"{target}.{n}" not in MODULES], id(node) in top))
            out += [(s, [], id(node) in top) for s in subs]
    return [(t, n, top_level) for t, n, top_level in out if t in MODULES]


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def test_no_import_cycle() -> None:
    graph = _graph()
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    for m in graph:
        graph[m] = {t for t in graph[m] if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_package() -> None:
    bad = []
    for m in MODULES:
        pkg = _package(m)
        aliases: dict[str, str] = {}
        for target, names, _ in _imports(m):
            if _package(target) == pkg:
                continue
            bad += [f"{m} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(MODULES[m].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(m, node).startswith("lowbit"):
                base = _resolve(m, node)
                for a in node.names:
                    if f"{base}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("lowbit") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and _package(aliases[node.value.id]) != pkg):  # fmt: skip
                bad.append(f"{m} reads {aliases[node.value.id]}.{node.attr}")
    assert not bad, bad


def test_llm_extra_is_imported_lazily_and_only_where_it_belongs() -> None:
    allowed = ("lowbit.llm", "lowbit.tasks.text", "lowbit.export.io", "lowbit.export.gguf", "lowbit.cli")
    bad = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                if n.split(".")[0] in EXTRA:
                    if id(node) in top:
                        bad.append(f"{m} imports {n} at module level")
                    elif not m.startswith(allowed):
                        bad.append(f"{m} imports {n}")
    assert not bad, bad


def test_removed_names_stay_removed() -> None:
    import lowbit.data.text
    import lowbit.methods.lrqat
    import lowbit.quant.modules

    gone = {
        lowbit.quant.modules: ("quantizers",),
        lowbit.data.text: ("iterate_token_batches",),
        lowbit.methods.lrqat: ("LLAMA_TARGETS", "prepare_lrqat", "merge"),
    }
    for mod, names in gone.items():
        for n in names:
            assert not hasattr(mod, n), f"{mod.__name__}.{n}"
    assert not hasattr(lowbit.quant.modules.QuantLinear, "to_float")
    for m in ("lowbit.llm_train", "lowbit.llm_config", "lowbit.memory"):
        assert m not in MODULES
