"""The package's shape, checked by walking its source (ast): no import cycle between localmap's modules, every
import going down the layer order that docs/architecture.md states (the test reads the table there), and every
PyTorch-private name reached through the fence (``localmap.compat``) and nowhere else.

Private means a name with a leading underscore: a module path such as ``torch._ops`` or
``torch.distributed._functional_collectives``, a name imported from torch such as ``_pytree``, or an attribute
read such as ``dtensor._spec`` or ``gm.graph._codegen``. Two things are not torch's private API and are allowed
everywhere: attributes localmap defines itself (assigned somewhere in localmap, or in a class body), and ATen
operator names read from the ``aten`` namespace (``aten._to_copy``: rule tables are keyed by the ops that appear in
graphs; see docs/architecture.md).
"""

from __future__ import annotations

import ast
import os
import re
from collections import defaultdict

import localmap

PACKAGE_DIR = os.path.dirname(localmap.__file__)
SOURCE_ROOT = os.path.dirname(PACKAGE_DIR)
FENCE = "localmap.compat"
ARCHITECTURE = os.path.join(os.path.dirname(SOURCE_ROOT), "docs", "architecture.md")
LAYER_TABLE = "<!-- layer order: read by tests/unit/test_layout.py; lowest first -->"


def _module_name(path: str) -> str:
    name = os.path.relpath(path, SOURCE_ROOT)[:-3].replace(os.sep, ".")
    return name.removesuffix(".__init__")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path) as fh:
                    found[_module_name(path)] = ast.parse(fh.read(), path)
    return found


def _is_private(dotted: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in dotted.split("."))


def _own_attributes(modules: dict[str, ast.Module]) -> set[str]:
    """Attribute names localmap defines: assigned as attributes anywhere, or defined in a class body."""
    names = set()
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.ClassDef)):
                        names.add(item.name)
                    elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                        targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _is_aten_op(node: ast.Attribute) -> bool:
    base = node.value
    return (isinstance(base, ast.Name) and base.id == "aten") or (isinstance(base, ast.Attribute) and base.attr == "aten")


