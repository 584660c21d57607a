"""What the ``demo`` and ``inspect`` commands share: mesh strings, the terminal, the region table, errors."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

DEFAULT_NAMES = {1: ("tp",), 2: ("dp", "tp"), 3: ("pp", "dp", "tp")}


class CliError(Exception):
    """Bad input to a command: shown as one line, exit status 1 (no traceback unless --debug)."""


PIPE_WIDTH = 160  # output to a file or a pipe, when COLUMNS does not say otherwise


def console(stderr: bool = False) -> Console:
    """A rich console as wide as COLUMNS says, else the terminal, else PIPE_WIDTH (a file or a pipe)."""
    out = sys.stderr if stderr else sys.stdout
    told = os.environ.get("COLUMNS", "").isdigit() or out.isatty()
    return Console(stderr=stderr, width=None if told else PIPE_WIDTH, highlight=False)


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


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def error_line(exc: BaseException) -> str:
    """One line for an exception: its first line (with its type unless it is localmap's own), and a
    LocalMapError's fix when it has one (a wrapped body error: where to look)."""
    from localmap.errors import CHAINED, LocalMapError

    line = first_line(exc)
    if not isinstance(exc, (CliError, LocalMapError)):
        line = f"{type(exc).__name__}: {line}"
    fix = getattr(exc, "fix", None)
    if fix == CHAINED:
        fix = "fix the line named; --debug shows the traceback"
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


def compact_placements(placements: Any) -> str:
    """A placement spec for a narrow table cell: S0,R for (Shard(0), Replicate()); P for Partial(sum)."""
    if placements is None:
        return "-"
    short = []
    for p in placements:
        text = repr(p)
        dim = re.fullmatch(r"(?:_Strided)?Shard\(dim=(-?\d+).*\)", text)
        short.append("R" if text == "Replicate()" else "P" if text == "Partial(sum)" else
                     f"P({text[8:-1]})" if text.startswith("Partial(") else f"S{dim.group(1)}" if dim else text)
    return ",".join(short)


def region_table(prog: Any, title: str = "captured program: one row per region call") -> Table:
    """The captured program's regions (placements, local shapes, per-rank costs, check verdict) and totals.
    Narrow enough for 100 columns: the source under the region's name, compact placements, cells that wrap."""
    from localmap.program.draw import closed_over_note, local_inputs, short_number

    table = Table(title=title, title_justify="left", show_footer=True)
    totals = prog.totals()
    checked = sum(r.verdict == "ok" for r in prog.regions)
    flops = f"{short_number(totals['flops_forward'])}/{short_number(totals['flops_backward'])}"
    table.add_column("region / source", footer=f"total: {plural(totals['regions'], 'region')}", no_wrap=True)
    table.add_column("in -> out placements", overflow="fold")
    table.add_column("local in shapes", overflow="fold")
    table.add_column("flops fwd/bwd", justify="right", footer=flops, no_wrap=True)
    table.add_column("saved B", justify="right", footer=short_number(totals["activation_bytes"]), no_wrap=True)
    table.add_column("comm B", justify="right", footer=short_number(totals["comm_bytes"]), no_wrap=True)
    table.add_column("check", footer=f"{checked}/{len(prog.regions)} ok", no_wrap=True)
    for r in prog.regions:
        table.add_row(
            f"{escape(r.name)}\n[dim]{escape(_short_source(r.source))}[/]",
            escape(" ".join(compact_placements(p) for p in r.in_placements) + " -> "
                    + " ".join(compact_placements(p) for p in r.out_placements)),
            escape(local_inputs(r)),
            f"{short_number(r.flops['forward'])}/{short_number(r.flops['backward'])}",
            short_number(r.activation_bytes), short_number(r.comm_bytes),
            f"[{verdict_style(r.verdict)}]{escape(short_verdict(r.verdict))}[/]",
        )
    note = closed_over_note(prog)
    if note:
        table.caption, table.caption_justify = escape(note), "left"
    return table


def print_block(out: Console, text: str, indent: int = 2) -> None:
    """A multi-line message (a verdict or an error in full) indented, each line wrapped at the console's width
    with its continuation indented further (no trailing spaces, nothing cut)."""
    import textwrap

    for line in text.splitlines():
        lead = indent + len(line) - len(line.lstrip())
        out.print(textwrap.fill(line.strip(), max(out.width, 40), initial_indent=" " * lead,
                                subsequent_indent=" " * (lead + 2), break_on_hyphens=False, break_long_words=True),
                  markup=False, highlight=False, soft_wrap=True)


def plural(count: int, noun: str) -> str:
    """'1 region', '2 regions'."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _short_source(source: str) -> str:
    """file.py:line (the directory dropped; the JSON report keeps the whole path)."""
    import os

    return os.path.basename(source)


def escape(text: str) -> str:
    """`text` shown as it is inside rich markup (square brackets are not styles)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def write_outputs(prog: Any, svg: str | None, json_path: str | None, out: Console,
                  svg_level: str = "regions") -> None:
    """--svg / --json: the captured program's picture and report (`--json -`: the report on stdout, the rest of
    the output on stderr)."""
    if json_path == "-":
        sys.stdout.write(prog.to_json() + "\n")
        sys.stdout.flush()
    elif json_path:
        with open(json_path, "w") as f:
            f.write(prog.to_json())
        out.print(f"wrote {escape(json_path)} (report as JSON)")
    if svg:
        prog.save_svg(svg, svg_level)
        what = "regions and the data flow between them" if svg_level == "regions" else "every op"
        out.print(f"wrote {escape(svg)} (picture of the forward program: {what})")
