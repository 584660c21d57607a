"""Command line: ``localmap demo`` and ``localmap inspect`` (also ``python -m localmap ...``).

Bad input (a missing file, a file without the entry point, a mesh that does not parse or does not fit the
placements, a world size the launcher cannot start) is one line on stderr and exit status 1; ``--debug`` shows
the traceback instead. Usage errors (unknown options) are click's, exit status 2.
"""

from __future__ import annotations

import sys
from typing import Callable

import click

from localmap.cli.show import console, error_line, parse_mesh



def _guarded(debug: bool, body: Callable[[], bool]) -> None:
    """Run a command body; exit 0 when it returns True, 1 when False or on an error (one line)."""
    try:
        ok = body()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one line unless --debug
        if debug:
            raise
        console(stderr=True).print(f"[bold red]localmap: error:[/] {error_line(exc)}", markup=True,
                                   highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(0 if ok else 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Per-shard code inside global PyTorch SPMD programs."""


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
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write its report as JSON here")
@click.option("--debug", is_flag=True, help="show tracebacks")
def demo(mesh: str, launcher: str, layers: int, dim: int, experts: int, steps: int, seed: int, svg: str | None,
         json_path: str | None, debug: bool) -> None:
    """Train a small Llama-style model (attention + MoE regions) on a mesh against one device."""

    def body() -> bool:
        from localmap.cli.demo import Config, run_demo

        cfg = Config(mesh=parse_mesh(mesh), launcher=launcher, layers=layers, dim=dim, experts=experts,
                     steps=steps, seed=seed)
        return run_demo(cfg, svg=svg, json_path=json_path)

    _guarded(debug, body)


@app.command(short_help="Capture a file's program(mesh) and show its regions, checks and costs.")
@click.argument("target", metavar="FILE.py[:NAME]")
@click.option("--mesh", default=None, help="mesh, e.g. 2x2 or dp=2,tp=2 (default: the file's MESH, else 2x2)")
@click.option("--verify", is_flag=True, help="also run localmap.verify (needs real example tensors)")
@click.option("--svg", type=click.Path(dir_okay=False), help="write the captured program's picture here")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write its report as JSON here")
@click.option("--debug", is_flag=True, help="show tracebacks")
def inspect(target: str, mesh: str | None, verify: bool, svg: str | None, json_path: str | None,
            debug: bool) -> None:
    """Capture the program a file defines (a function `program(mesh)` returning (fn, example args)) and show
    its regions, their placement checks and costs."""

    def body() -> bool:
        from localmap.cli.inspector import run_inspect

        return run_inspect(target, mesh, verify=verify, svg=svg, json_path=json_path)

    _guarded(debug, body)
