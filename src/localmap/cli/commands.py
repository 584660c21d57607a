"""Command line: ``localmap demo`` and ``localmap inspect`` (also ``python -m localmap ...``).

Bad input (a missing file, a file without the entry point, a mesh that does not parse or does not fit the
placements, a world size the launcher cannot start) is one line on stderr and exit status 1; ``--debug`` shows
the traceback instead. Usage errors (unknown options, bad choices) are one line too, exit status 2.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import click

from localmap.cli.show import CliError, console, error_line, escape, parse_mesh

CHECK_CHOICES = ("on", "warn", "strict", "allow_unproven", "off")  # inspect --check: check= True ... False


def _guarded(debug: bool, body: Callable[[], bool]) -> None:
    """Run a command body; exit 0 when it returns True, 1 when False or on an error (one line). Under torchrun,
    bad input (the same on every rank) is printed by rank 0 alone."""
    try:
        ok = body()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one line unless --debug
        if debug:
            raise
        if not (isinstance(exc, CliError) and os.environ.get("RANK", "0") != "0"):
            console(stderr=True).print(f"[bold red]localmap: error:[/] {escape(error_line(exc))}", markup=True,
                                       highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(0 if ok else 1)


_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2: a group called without a command


class _OneLineUsage(click.Group):
    """click's usage errors as one line (`localmap: error: ... (see localmap demo --help)`), exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except _NO_ARGS as exc:  # `localmap` alone: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "localmap"
            console(stderr=True).print(f"[bold red]localmap: error:[/] {escape(exc.format_message())} (see "
                                       f"{escape(where)} --help)", highlight=False, soft_wrap=True)
            sys.exit(2)
        except click.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineUsage, context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Per-shard code inside global PyTorch SPMD programs."""


_SVG_LEVEL = click.option("--svg-level", type=click.Choice(["regions", "ops"]), default="regions", show_default=True,
                          help="the picture: regions and the data flow between them, or every op")
_JSON = click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
                     help="write its report as JSON here ('-': to stdout, the rest to stderr)")


@app.command(short_help="Train a Llama-style model with regions on a mesh against one device.")
@click.option("--mesh", default="2x2", show_default=True, help="DPxTP mesh, e.g. 2x2 or dp=2,tp=2")
@click.option("--launcher", type=click.Choice(["sim", "gloo"]), default="sim", show_default=True,
              help="sim: every rank simulated in this process; gloo: one process per rank on loopback "
                   "(under torchrun the ranks are torchrun's)")
@click.option("--layers", default=2, show_default=True, type=int)
@click.option("--dim", default=32, show_default=True, type=int)
@click.option("--experts", default=4, show_default=True, type=int, help="MoE experts, sharded over tp")
@click.option("--steps", default=5, show_default=True, type=int, help="SGD steps")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--svg", type=click.Path(dir_okay=False), help="write the captured program's picture here")
@_SVG_LEVEL
@_JSON
@click.option("--debug", is_flag=True, help="show tracebacks")
def demo(mesh: str, launcher: str, layers: int, dim: int, experts: int, steps: int, seed: int, svg: str | None,
         svg_level: str, json_path: str | None, debug: bool) -> None:
    """Train a small Llama-style model (attention + MoE regions) on a mesh against one device."""

    def body() -> bool:
        from localmap.cli.demo import Config, run_demo

        cfg = Config(mesh=parse_mesh(mesh), launcher=launcher, layers=layers, dim=dim, experts=experts,
                     steps=steps, seed=seed)
        return run_demo(cfg, svg=svg, json_path=json_path, svg_level=svg_level)

    _guarded(debug, body)


@app.command(short_help="Capture a file's program(mesh) and show its regions, checks and costs.")
@click.argument("target", metavar="FILE.py[:NAME]")
@click.option("--mesh", default=None, help="mesh, e.g. 2x2 or dp=2,tp=2 (default: the file's MESH, else 2x2)")
@click.option("--verify", is_flag=True, help="also run localmap.verify (needs real example tensors)")
@click.option("--svg", type=click.Path(dir_okay=False), help="write the captured program's picture here")
@_SVG_LEVEL
@_JSON
@click.option("--check", type=click.Choice(CHECK_CHOICES), default=None,
              help="check every region this way instead of its own check= (default: each region's own); "
                   "strict also fails on unproven and unchecked regions, off checks nothing")
@click.option("--debug", is_flag=True, help="show tracebacks")
def inspect(target: str, mesh: str | None, verify: bool, svg: str | None, svg_level: str, json_path: str | None,
            check: str | None, debug: bool) -> None:
    """Capture the program a file defines (a function `program(mesh)` returning (fn, example args)) and show
    its regions, their placement checks and costs."""

    def body() -> bool:
        from localmap.cli.inspector import run_inspect

        return run_inspect(target, mesh, verify=verify, svg=svg, json_path=json_path, check=check,
                           svg_level=svg_level)

    _guarded(debug, body)
