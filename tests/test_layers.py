"""The layering docs/architecture.md draws, checked against the import graph of the source:
every module imports only modules of its own layer or of layers below it, the modules of one
layer import each other without a cycle, and nothing outside the lab imports the lab."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

#: The layers from the bottom up, as docs/architecture.md draws them: a module's layer is the
#: first whose prefixes match its dotted name (without the leading ``adasum.``).
LAYERS = [
    ("kernels", ["_ops", "_kernels", "_triton", "_triton_kernels", "_chunked"]),
    ("data", ["_layout", "_order", "_buffers", "_noise", "_version"]),
    ("algorithms", ["_torch", "_plan", "_p2p", "_stats", "_groups", "_exit", "_check", "_vhdd", "_reduce", "_sharded",
                    "_broadcast"]),
    ("reducers", ["_reducer", "_adasum", "_baselines", "_hierarchical", "_background", "__init__"]),
    ("front doors", ["ddp", "fsdp", "optim", "tensorflow", "keras", "jax", "horovod", "hf", "lightning", "launch"]),
    ("lab", ["lab"]),
]


def layer_of(module: str) -> int:
    name = module.removeprefix("adasum.") if module != "adasum" else "__init__"
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of docs/architecture.md: add it there and here")


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "adasum").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path) -> set[str]:
    """The adasum modules ``module`` imports, at any depth of its code (imports inside
    functions count: they are the same dependency, taken later)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            # ``from adasum import _kernels`` imports the module adasum._kernels.
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in ALL}
    return {m for m in found if m in ALL and m != module}


ALL = modules()


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a layer above the importer's."""
    return sorted(
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)
    )


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """The import cycles of ``graph``, each once per module that closes it."""
    done, found = set(), []

    def visit(m: str, stack: list[str]) -> None:
        if m in stack:
            found.append(" -> ".join(stack[stack.index(m):] + [m]))
        elif m not in done:
            for d in sorted(graph.get(m, ())):
                visit(d, stack + [m])
            done.add(m)

    for m in sorted(graph):
        visit(m, [])
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports. A package's __init__ importing its own submodules is
    how it re-exports them, and a submodule importing its package is the same package: neither
    is an edge."""
    return {
        m: {d for d in imports(m, p) if not m.startswith(d + ".") and not d.startswith(m + ".")}
        for m, p in ALL.items()
    }


def test_every_module_imports_only_its_layer_and_below():
    assert not upward(graph()), "\n".join(upward(graph()))


def test_no_import_cycles_between_modules():
    assert not cycles(graph()), "\n".join(cycles(graph()))


def test_the_checks_find_a_planted_upward_import_and_a_planted_cycle():
    planted = graph()
    planted["adasum._ops"] = planted["adasum._ops"] | {"adasum.ddp"}
    assert upward(planted) == ["adasum._ops (kernels) imports adasum.ddp (front doors)"]
    planted = graph()
    planted["adasum._layout"] = planted["adasum._layout"] | {"adasum._check"}  # _check imports _layout
    assert any(c.startswith("adasum._check -> adasum._layout -> adasum._check") for c in cycles(planted))
