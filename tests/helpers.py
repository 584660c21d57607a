"""Shared test helpers: run a region on DTensors and compare values and gradients with one device; expect a
LocalMapError of the documented shape (``expect_error``, the error catalogue's one helper)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pytest
import torch
from torch.distributed.tensor import Partial, Placement, Replicate, Shard

from localmap import LocalMapError, local_map
from localmap.testing import distribute, full, on_one_device

S0, S1, R, P = Shard(0), Shard(1), Replicate(), Partial()

_gen = torch.Generator().manual_seed(1234)


def randn(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A global test input: the same plain tensor whether or not a simulated mesh is active. Drawn from this
    module's generator unless `generator` is given; conftest seeds it from each test's id, so a test's inputs
    do not depend on the tests that ran before it. Inputs that must hold a property (a routing's per-rank row
    counts) pass their own seeded generator."""
    with on_one_device():
        return torch.randn(*shape, generator=_gen if generator is None else generator)


def grad_for_output(out_placements: Sequence[Placement]) -> tuple[Placement, ...]:
    """Placements to hand the upstream gradient in with: the output's own, Partial given as Replicate."""
    return tuple(R if isinstance(p, Partial) else p for p in out_placements)


def check_region(mesh: Any, body: Callable, inputs: Sequence[torch.Tensor], in_placements: Sequence[Any],
                 out_placements: Sequence[Placement], in_grad_placements: Sequence[Any] | None = None,
                 atol: float = 1e-5, seed: int = 0, expected_grads: Sequence[Any] | None = None,
                 **local_map_kwargs: Any) -> dict[str, float]:
    """Run `body` as a region on DTensors of `inputs` and check forward and backward against `body` on the
    global tensors. Returns the largest absolute differences; asserts they are within `atol`, that the output
    has the declared placements and each input gradient the declared grad placements (or `expected_grads`,
    or the input's own placements with Partial read as Replicate)."""
    with on_one_device():
        gen = torch.Generator().manual_seed(seed)
        ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        ref_out = body(*ref_inputs)
        upstream = torch.randn(ref_out.shape, generator=gen, dtype=ref_out.dtype)
        ref_out.backward(upstream)

    region = local_map(body, out_placements, in_placements, in_grad_placements, mesh, **local_map_kwargs)
    dts = [distribute(t, mesh, pl, requires_grad=True) for t, pl in zip(inputs, in_placements)]
    out = region(*dts)
    assert tuple(out.placements) == tuple(out_placements), (out.placements, out_placements)
    assert tuple(out.shape) == tuple(ref_out.shape)
    out.backward(distribute(upstream, mesh, grad_for_output(out_placements)))

    diffs = {"out": max_diff(full(out), ref_out)}
    for k, (d, ref, pl) in enumerate(zip(dts, ref_inputs, in_placements)):
        want = tuple(in_grad_placements[k]) if in_grad_placements else \
            tuple(expected_grads[k]) if expected_grads else grad_for_output(pl)
        assert tuple(d.grad.placements) == want, (k, d.grad.placements, want)
        assert d.grad.shape == ref.shape
        diffs[f"grad{k}"] = max_diff(full(d.grad), ref.grad)
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    assert not bad, f"differs from single-device result: {bad}"
    return diffs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two plain tensors of the same shape (inf if the shapes differ)."""
    with on_one_device():
        if a.shape != b.shape:
            return float("inf")
        return (a.detach() - b.detach()).abs().max().item() if a.numel() else 0.0


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max_diff scaled by the reference's magnitude (at least 1), for values that grow large."""
    with on_one_device():
        return max_diff(a, b) / max(1.0, b.detach().abs().max().item() if b.numel() else 0.0)


def expect_error(fn: Callable[[], Any], path: str, contains: tuple[str, ...] = (),
                 error: type[BaseException] = LocalMapError) -> LocalMapError:
    """Call `fn`, which must raise `error` (LocalMapError, or a documented subclass or base such as ValueError or
    the original type of a wrapped body error); the exception must be a LocalMapError whose message's first line
    is ``local_map: ...`` naming `path`, which contains every fragment of `contains`, and which has a line
    starting with ``  fix:`` (every LocalMapError says how to fix it). Returns the exception."""
    with pytest.raises(error) as info:
        fn()
    err = info.value
    assert isinstance(err, LocalMapError), f"{type(err).__name__} is not a LocalMapError: {err}"
    msg = str(err)
    lines = msg.splitlines()
    assert lines and lines[0].startswith("local_map: "), msg
    assert path in lines[0], f"path {path!r} not named on the first line of:\n{msg}"
    for fragment in contains:
        assert fragment in msg, f"{fragment!r} not in:\n{msg}"
    assert any(line.startswith("  fix:") for line in lines[1:]), f"no fix line in:\n{msg}"
    return err


class Checkpointed(torch.nn.Module):
    """Blocks run in turn, each under selective activation checkpointing with `policy`; loss mean(x ** 2)."""

    def __init__(self, blocks: Sequence[torch.nn.Module], policy: Callable) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.policy = policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import functools

        from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

        context = functools.partial(create_selective_checkpoint_contexts, self.policy)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False, context_fn=context)
        return x.pow(2).mean()


@torch.library.custom_op("localmap_test::doubled", mutates_args=())
def doubled(x: torch.Tensor) -> torch.Tensor:
    """2 * x as a custom op with no fake implementation: no trace of a body calling it can be made (on fakes or
    on values), while it runs on real and simulated tensors: the check's "unchecked" case."""
    return x * 2


doubled.register_autograd(lambda ctx, grad: grad * 2)



def proven_like_one_device(mesh: Any, body: Callable, work: Callable, inputs: Sequence[torch.Tensor],
                           in_placements: Sequence[Any], out_placements: Sequence[Placement] = (S0,)) -> None:
    """Proven under check="strict" without a warning, and values and gradients equal `work` on one device (the
    body's global meaning)."""
    import warnings

    with on_one_device():
        ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        ref_out = work(*ref_inputs)
        upstream = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(0))
        ref_out.backward(upstream)
    region = local_map(body, list(out_placements), in_placements, None, mesh, check="strict")
    dts = [distribute(t, mesh, p, requires_grad=True) for t, p in zip(inputs, in_placements)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = region(*dts)
    assert tuple(out.placements) == tuple(out_placements)
    out.backward(distribute(upstream, mesh, list(out_placements)))
    assert max_diff(full(out), ref_out) < 1e-5
    for d, ref in zip(dts, ref_inputs):
        assert max_diff(full(d.grad), ref.grad) < 1e-5
