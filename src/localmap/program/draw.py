"""Showing a captured program: a text report of its regions and a Graphviz picture of its forward graph."""

from __future__ import annotations

import inspect
import operator
import os
import re
import shutil
import subprocess
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from localmap.errors import fail
from localmap.traced.operator import local_map_hop


def short_placements(placements: Any) -> str:
    if placements is None:
        return "-"
    short = {"Replicate()": "R", "Partial(sum)": "P"}
    return "(" + ",".join(short.get(repr(p), repr(p).replace("Shard(dim=", "S(")) for p in placements) + ")"


def short_number(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def local_inputs(region: Any) -> str:
    """A region's local input shapes; the DTensor parameters its body reads (its last inputs) by name."""
    shapes = ["x".join(map(str, s)) if s else "-" for s in region.local_in_shapes]
    first = len(shapes) - len(region.closed_over)
    return " ".join(shapes[:first] + [f"{name}={s}" for name, s in zip(region.closed_over, shapes[first:])])


def closed_over_note(prog: Any) -> str:
    """One line naming the module's DTensor parameters regions read (program inputs, sharded per region)."""
    read = {n for r in prog.regions for n in r.closed_over}
    if not read:
        return ""
    return "DTensor parameters read inside regions (program inputs, each rank gets its shard): " + ", ".join(
        f"{n} {short_placements(p.placements)}" for n, p in prog.dtensor_params.items() if n in read)


def report(prog: Any) -> str:
    """A table of regions (placements, local shapes, per-rank FLOPs, saved bytes, communication) and totals."""
    rows = [("region", "source", "in -> out placements", "local in shapes", "fwd flops", "bwd flops",
             "saved B", "comm B", "check")]
    for r in prog.regions:
        rows.append((
            r.name, r.source,
            " ".join(short_placements(p) for p in r.in_placements) + " -> " + " ".join(short_placements(p) for p in r.out_placements),
            local_inputs(r),
            short_number(r.flops["forward"]), short_number(r.flops["backward"]), short_number(r.activation_bytes), short_number(r.comm_bytes),
            r.verdict if len(r.verdict) < 60 else r.verdict[:57] + "...",
        ))
    t = prog.totals()
    rows.append(("total", f"{t['regions']} region" + ("" if t["regions"] == 1 else "s"), "", "", short_number(t["flops_forward"]), short_number(t["flops_backward"]),
                 short_number(t["activation_bytes"]), short_number(t["comm_bytes"]),
                 f"{sum(r.verdict == 'ok' for r in prog.regions)}/{len(prog.regions)} ok"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = closed_over_note(prog)
    return "\n".join(lines + ([note] if note else []))


# ---- pictures -------------------------------------------------------------------------------------------------

LEVELS = ("regions", "ops")
_FILL = {"ok": "#dcefdc", "unproven": "#fbf0c8", "unchecked": "#fbf0c8"}  # anything else is a problem: red


def _label(lines: list[str], width: int = 56) -> str:
    """A quoted DOT label of these lines: each wrapped at `width` characters, escaped once, left-aligned (DOT's
    own line break, added after escaping, so it stays a line break)."""
    import textwrap

    wrapped = [part for line in lines
               for part in (textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False) or [""])]
    return '"' + "".join(part.replace("\\", "\\\\").replace('"', '\\"') + "\\l" for part in wrapped) + '"'


def input_labels(prog: Any) -> dict[str, str]:
    """Forward placeholder -> the input's name as the model spells it: parameter and buffer names, and for
    positional arguments of a module the forward's own parameter names (`tokens` for args[0])."""
    names = list(prog.input_names)
    positional = _forward_parameters(prog.module)
    for i, name in enumerate(names):
        m = re.fullmatch(r"args\[(\d+)\](.*)", name)
        if m and int(m.group(1)) < len(positional):
            names[i] = positional[int(m.group(1))] + m.group(2)
    labels = {}
    for node in prog.forward.graph.find_nodes(op="placeholder"):
        m = re.fullmatch(r"primals_(\d+)", node.name)  # the joint's inputs, in capture's input order
        index = int(m.group(1)) - 1 if m else -1
        labels[node.name] = names[index] if 0 <= index < len(names) else node.name
    return labels


def _forward_parameters(module: Any) -> list[str]:
    if module is None:
        return []
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _shape_of(node: fx.Node) -> str:
    val = node.meta.get("val")
    return "x".join(map(str, val.shape)) if isinstance(val, torch.Tensor) else ""


def _region_box(r: Any) -> str:
    def specs(placements: Any) -> str:
        return " ".join(short_placements(p) for p in placements)

    word = r.verdict.split(":")[0]
    text = [r.name, f"at {os.path.basename(r.source)}", f"in   {specs(r.in_placements)}",
            f"out  {specs(r.out_placements)}", f"local in  {local_inputs(r)}",
            "local out " + " ".join("x".join(map(str, s)) or "scalar" for s in r.local_out_shapes if s is not None),
            f"flops fwd {short_number(r.flops['forward'])}, bwd {short_number(r.flops['backward'])}; "
            f"saved {short_number(r.activation_bytes)} B; comm {short_number(r.comm_bytes)} B", f"check: {word}"]
    return (f'  "{r.forward_node}" [shape=box, style="filled,rounded", fillcolor="{_FILL.get(word, "#f6d0d0")}", '
            f"label={_label(text)}];")


class _RegionPicture:
    """The forward graph drawn as regions: the global code between them is collapsed into one note per stretch
    (claimed backwards from each region's arguments, in program order, so each op is drawn once)."""

    def __init__(self, prog: Any) -> None:
        self.regions = {r.forward_node: r for r in prog.regions}
        self.names = input_labels(prog)
        self.state = _state_names(prog.module)
        self.lines = ["digraph localmap {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
                      '  edge [color="#555555"];']
        self.edges: list[tuple[str, str]] = []
        self.owner: dict[fx.Node, str] = {}  # a global op -> the note it is counted in
        self.drawn: set[str] = set()  # inputs drawn as their own node

    def source(self, node: fx.Node) -> fx.Node | None:
        """The region node or program input a value comes straight from (through getitem), else None."""
        if node.op == "placeholder" or node.name in self.regions:
            return node
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0].name in self.regions:
            return node.args[0]
        return None

    def input_node(self, node: fx.Node) -> str:
        if node.name not in self.drawn:
            self.drawn.add(node.name)
            self.lines.append(f'  "{node.name}" [shape=ellipse, label={_label([self.names[node.name], _shape_of(node)])}];')
        return node.name

    def stretch(self, target: str, starts: list[fx.Node]) -> None:
        """Edges into `target` from regions, inputs and earlier notes; the global ops between in one note."""
        note, ops, reads, feeds = f"{target}_code", [], [], []
        direct = [s for s in starts if self.source(s) is not None]  # region arguments that are inputs or outputs
        self.edges += [(self.input_node(s) if s.op == "placeholder" else self.source(s).name, target) for s in direct]
        todo = [s for s in starts if s not in direct]
        while todo:
            node = todo.pop()
            src = self.source(node)
            if src is not None and src.op == "placeholder" and self.names[src.name] in self.state:
                reads.append(self.names[src.name])  # a parameter that global code reads: named in the note
            elif src is not None:
                feeds.append(self.input_node(src) if src.op == "placeholder" else src.name)
            elif node in self.owner:
                feeds.append(self.owner[node])
            elif node.op == "call_function":
                self.owner[node] = note
                ops.append(node)
                todo.extend(node.all_input_nodes)
        counted = [_op_name(n) for n in ops if n.target is not operator.getitem]
        if counted:
            common = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in Counter(counted).most_common(6))
            text = [f"global code: {len(counted)} ops", common] + (
                [f"reads {', '.join(dict.fromkeys(reads))}"] if reads else [])
            self.lines.append(f'  "{note}" [shape=note, style=filled, fillcolor="#eeeeee", fontsize=9, '
                              f"label={_label(text)}];")
            self.edges += [(f, note) for f in feeds] + [(note, target)]
        else:
            self.edges += [(f, target) for f in feeds]

    def dot(self, gm: fx.GraphModule) -> str:
        for node in gm.graph.nodes:
            if node.name in self.regions and node.op == "call_function":
                self.lines.append(_region_box(self.regions[node.name]))
                self.stretch(node.name, [a for a in node.args[1:] if isinstance(a, fx.Node)])
            elif node.op == "output":
                self.lines.append('  "output" [shape=doublecircle, label="loss"];')
                outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
                self.stretch("output", [o for o in outs[:1] if isinstance(o, fx.Node)])
        edges = [f'  "{a}" -> "{b}";' for a, b in dict.fromkeys(self.edges) if a != b]
        return "\n".join(self.lines + edges + ["}"])


