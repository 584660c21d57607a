"""``localmap inspect FILE.py[:NAME]``: capture the program a user's file defines and show its regions.

The file's convention (see the README):

    MESH = "dp=2,tp=2"                 # optional: the mesh used when --mesh is not given

    def program(mesh):                 # or another name, picked with FILE.py:NAME
        ...                            # build regions with device_mesh=mesh (or none: mesh is the default)
        return fn, args                # fn: a callable or nn.Module returning a scalar loss;
                                       # args: a tuple of example inputs (real, fake or meta tensors)
        # or: return fn, args, reference   (a single-device stand-in for fn that --verify compares with)

``program(mesh)`` is called with a fake mesh of the requested shape (a process group that sends nothing, so any
size works); the program is captured (``localmap.capture``) and its region table, each region's placement
verdict and totals are printed. ``--verify`` runs ``localmap.verify`` (real tensors needed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
import warnings
from typing import Any

from rich.console import Console

import localmap
from localmap import VerificationError
from localmap.compat import pytree
from localmap.testing import fake_mesh

from localmap.context import checking
from localmap.sites import traceback_site

from localmap.cli.show import (CliError, MeshSpec, console, error_line, escape, first_line, parse_mesh, plural, print_block, region_table,
                               short_verdict, verdict_counts, verdict_is_problem, verdict_style, write_outputs)

ENTRY = "program"
DEFAULT_MESH = "2x2"


def split_target(target: str) -> tuple[str, str]:
    """'file.py:name' -> (file.py, name); 'file.py' -> (file.py, 'program')."""
    m = re.match(r"^(.*\.py):([A-Za-z_]\w*)$", target)
    return (m.group(1), m.group(2)) if m else (target, ENTRY)


def load(path: str) -> types.ModuleType:
    """Import a Python file as a module (its folder importable while it loads)."""
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path) or not path.endswith(".py"):
        raise CliError(f"{path}: not a Python file (inspect takes FILE.py or FILE.py:NAME)")
    name = "localmap_inspect_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(folder)
    return module


def entry_point(module: types.ModuleType, path: str, name: str) -> Any:
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items()
                       if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise CliError(f"{path} defines no function {name}(mesh) (inspect's convention: def {ENTRY}(mesh) returning "
                       f"(fn, example args)); functions there: {', '.join(found) or 'none'}")
    return fn


def _mesh_spec(module: types.ModuleType, path: str, mesh: str | None) -> MeshSpec:
    declared = getattr(module, "MESH", None)
    if declared is not None and not isinstance(declared, str):
        raise CliError(f"{path}: MESH must be a string such as 'dp=2,tp=2' (got {type(declared).__name__})")
    file_spec = parse_mesh(declared) if declared else None
    if mesh is None:
        return file_spec or parse_mesh(DEFAULT_MESH)
    return parse_mesh(mesh, file_spec.names if file_spec else None)


def _unpack(result: Any, label: str) -> tuple[Any, tuple, Any]:
    import torch

    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise CliError(f"{label} must return (fn, args) or (fn, args, reference); it returned "
                       f"{type(result).__name__}")
    fn, args = result[0], result[1]
    reference = result[2] if len(result) == 3 else None
    if not callable(fn):
        raise CliError(f"{label} returned a {type(fn).__name__} as fn; expected a callable or nn.Module")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise CliError(f"{label} returned {type(args).__name__} as args; expected a tuple of example inputs")
    return fn, tuple(args), reference


def _has_meta(fn: Any, args: tuple) -> bool:
    import torch

    tensors = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    if isinstance(fn, torch.nn.Module):
        tensors += list(fn.parameters()) + list(fn.buffers())
    return any(t.is_meta for t in tensors)


_CHECK_VALUES = {"on": True, "warn": "warn", "strict": "strict", "allow_unproven": "allow_unproven", "off": False}


def _call_program(program: Any, device_mesh: Any, label: str, path: str) -> Any:
    """program(mesh); an error inside it is the user's, named by the line that raised."""
    try:
        return program(device_mesh)
    except (CliError, localmap.LocalMapError):
        raise
    except Exception as exc:
        at = traceback_site(exc.__traceback__) or path
        raise CliError(f"{label} raised {type(exc).__name__} at {at}: {first_line(exc)} (fix it there; --debug "
                       "shows the traceback)") from exc


