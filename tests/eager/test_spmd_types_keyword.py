"""PyTorch 2.14's local_map signature (``redistribute_inputs``, ``spmd_types``) runs unchanged on localmap, on
every tested release. ``spmd_types=True`` means localmap's own check in its strict mode (README)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch.distributed.tensor.experimental import local_map as torch_local_map

from helpers import R, S0, doubled, max_diff, randn
from localmap import LocalMapError, Partial, PlacementError, Shard, local_map
from localmap.testing import distribute, full, on_one_device, simulated_mesh


def test_every_parameter_of_pytorchs_local_map_is_accepted():
    ours = inspect.signature(local_map).parameters
    for name, p in inspect.signature(torch_local_map).parameters.items():
        assert name in ours, name
        assert ours[name].kind == p.kind, (name, ours[name].kind, p.kind)
    assert "spmd_types" in ours and ours["spmd_types"].default is False


def _row_parallel(x, w):
    return x @ w


def test_code_written_for_2_14_runs_and_its_gradients_match_one_device():
    with simulated_mesh(2, ("tp",)) as mesh:
        x, w = randn(8, 4), randn(4, 4)
        f = local_map(_row_parallel, out_placements=[S0], in_placements=([S0], [R]), in_grad_placements=None,
                      device_mesh=mesh, redistribute_inputs=False, spmd_types=True)
        xd, wd = distribute(x, mesh, [S0], requires_grad=True), distribute(w, mesh, [R], requires_grad=True)
        out = f(xd, wd)
        out.backward(distribute(torch.ones(8, 4), mesh, [S0]))
        with on_one_device():
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            (xr @ wr).sum().backward()
        assert out.placements == (S0,) and max_diff(full(out), x @ w) < 1e-5
        assert wd.grad.placements == (Partial(),)  # inferred: the weight meets sharded rows
        assert max_diff(full(wd.grad), wr.grad) < 1e-5 and max_diff(full(xd.grad), xr.grad) < 1e-5


def test_a_wrong_claim_is_an_error_a_valueerror_as_in_pytorch():
    with simulated_mesh(2, ("tp",)) as mesh:
        f = local_map(_row_parallel, [R], ([S0], [R]), None, mesh, spmd_types=True)
        with pytest.raises(PlacementError, match="claimed Replicate") as info:
            f(distribute(randn(8, 4), mesh, [S0]), distribute(randn(4, 4), mesh, [R]))
        assert isinstance(info.value, ValueError)


def _untraceable(x):
    return doubled(x)  # a custom op with no fake implementation: no trace can follow it


def test_strict_refuses_a_body_the_check_cannot_trace_where_the_default_tests_it():
    with simulated_mesh(2, ("tp",)) as mesh:
        x = randn(8, 4)
        lenient = local_map(_untraceable, [S0], ([S0],), None, mesh)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the default check tests it on the call: silent
            assert max_diff(full(lenient(distribute(x, mesh, [S0]))), x * 2) < 1e-6
        assert lenient.region.verdicts()[0].status == "tested"
        strict = local_map(_untraceable, [S0], ([S0],), None, mesh, spmd_types=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # strict raises; it does not warn first
            with pytest.raises(LocalMapError, match="spmd_types=True") as info:
                strict(distribute(x, mesh, [S0]))
        assert info.value.fix and "check=True" in info.value.fix


def test_spmd_types_with_the_check_off_is_refused():
    with pytest.raises(LocalMapError, match="spmd_types") as info:
        local_map(_row_parallel, [Shard(0)], ([S0], [R]), spmd_types=True, check=False)
    assert "drop" in info.value.fix
