"""Showing a captured program: a text report of its regions and a Graphviz picture of its forward graph."""

from __future__ import annotations

import operator
import shutil
import subprocess
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
    rows.append(("total", f"{t['regions']} regions", "", "", short_number(t["flops_forward"]), short_number(t["flops_backward"]),
                 short_number(t["activation_bytes"]), short_number(t["comm_bytes"]),
                 f"{sum(r.verdict == 'ok' for r in prog.regions)}/{len(prog.regions)} ok"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = closed_over_note(prog)
    return "\n".join(lines + ([note] if note else []))


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(prog: Any) -> str:
    """Graphviz DOT of the forward program: regions as boxes labelled with placements and shapes."""
    regions = {r.forward_node: r for r in prog.regions}
    gm: fx.GraphModule = prog.forward
    lines = ["digraph localmap {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];']
    shown: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr",) or (node.op == "call_function" and node.target is operator.getitem):
            continue
        if node.op == "call_function" and node.target is local_map_hop and node.name in regions:
            r = regions[node.name]
            label = (f"{r.name}\\n{r.source}\\nin {' '.join(short_placements(p) for p in r.in_placements)}"
                     f"\\nout {' '.join(short_placements(p) for p in r.out_placements)}"
                     f"\\nlocal {' '.join('x'.join(map(str, s)) for s in r.local_in_shapes if s)}")
            lines.append(f'  "{node.name}" [shape=box, style="filled,rounded", fillcolor="#dbe9f6", '
                         f'label="{_esc(label)}"];')
        elif node.op == "placeholder":
            val = node.meta.get("val")
            shape = "x".join(map(str, val.shape)) if isinstance(val, torch.Tensor) else ""
            lines.append(f'  "{node.name}" [shape=ellipse, label="{_esc(node.name)}\\n{shape}"];')
        elif node.op == "output":
            lines.append(f'  "{node.name}" [shape=doublecircle, label="output"];')
        else:
            lines.append(f'  "{node.name}" [shape=plaintext, label="{_esc(str(getattr(node.target, "__name__", node.target)))}"];')
        shown[node] = node.name
    for node in gm.graph.nodes:
        if node not in shown:
            continue
        for src in node.all_input_nodes:
            while src not in shown and src.all_input_nodes:  # through getitem to the region node
                src = src.all_input_nodes[0]
            if src in shown:
                lines.append(f'  "{shown[src]}" -> "{shown[node]}";')
    lines.append("}")
    return "\n".join(dict.fromkeys(lines))  # drop duplicate edges, keep order


def save_svg(prog: Any, path: str) -> str:
    """Render to_dot() with Graphviz's `dot` into an SVG file at `path`."""
    dot = shutil.which("dot")
    if dot is None:
        raise fail("save_svg", "needs Graphviz's `dot` program, which is not installed",
                   fix="install it (`apt-get install graphviz`; `make demo`/`make test` do this), or use to_dot()")
    subprocess.run([dot, "-Tsvg", "-o", path], input=to_dot(prog), text=True, check=True, timeout=120)
    return path
