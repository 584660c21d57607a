"""``verify``: capture a program, run it as the mesh would, and compare it with the model on one device.

The loss and every gradient are compared with the program run on one device with its regions inlined; a
difference is traced to the first region whose output (forward) or input gradient (backward) differs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

from localmap.compat import outside_simulation, pytree
from localmap.context import recording
from localmap.errors import LocalMapError
from localmap.program.capture import capture
from localmap.program.run import RunResult
from localmap.program.split import global_value
from localmap.traced.closure import ParamInfo, holding, module_state, program_params


RTOL = 1e-4  # verify's default: a difference up to RTOL x the tensor's largest magnitude ...
ATOL = 1e-5  # ... plus ATOL (for tensors that are all near zero) is rounding


class VerificationError(LocalMapError):
    """The captured program's run differs from the reference, naming the first region and tensor that differ."""


@dataclass
class VerifyReport:
    """What verify compared. Differences are (largest absolute, largest relative to the reference's scale)."""

    loss_diff: float  # absolute
    grad_diffs: dict[str, float]  # input name -> largest absolute difference of its gradient
    regions_checked: int
    disagreements: list[str]  # Replicate outputs whose ranks held different values
    grad_rel_diffs: dict[str, float] = field(default_factory=dict)  # input name -> relative to the gradient's scale
    region_diffs: dict[str, tuple[float, float]] = field(default_factory=dict)  # region -> (abs, rel), outputs
    #                                                                            and input gradients together
    rtol: float = RTOL
    atol: float = ATOL

    def __str__(self) -> str:
        worst = max(self.grad_diffs.values(), default=0.0)
        worst_rel = max(self.grad_rel_diffs.values(), default=0.0)
        grads, regions = len(self.grad_diffs), self.regions_checked
        return (f"verified: loss differs by {self.loss_diff:.2e}, {grads} gradient{'' if grads == 1 else 's'} by at "
                f"most {worst:.2e} ({worst_rel:.1e} of their scale), {regions} region{'' if regions == 1 else 's'}")


def _reference(fn: Any, args: tuple, kwargs: dict) -> tuple[Any, dict, list]:
    """Loss, gradients by input name, and region records of `fn` on one device with regions inlined. A DTensor
    parameter or buffer is its full tensor there (a body reading it gets the full tensor as its local one)."""
    module = fn if isinstance(fn, torch.nn.Module) else None
    own = module_state(module) if module is not None else {}
    buffers = {k for k, _ in module.named_buffers()} if module is not None else set()
    # Parameters and DTensors held as attributes: one-device copies; plain buffers: themselves.
    state = {k: v if k in buffers and not isinstance(v, DTensor) else _one_device(v).requires_grad_(v.requires_grad)
             for k, v in own.items()}
    stand_ins = {id(t): (t, ParamInfo(n, v.device_mesh, tuple(v.placements)))
                 for n, v, t in _dtensor_state(module, state)}
    leaves, spec = pytree.tree_flatten((args, kwargs))
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
              for t in leaves]
    a, k = pytree.tree_unflatten(leaves, spec)
    # The module holds the copies through the backward too: a checkpoint recomputes its forward there.
    held = holding(module, state) if module is not None else contextlib.nullcontext()
    with outside_simulation(), recording("reference") as records, program_params(stand_ins), held:
        loss = fn(*a, **k)
        want = {n: t for n, t in state.items() if t.requires_grad}
        want.update({_arg_name(args, kwargs, i): t for i, t in enumerate(leaves)
                     if isinstance(t, torch.Tensor) and t.requires_grad})
        grads = torch.autograd.grad(loss, list(want.values()), allow_unused=True) if want else []
    return loss.detach(), {n: g for n, g in zip(want, grads, strict=True) if g is not None}, records


def _one_device(t: torch.Tensor) -> torch.Tensor:
    return global_value(t.detach()) if isinstance(t, DTensor) else t.detach().clone()


def _dtensor_state(module: torch.nn.Module | None, swapped: dict) -> list[tuple[str, DTensor, torch.Tensor]]:
    """(name, the module's DTensor, its one-device stand-in) for each DTensor of its state (module_state)."""
    if module is None:
        return []
    return [(n, v, swapped[n]) for n, v in module_state(module).items() if isinstance(v, DTensor)]


def _arg_name(args: tuple, kwargs: dict, index: int) -> str:
    path = pytree.tree_flatten_with_path((args, kwargs))[0][index][0]
    return ("args" if getattr(path[0], "idx", 1) == 0 else "kwargs") + pytree.keystr(path[1:])


def _scale(t: torch.Tensor) -> float:
    """A tensor's scale: its largest magnitude."""
    return t.detach().float().abs().max().item() if t.numel() else 0.0