def run_inspect(target: str, mesh: str | None = None, *, verify: bool = False, svg: str | None = None,
                json_path: str | None = None, out: Console | None = None, check: str | None = None,
                svg_level: str = "regions") -> bool:
    """Capture FILE.py[:NAME]'s program and print its regions, every verdict in full and a summary; True when
    no region is wrong (under --check strict: also none unproven or unchecked) and --verify found no difference."""
    out = out or console(stderr=json_path == "-")
    path, name = split_target(target)
    module = load(path)
    program = entry_point(module, path, name)
    spec = _mesh_spec(module, path, mesh)
    label = f"{os.path.basename(path)}:{name}(mesh)"
    out.print(f"[bold]localmap inspect[/] {escape(path)}:{name} on a fake {spec} mesh"
              + (f", --check {check}" if check else ""))
    with fake_mesh(spec.shape, spec.names) as device_mesh, localmap.use_mesh(device_mesh):
        fn, args, reference = _unpack(_call_program(program, device_mesh, label, path), label)
        if verify and _has_meta(fn, args):
            raise CliError(f"--verify runs the program, but {label} gave meta tensors; return real (small) "
                           "tensors from it")
        prog = _capture(fn, args, spec, out, check)
        if not prog.regions:
            return _no_regions(out, label)
        out.print(region_table(prog, f"{label} captured: one row per region call"))
        failing = _show_verdicts(prog, out, check)
        write_outputs(prog, svg, json_path, out, svg_level)
        verified = _verify(fn, args, reference, out) if verify else None
    return _summary(out, label, prog, failing, verified, check)


def _capture(fn: Any, args: tuple, spec: MeshSpec, out: Console, check: str | None) -> Any:
    """The captured program, every region's verdict gathered: its regions traced with check="warn" (so the first
    wrong one does not stop the capture), or with no check under --check off."""
    mode = False if check == "off" else "warn"
    with out.status("capturing forward and backward"), warnings.catch_warnings(), checking(mode):
        warnings.simplefilter("ignore")  # every verdict is printed in full below the table
        try:
            return localmap.capture(fn, *args)
        except localmap.LocalMapError as exc:
            raise CliError(f"with the mesh {spec}: {error_line(exc)}") from exc


def _effective(region: Any, check: str | None) -> Any:
    """The check mode a region is judged by: --check when given, else the region's own check=."""
    return _CHECK_VALUES[check] if check else region.check


def _fails(region: Any, check: str | None) -> bool:
    """Whether a region's verdict fails inspect: a proven problem always (unless the check is off); under
    strict, also an unproven or unchecked claim."""
    mode = _effective(region, check)
    if mode is False:
        return False
    return verdict_is_problem(region.verdict) or (mode == "strict" and region.verdict != "ok")


def _show_verdicts(prog: Any, out: Console, check: str | None) -> list:
    """Every region that is not ok, its verdict in full (each problem or unproven claim with its fix line); an ok
    region proven with a meaning that follows the mesh, its notes (check.coordinates)."""
    for r in prog.regions:
        if r.verdict == "ok" and "note:" in r.verdict_detail:
            out.print(f"[dim]note[/] {escape(r.name)} at {escape(r.source)}:")
            print_block(out, r.verdict_detail.split("\n", 1)[1])
        if r.verdict == "ok" or _effective(r, check) is False:
            continue
        mode = _effective(r, check)
        head = {True: "on", False: "off"}.get(mode, mode)
        out.print(f"[{verdict_style(r.verdict)}]{escape(short_verdict(r.verdict))}[/] {escape(r.name)} at "
                  f"{escape(r.source)} (check={head}):")
        print_block(out, r.verdict_detail or r.verdict)
    return [r for r in prog.regions if _fails(r, check)]


def _no_regions(out: Console, label: str) -> bool:
    out.print(f"[bold yellow]warning[/]: {escape(label)}: the program has no regions (no localmap.local_map "
              "region ran while it was captured); nothing to check. Hint: build the regions with "
              "localmap.local_map(...) inside program(mesh) and call them from the fn it returns")
    return True


def _summary(out: Console, label: str, prog: Any, failing: list, verified: bool | None, check: str | None) -> bool:
    verdicts = [r.verdict for r in prog.regions]
    unsettled = [r for r in prog.regions if r.verdict.startswith("unproven")
                 and _effective(r, check) not in ("allow_unproven", False)]
    ok = not failing and verified is not False
    detail = f"{plural(len(prog.regions), 'region')}, {verdict_counts(verdicts)}"
    if failing:
        detail += f", failing: {', '.join(r.name for r in failing)}"
    if verified is not None:
        detail += ", verify " + ("matched one device" if verified else "failed")
    if not ok:
        head = "[bold red]FAILED[/]"
    elif unsettled and not verified:
        head = "[bold yellow]unproven[/]"
        detail += " (run with --verify to settle them against one device)"
    else:
        head = "[bold green]ok[/]"
    out.print(f"{head}: {escape(label)}: {detail}")
    return ok


def _verify(fn: Any, args: tuple, reference: Any, out: Console) -> bool:
    """localmap.verify, printed; False when it finds a difference or its one-device reference fails."""
    with out.status("verifying: the captured program run rank by rank vs one device"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            report = localmap.verify(fn, *args, reference=reference)
        except (VerificationError, localmap.BodyError) as exc:  # a difference, or a body failing on whole tensors
            out.print("[bold red]verify failed:[/]")
            print_block(out, str(exc))
            return False
    out.print(f"[green]verify:[/] {escape(str(report).removeprefix('verified: '))}")
    return True
