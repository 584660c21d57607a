"""What the ``demo`` and ``inspect`` commands share: mesh strings, the terminal, the region table, errors."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

DEFAULT_NAMES = {1: ("tp",), 2: ("dp", "tp"), 3: ("pp", "dp", "tp")}


class CliError(Exception):
    """Bad input to a command: shown as one line, exit status 1 (no traceback unless --debug)."""


def console(stderr: bool = False) -> Console:
    """A rich console; wide enough for the region table when output goes to a file or a pipe."""
    out = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if out.isatty() else 160, highlight=False)


@dataclass(frozen=True)
class MeshSpec:
    shape: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return "x".join(map(str, self.shape)) + " (" + ", ".join(self.names) + ")"


_PLAIN = re.compile(r"^\s*\d+(\s*x\s*\d+)*\s*$")
_NAMED = re.compile(r"^\s*[A-Za-z_]\w*\s*=\s*\d+(\s*,\s*[A-Za-z_]\w*\s*=\s*\d+)*\s*$")


def parse_mesh(text: str, names: tuple[str, ...] | None = None) -> MeshSpec:
    """'2x2' (dims named by `names`, else dp, tp) or 'dp=2,tp=2'. Raises CliError on anything else."""
    if _NAMED.match(text):
        pairs = [p.split("=") for p in text.replace(" ", "").split(",")]
        spec = MeshSpec(tuple(int(n) for _, n in pairs), tuple(k for k, _ in pairs))
        if len(set(spec.names)) != len(spec.names):
            raise CliError(f"--mesh {text!r}: a mesh dim name appears twice")
    elif _PLAIN.match(text):
        shape = tuple(int(n) for n in text.replace(" ", "").split("x"))
        if names is None or len(names) != len(shape):
            names = DEFAULT_NAMES.get(len(shape), tuple(f"d{i}" for i in range(len(shape))))
        spec = MeshSpec(shape, tuple(names))
    else:
        raise CliError(f"--mesh {text!r} does not parse: write the sizes as 2x2 (or 4, 2x2x2), or name the dims "
                       "as dp=2,tp=2")
    if any(n < 1 for n in spec.shape):
        raise CliError(f"--mesh {text!r}: every mesh dim needs at least one rank")
    return spec


def error_line(exc: BaseException) -> str:
    """One line for an exception: its first line, with a LocalMapError's fix when it has one."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    line = lines[0]
    if not isinstance(exc, CliError) and type(exc).__name__ not in ("LocalMapError", "PlacementError"):
        line = f"{type(exc).__name__}: {line}"
    fix = getattr(exc, "fix", None)
    if fix:
        line += f" (fix: {fix})"
    return line


# The check's three verdicts (and "unchecked") as reports show them: a verdict string is "ok", "unproven: ...",
# "unchecked: ..." or a proven problem's first line.
_UNSETTLED = ("unproven", "unchecked")


def verdict_style(verdict: str) -> str:
    return "green" if verdict == "ok" else "yellow" if verdict.startswith(_UNSETTLED) else "bold red"


def short_verdict(verdict: str) -> str:
    """For a table cell: ok, unproven, unchecked, or 'PROBLEM' (the whole verdict is printed under the table)."""
    if verdict == "ok":
        return "ok"
    return next((word for word in _UNSETTLED if verdict.startswith(word)), "PROBLEM")


def verdict_is_problem(verdict: str) -> bool:
    """A proven contradiction (unproven and unchecked verdicts are reported, not failed)."""
    return verdict != "ok" and not verdict.startswith(_UNSETTLED)


def verdict_counts(verdicts: list[str]) -> str:
    """"3 checked ok, 1 unproven" for a summary line (unproven and unchecked counted only when present)."""
    words = [short_verdict(v) for v in verdicts]
    extra = "".join(f", {words.count(w)} {w}" for w in _UNSETTLED if w in words)
    return f"{words.count('ok')} checked ok{extra}"


def region_table(prog: Any, title: str = "captured program: one row per region call") -> Table:
    """The captured program's regions (placements, local shapes, per-rank costs, check verdict) and totals."""
    from localmap.program.draw import closed_over_note, local_inputs, short_number, short_placements

    table = Table(title=title, title_justify="left", show_footer=True)
    totals = prog.totals()
    checked = sum(r.verdict == "ok" for r in prog.regions)
    table.add_column("region", footer="total", no_wrap=True)
    table.add_column("source", footer=f"{totals['regions']} regions", no_wrap=True)
    table.add_column("in -> out placements")
    table.add_column("local in shapes")
    table.add_column("fwd flops", justify="right", footer=short_number(totals["flops_forward"]))
    table.add_column("bwd flops", justify="right", footer=short_number(totals["flops_backward"]))
    table.add_column("saved B", justify="right", footer=short_number(totals["activation_bytes"]))
    table.add_column("comm B", justify="right", footer=short_number(totals["comm_bytes"]))
    table.add_column("check", footer=f"{checked}/{len(prog.regions)} ok")
    for r in prog.regions:
        table.add_row(
            r.name, _short_source(r.source),
            " ".join(short_placements(p) for p in r.in_placements) + " -> " + " ".join(short_placements(p) for p in r.out_placements),
            local_inputs(r),
            short_number(r.flops["forward"]), short_number(r.flops["backward"]), short_number(r.activation_bytes), short_number(r.comm_bytes),
            f"[{verdict_style(r.verdict)}]{_escape(short_verdict(r.verdict))}[/]",
        )
    note = closed_over_note(prog)
    if note:
        table.caption, table.caption_justify = _escape(note), "left"
    return table


def _short_source(source: str) -> str:
    """file.py:line (the directory dropped; the JSON report keeps the whole path)."""
    import os

    return os.path.basename(source)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def write_outputs(prog: Any, svg: str | None, json_path: str | None, out: Console) -> None:
    """--svg / --json: the captured program's picture and report."""
    if json_path:
        with open(json_path, "w") as f:
            f.write(prog.to_json())
        out.print(f"wrote {json_path} (report as JSON)")
    if svg:
        prog.save_svg(svg)
        out.print(f"wrote {svg} (picture of the forward program)")
