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
from localmap import PlacementError, VerificationError
from localmap.compat import pytree
from localmap.testing import fake_mesh

from localmap.cli.show import (CliError, MeshSpec, console, parse_mesh, region_table, verdict_counts,
                        verdict_is_problem, verdict_style, write_outputs)

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


def run_inspect(target: str, mesh: str | None = None, *, verify: bool = False, svg: str | None = None,
                json_path: str | None = None, out: Console | None = None) -> bool:
    """Capture FILE.py[:NAME]'s program and print its regions; True when no check (or --verify) fails."""
    out = out or console()
    path, name = split_target(target)
    module = load(path)
    program = entry_point(module, path, name)
    spec = _mesh_spec(module, path, mesh)
    label = f"{os.path.basename(path)}:{name}(mesh)"
    out.print(f"[bold]localmap inspect[/] {path}:{name} on a fake {spec} mesh")
    with fake_mesh(spec.shape, spec.names) as device_mesh, localmap.use_mesh(device_mesh):
        fn, args, reference = _unpack(program(device_mesh), label)
        if verify and _has_meta(fn, args):
            raise CliError(f"--verify runs the program, but {label} gave meta tensors; return real (small) "
                           "tensors from it")
        prog = _capture(fn, args, spec, out)
        if prog is None:
            return False
        out.print(region_table(prog, f"{label} captured: one row per region call"))
        problems = [r for r in prog.regions if verdict_is_problem(r.verdict)]
        for r in prog.regions:
            if r.verdict != "ok":
                out.print(f"  {r.name} ({r.source}): [{verdict_style(r.verdict)}]{_escape(r.verdict)}[/]", soft_wrap=True)
        write_outputs(prog, svg, json_path, out)
        verified = _verify(fn, args, reference, out) if verify else True
    ok = not problems and verified
    head = "[bold green]ok[/]" if ok else "[bold red]FAILED[/]"
    detail = f"{len(prog.regions)} regions, {verdict_counts([r.verdict for r in prog.regions])}"
    if problems:
        detail += f", placement problems in {', '.join(r.name for r in problems)}"
    if verify:
        detail += ", verify " + ("matched one device" if verified else "found a difference")
    out.print(f"{head}: {label}: {detail}", soft_wrap=True)
    return ok


def _capture(fn: Any, args: tuple, spec: MeshSpec, out: Console) -> Any:
    """The captured program; None (after printing why) when a region with check=True refuses its claims."""
    with out.status("capturing forward and backward"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check="warn" regions: their verdicts are in the table
        try:
            return localmap.capture(fn, *args)
        except PlacementError as exc:
            out.print("[bold red]placement check failed while capturing[/] (a region with check=True):")
            out.print(str(exc), markup=False)
            out.print("[bold red]FAILED[/]: fix the region, or set check='warn' on it to see the whole program")
            return None
        except localmap.LocalMapError as exc:
            raise CliError(f"with the mesh {spec}: {exc}".splitlines()[0]
                           + (f" (fix: {exc.fix})" if exc.fix else "")) from exc


def _verify(fn: Any, args: tuple, reference: Any, out: Console) -> bool:
    """localmap.verify, printed; False when it finds a difference."""
    with out.status("verifying: the captured program run rank by rank vs one device"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out.print(f"[green]verify:[/] {localmap.verify(fn, *args, reference=reference)}")
            return True
        except VerificationError as exc:
            out.print("[bold red]verify failed:[/]")
            out.print(str(exc), markup=False, soft_wrap=True)
            return False


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