def _diffs(a: Any, b: Any) -> tuple[float, float]:
    """(largest absolute difference, that divided by the reference's scale); inf when the shapes differ."""
    if a.shape != b.shape:
        return math.inf, math.inf
    absolute = (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0
    scale = _scale(b)
    return absolute, (absolute / scale if scale else (0.0 if absolute == 0 else math.inf))


def _differs(a: Any, b: Any, atol: float, rtol: float) -> bool:
    """Whether `a` differs from reference `b` by more than atol + rtol * (b's scale) anywhere (a NaN differs).
    Relative to the tensor's scale, not to each element: float32 rounding grows with the magnitudes summed, so a
    small element of a large gradient carries the error of the large ones."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    absolute, _ = _diffs(a, b)
    return not absolute <= atol + rtol * _scale(b)


def verify(fn: Callable | torch.nn.Module, *args: Any, reference: Callable | None = None, atol: float = ATOL,
           rtol: float = RTOL, **kwargs: Any) -> VerifyReport:
    """Capture `fn`, run it as the mesh would, and compare loss and gradients with `reference` (default: `fn`
    on one device with every region inlined). A tensor matches when it differs by at most atol + rtol x its
    largest magnitude. Raises VerificationError naming the first region that differs."""
    prog = capture(fn, *args, **kwargs)
    got = prog.run(*args, **kwargs)
    ref_loss, ref_grads, records = _reference(reference if reference is not None else fn, args, kwargs)
    problems = []
    if _differs(got.loss, ref_loss, atol, rtol):
        problems.append(f"the loss: {got.loss.item():.6g} vs {ref_loss.item():.6g}")
    for name, g in ref_grads.items():
        if name not in got.grads or _differs(got.grads[name], g, atol, rtol):
            problems.append(f"the gradient of {name}")
    pairs = _region_pairs(prog, got, records)
    grad_diffs = {n: _diffs(got.grads[n], g) for n, g in ref_grads.items() if n in got.grads}
    report = VerifyReport(
        loss_diff=_diffs(got.loss, ref_loss)[0], grad_diffs={n: d[0] for n, d in grad_diffs.items()},
        regions_checked=len(prog.regions), disagreements=got.disagreements,
        grad_rel_diffs={n: d[1] for n, d in grad_diffs.items()}, region_diffs=_region_diffs(pairs), rtol=rtol,
        atol=atol)
    if not problems:
        return report
    culprit = _first_region(pairs, atol, rtol)
    raise VerificationError(
        f"local_map: verify: {culprit}; as a result {problems[0]} differs"
        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        + ("\n  ranks disagree: " + "; ".join(got.disagreements) if got.disagreements else "")
        + f"\n  given:    tolerance {atol:g} + {rtol:g} x each tensor's largest magnitude"
        + "\n  fix:      check that region's out_placements / in_grad_placements against what its body computes",
        path=culprit)


def _region_pairs(prog: Any, got: RunResult, records: list) -> list[tuple[Any, str, int, Any, Any]]:
    """(region, "output" or "gradient of input", index, the run's tensor, the reference's), outputs in program
    order, then input gradients in backward order; none when the reference's regions do not line up."""
    if len(records) != len(prog.regions):
        return []
    pairs = []
    for region, record in zip(prog.regions, records, strict=True):
        for i, (mine, ref) in enumerate(zip(got.region_outputs.get(region.name, []), record["outputs"])):
            pairs.append((region, "output", i, mine, ref))
    for region, record in reversed(list(zip(prog.regions, records, strict=True))):
        mine_all = got.region_input_grads.get(region.name, [])
        for j, flat_index in enumerate(record["tensor_inputs"]):
            ref = record["input_grads"].get(flat_index)
            mine = mine_all[j] if j < len(mine_all) else None
            if isinstance(ref, torch.Tensor) and isinstance(mine, torch.Tensor):
                pairs.append((region, "gradient of input", j, mine, ref))
    return pairs


def _region_diffs(pairs: list) -> dict[str, tuple[float, float]]:
    """Per region, the largest absolute and relative differences over its outputs and input gradients."""
    out: dict[str, tuple[float, float]] = {}
    for region, _, _, mine, ref in pairs:
        if isinstance(mine, torch.Tensor) and isinstance(ref, torch.Tensor):
            absolute, relative = _diffs(mine, ref)
            old = out.get(region.name, (0.0, 0.0))
            out[region.name] = (max(old[0], absolute), max(old[1], relative))
    return out


def _first_region(pairs: list, atol: float, rtol: float) -> str:
    for region, what, i, mine, ref in pairs:
        if _differs(mine, ref, atol, rtol):
            absolute, relative = _diffs(mine, ref)
            claim = (f"out_placements {region.out_placements[i]}" if what == "output"
                     else f"in_grad_placements {region.in_grad_placements[i]}")
            return (f"region {region.name} ({region.source}) {what} {i} differs by {absolute:.3g} "
                    f"({relative:.2g} of its scale) ({claim})")
    return "no single region differs on its own (check the code between regions)"
