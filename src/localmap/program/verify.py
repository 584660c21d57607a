"""``verify``: capture a program, run it as the mesh would, and compare it with the model on one device.

The loss and every gradient are compared with the program run on one device with its regions inlined; a
difference is traced to the first region whose output (forward) or input gradient (backward) differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from localmap.compat import pytree
from localmap.context import recording
from localmap.errors import LocalMapError
from localmap.program.capture import capture
from localmap.program.run import RunResult


class VerificationError(LocalMapError):
    """The captured program's run differs from the reference, naming the first region and tensor that differ."""


@dataclass
class VerifyReport:
    loss_diff: float
    grad_diffs: dict[str, float]
    regions_checked: int
    disagreements: list[str]

    def __str__(self) -> str:
        worst = max(self.grad_diffs.values(), default=0.0)
        return (f"verified: loss differs by {self.loss_diff:.2e}, {len(self.grad_diffs)} gradients by at most "
                f"{worst:.2e}, {self.regions_checked} regions")


def _reference(fn: Any, args: tuple, kwargs: dict) -> tuple[Any, dict, list]:
    """Loss, gradients by input name, and region records of `fn` on one device with regions inlined."""
    module = fn if isinstance(fn, torch.nn.Module) else None
    state = {k: v.detach().clone().requires_grad_(v.requires_grad)
             for k, v in (module.named_parameters() if module is not None else [])}
    buffers = dict(module.named_buffers()) if module is not None else {}
    leaves, spec = pytree.tree_flatten((args, kwargs))
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
              for t in leaves]
    a, k = pytree.tree_unflatten(leaves, spec)
    with recording("reference") as records:
        loss = torch.func.functional_call(module, {**state, **buffers}, a, k) if module is not None else fn(*a, **k)
        want = {n: t for n, t in state.items() if t.requires_grad}
        want.update({_arg_name(args, kwargs, i): t for i, t in enumerate(leaves)
                     if isinstance(t, torch.Tensor) and t.requires_grad})
        grads = torch.autograd.grad(loss, list(want.values()), allow_unused=True) if want else []
    return loss.detach(), {n: g for n, g in zip(want, grads, strict=True) if g is not None}, records


def _arg_name(args: tuple, kwargs: dict, index: int) -> str:
    path = pytree.tree_flatten_with_path((args, kwargs))[0][index][0]
    return ("args" if getattr(path[0], "idx", 1) == 0 else "kwargs") + pytree.keystr(path[1:])


def _differs(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def verify(fn: Callable | torch.nn.Module, *args: Any, reference: Callable | None = None, atol: float = 1e-5,
           rtol: float = 1e-4, **kwargs: Any) -> VerifyReport:
    """Capture `fn`, run it as the mesh would, and compare loss and gradients with `reference` (default: `fn`
    on one device with every region inlined). Raises VerificationError naming the first region that differs."""
    prog = capture(fn, *args, **kwargs)
    got = prog.run(*args, **kwargs)
    ref_loss, ref_grads, records = _reference(reference if reference is not None else fn, args, kwargs)
    problems = []
    if _differs(got.loss, ref_loss, atol, rtol):
        problems.append(f"the loss: {got.loss.item():.6g} vs {ref_loss.item():.6g}")
    for name, g in ref_grads.items():
        if name not in got.grads or _differs(got.grads[name], g, atol, rtol):
            problems.append(f"the gradient of {name}")
    report = VerifyReport(
        loss_diff=_max_diff(got.loss, ref_loss),
        grad_diffs={n: _max_diff(got.grads[n], g) for n, g in ref_grads.items() if n in got.grads},
        regions_checked=len(prog.regions), disagreements=got.disagreements)
    if not problems:
        return report
    culprit = _first_region(prog, got, records, atol, rtol)
    raise VerificationError(
        f"local_map: verify: {culprit}; as a result {problems[0]} differs"
        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        + ("\n  ranks disagree: " + "; ".join(got.disagreements) if got.disagreements else "")
        + "\n  fix: check that region's out_placements / in_grad_placements against what its body computes",
        path=culprit)


def _first_region(prog: Any, got: RunResult, records: list, atol: float, rtol: float) -> str:
    if len(records) == len(prog.regions):
        for region, record in zip(prog.regions, records):
            for i, (mine, ref) in enumerate(zip(got.region_outputs.get(region.name, []), record["outputs"])):
                if _differs(mine, ref, atol, rtol):
                    return (f"region {region.name} ({region.source}) output {i} differs by "
                            f"{_max_diff(mine, ref):.3g} (out_placements {region.out_placements[i]})")
        for region, record in reversed(list(zip(prog.regions, records))):
            mine_all = got.region_input_grads.get(region.name, [])
            for j, flat_index in enumerate(record["tensor_inputs"]):
                ref = record["input_grads"].get(flat_index)
                mine = mine_all[j] if j < len(mine_all) else None
                if ref is not None and mine is not None and _differs(mine, ref, atol, rtol):
                    return (f"region {region.name} ({region.source}) gradient of input {j} differs by "
                            f"{_max_diff(mine, ref):.3g} (in_grad_placements {region.in_grad_placements[j]})")
    return "no single region differs on its own (check the code between regions)"