def _package_of(name: str, modules: dict) -> str:
    return name if os.path.exists(os.path.join(SOURCE_ROOT, *name.split("."), "__init__.py")) else name.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, module: str, modules: dict) -> str:
    if not node.level:
        return node.module or ""
    parts = _package_of(module, modules).split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _walk(modules: dict[str, ast.Module]) -> tuple[dict[str, set[str]], list[str]]:
    """Import edges between localmap modules, and private torch names used outside the fence."""
    own = _own_attributes(modules)
    edges: dict[str, set[str]] = defaultdict(set)
    private: list[str] = []
    for module, tree in modules.items():
        fenced = module == FENCE or module.startswith(FENCE + ".")
        for node in ast.walk(tree):
            where = f"{module}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("localmap"):
                        edges[module].add(alias.name)
                    elif alias.name.split(".")[0] == "torch" and _is_private(alias.name) and not fenced:
                        private.append(f"{where} import {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, modules)
                if base.startswith("localmap"):
                    for alias in node.names:
                        edges[module].add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
                elif base.split(".")[0] == "torch" and not fenced and (
                        _is_private(base) or any(_is_private(a.name) for a in node.names)):
                    private.append(f"{where} from {base} import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Attribute) and not fenced and _is_private(node.attr) \
                    and node.attr not in own and not _is_aten_op(node):
                private.append(f"{where} .{node.attr}")
    return edges, private


def _cycles(edges: dict[str, set[str]], modules: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in modules:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    modules = _modules()
    edges, _ = _walk(modules)
    assert _cycles(edges, modules) == []


def test_private_torch_names_only_inside_the_fence():
    _, private = _walk(_modules())
    assert private == [], "private PyTorch names outside localmap.compat:\n" + "\n".join(private)


def test_the_walk_sees_what_it_must_refuse():
    """The checker is not vacuous: a private import, a private attribute and a cycle are each found."""
    src = {
        "localmap.a": ast.parse("from torch._ops import OpOverload\nimport localmap.b\n"),
        "localmap.b": ast.parse("import localmap.a\ndef f(d):\n    return d._local_tensor\n"),
    }
    edges, private = _walk(src)
    assert private == ["localmap.a:1 from torch._ops import OpOverload", "localmap.b:3 ._local_tensor"]
    assert _cycles(edges, src) == [["localmap.a", "localmap.b"]]


def _layers(doc: str) -> dict[str, int]:
    """Package (or top-level module) -> its layer, from the table after LAYER_TABLE in docs/architecture.md."""
    block = doc.split(LAYER_TABLE, 1)[1].split("```")[1]
    layers = {}
    for line in block.splitlines():
        row = re.match(r"\s*(\d+)\s+(\w+(?:,\s*\w+)*)", line)
        if row:
            layers.update({name.strip(): int(row.group(1)) for name in row.group(2).split(",")})
    return layers


def _unit(module: str) -> str:
    """The layer unit a module belongs to: its package under localmap, or the top-level module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _upward(edges: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports from a unit to another on the same layer or above it."""
    wrong = []
    for module, targets in edges.items():
        for target in sorted(targets):
            here, there = _unit(module), _unit(target)
            if here != there and layers[there] >= layers[here]:
                wrong.append(f"{module} (layer {layers[here]}) imports {target} (layer {layers[there]})")
    return wrong


def _read_layers() -> dict[str, int]:
    with open(ARCHITECTURE) as fh:
        return _layers(fh.read())


def test_every_package_has_a_layer():
    layers = _read_layers()
    missing = sorted({_unit(m) for m in _modules()} - set(layers))
    assert missing == [], f"not in the layer table of docs/architecture.md: {missing}"


def test_imports_go_down_the_layers():
    edges, _ = _walk(_modules())
    wrong = _upward(edges, _read_layers())
    assert wrong == [], "imports against the layer order of docs/architecture.md:\n" + "\n".join(wrong)


def test_the_layer_check_sees_an_upward_import():
    """Not vacuous: the table parses, and an import upward or sideways is found."""
    layers = _layers(f"{LAYER_TABLE}\n```\n  0  compat, sites   nothing\n  1  check   compat\n  1  traced  x\n```\n")
    assert layers == {"compat": 0, "sites": 0, "check": 1, "traced": 1}
    edges = {"localmap.compat.dtensor": {"localmap.check.rules"}, "localmap.check.rules": {"localmap.traced.meta",
                                                                                            "localmap.compat"}}
    assert _upward(edges, layers) == [
        "localmap.compat.dtensor (layer 0) imports localmap.check.rules (layer 1)",
        "localmap.check.rules (layer 1) imports localmap.traced.meta (layer 1)"]


def test_the_module_tree_names_every_module():
    """docs/architecture.md's tree names each module of each package (a module added is documented)."""
    with open(ARCHITECTURE) as fh:
        tree = fh.read().split("```", 2)[1]
    entries = re.split(r"\n  (?=\w+/)", tree)
    text = {e.split("/", 1)[0]: e for e in entries}
    unnamed = sorted(m for m in _modules() if m.count(".") == 2 and not m.endswith("__init__")
                     and not re.search(rf"\b{m.split('.')[2]}\b", text.get(m.split(".")[1], "")))
    assert unnamed == [], f"modules missing from the tree in docs/architecture.md: {unnamed}"


MAX_FUNCTION_LINES = 60  # a function a newcomer reads in one screen


def test_no_function_over_sixty_lines():
    long = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == [], "functions over 60 lines:\n" + "\n".join(long)


def test_no_module_level_all_after_definitions():
    """``__all__`` of a module, where it has one, stands before its first definition (never mid-module)."""
    late = []
    for module, tree in _modules().items():
        first_def = next((n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))), None)
        for n in tree.body:
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets):
                if first_def is not None and n.lineno > first_def:
                    late.append(f"{module}:{n.lineno}")
    assert late == []