def _state_names(module: Any) -> set[str]:
    if module is None:
        return set()
    return {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}


def _op_name(node: fx.Node) -> str:
    name = str(getattr(node.target, "__name__", node.target))
    return name.split(".")[0]


def to_dot(prog: Any, level: str = "regions") -> str:
    """Graphviz DOT of the forward program. level="regions" (default): one box per region call (name, source
    line, placements in -> out, local shapes, costs, check), inputs named as in the model, the global code
    between regions collapsed into notes; level="ops": every op of the forward graph."""
    if level not in LEVELS:
        raise fail("to_dot: level", "is not a picture level", expected=" or ".join(map(repr, LEVELS)), given=repr(level),
                   fix="pass level='regions' (regions and the data flow between them) or level='ops'")
    return _RegionPicture(prog).dot(prog.forward) if level == "regions" else _op_dot(prog)


def _op_dot(prog: Any) -> str:
    """Every op of the forward graph; regions as boxes, inputs named as in the model."""
    regions = {r.forward_node: r for r in prog.regions}
    names = input_labels(prog)
    gm: fx.GraphModule = prog.forward
    lines = ["digraph localmap {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];']
    shown: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr",) or (node.op == "call_function" and node.target is operator.getitem):
            continue
        if node.op == "call_function" and node.target is local_map_hop and node.name in regions:
            lines.append(_region_box(regions[node.name]))
        elif node.op == "placeholder":
            lines.append(f'  "{node.name}" [shape=ellipse, label={_label([names[node.name], _shape_of(node)])}];')
        elif node.op == "output":
            lines.append(f'  "{node.name}" [shape=doublecircle, label="output"];')
        else:
            lines.append(f'  "{node.name}" [shape=plaintext, label={_label([_op_name(node)])}];')
        shown[node] = node.name
    for node in shown:
        for src in node.all_input_nodes:
            while src not in shown and src.all_input_nodes:  # through getitem to the region node
                src = src.all_input_nodes[0]
            if src in shown:
                lines.append(f'  "{shown[src]}" -> "{shown[node]}";')
    lines.append("}")
    return "\n".join(dict.fromkeys(lines))  # drop duplicate edges, keep order


def save_svg(prog: Any, path: str, level: str = "regions") -> str:
    """Render to_dot(level) with Graphviz's `dot` into a file at `path`: SVG, or PNG when `path` ends in .png."""
    dot = shutil.which("dot")
    if dot is None:
        raise fail("save_svg", "needs Graphviz's `dot` program, which is not installed",
                   fix="install it (`apt-get install graphviz`; `make demo`/`make test` do this), or use to_dot()")
    kind = "png" if path.lower().endswith(".png") else "svg"
    subprocess.run([dot, f"-T{kind}", "-o", path], input=to_dot(prog, level), text=True, check=True, timeout=120)
    return path
