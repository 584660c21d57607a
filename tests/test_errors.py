"""Every bad input of local_map raises LocalMapError naming the argument path, the mesh dim where it
matters, what was expected, what was given, and the fix."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from helpers import R, S0, S1, randn
from localmap import LocalMapError, local_map
from localmap.testing import distribute, simulated_mesh


def raises(path, *fragments):
    """Context manager: a LocalMapError whose message names `path` and contains each fragment."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(LocalMapError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            msg = str(self.info.value)
            assert path in msg, f"path {path!r} not named in:\n{msg}"
            for f in fragments:
                assert f in msg, f"{f!r} not in:\n{msg}"
            assert "fix:" in msg and "local_map:" in msg
            return handled
    return _Check()


@pytest.fixture
def mesh():
    with simulated_mesh((2, 2), ("dp", "tp")) as m:
        yield m


def test_wrong_number_of_in_specs(mesh):
    f = local_map(lambda a, b: a + b, [R, R], ([R, R],))
    x = distribute(randn(4, 4), mesh, [R, R])
    with raises("in_placements", "1 entries", "2 positional arguments", "expected:", "given:"):
        f(x, x)


def test_spec_length_differs_from_mesh_ndim(mesh):
    f = local_map(lambda a: a, [R, R], ([R],))
    with raises("args[0]", "1 placements for a 2-d mesh", "('dp', 'tp')"):
        f(distribute(randn(4, 4), mesh, [R, R]))
    g = local_map(lambda a: a, [S0], ([R, R],))
    with raises("outputs", "out_placements", "1 placements for a 2-d mesh"):
        g(distribute(randn(4, 4), mesh, [R, R]))


def test_shard_dim_out_of_range_input(mesh):
    f = local_map(lambda a: a, [R, R], ([R, S1],), redistribute_inputs=True)
    x = distribute(randn(8), mesh, [R, R])
    with raises("args[0]", "Shard(1) is out of range for a 1-d tensor", "mesh dim 1 ('tp')"):
        f(x)


def test_shard_dim_out_of_range_output(mesh):
    f = local_map(lambda a: a.sum(), [R, S1], ([S0, R],))
    with raises("outputs", "Shard(1) is out of range for a 0-d tensor", "mesh dim 1 ('tp')"):
        f(distribute(randn(8), mesh, [S0, R]))


def test_dtensor_input_with_none_spec(mesh):
    f = local_map(lambda a, b: a, [R, R], ([R, R], None))
    x = distribute(randn(4), mesh, [R, R])
    with raises("args[1]", "is a DTensor but its in_placements spec is None", "(Replicate(), Replicate())"):
        f(x, x)


def test_non_tensor_input_with_spec(mesh):
    f = local_map(lambda a, k: a * k, [R, R], ([R, R], [R, R]))
    with raises("args[1]", "is not a tensor but has a placement spec", "None"):
        f(distribute(randn(4), mesh, [R, R]), 3)


def test_mismatched_placements_without_redistribute(mesh):
    f = local_map(lambda a: a, [S0, R], ([S0, R],))
    with raises("args[0]", "differ from in_placements", "mesh dim 0 ('dp')", "redistribute_inputs=True"):
        f(distribute(randn(4, 4), mesh, [R, R]))


def test_nested_argument_path(mesh):
    f = local_map(lambda xs, d: d["w"], [R, R], ([R, R], {"w": [S0, R]}))
    x = distribute(randn(4, 4), mesh, [R, R])
    with raises("args[1]['w']", "differ from in_placements", "mesh dim 0 ('dp')"):
        f([x], {"w": x})


def test_output_count_differs(mesh):
    f = local_map(lambda a: (a, a, a), ([R, R], [R, R]), ([R, R],))
    with raises("outputs", "3 output leaves", "2 specs"):
        f(distribute(randn(4), mesh, [R, R]))


def test_function_returns_dtensor(mesh):
    x = distribute(randn(4), mesh, [R, R])
    f = local_map(lambda a: x, [R, R], ([R, R],))
    with raises("outputs", "returned a DTensor", ".to_local()"):
        f(x)
    g = local_map(lambda a: (a, x), ([R, R], [R, R]), ([R, R],))
    with raises("outputs[1]", "returned a DTensor"):
        g(x)


def test_tensor_output_with_none_spec(mesh):
    f = local_map(lambda a: (a, a), ([R, R], None), ([R, R],))
    with raises("outputs[1]", "spec is None"):
        f(distribute(randn(4), mesh, [R, R]))


def test_non_tensor_output_with_spec(mesh):
    f = local_map(lambda a: (a, 3), ([R, R], [R, R]), ([R, R],))
    with raises("outputs[1]", "is not a Tensor but has a placement spec"):
        f(distribute(randn(4), mesh, [R, R]))


def test_dtensor_on_mesh_other_than_device_mesh(mesh):
    flat = init_device_mesh("cpu", (4,))
    f = local_map(lambda a: a, [R], ([R],), device_mesh=flat)
    with raises("args[0]", "different mesh than the region's"):
        f(distribute(randn(4), mesh, [R, R]))


def test_dtensors_on_different_meshes_without_device_mesh(mesh):
    flat = init_device_mesh("cpu", (4,))
    f = local_map(lambda a, b: a, [R, R])
    with raises("args[1]", "different mesh than args[0]", "device_mesh="):
        f(distribute(randn(4), mesh, [R, R]), distribute(randn(4), flat, [R]))


def test_bare_placement_is_rejected():
    with raises("in_placements", "bare Placement", "[Shard(dim=0)]"):
        local_map(lambda a: a, [R], S0)
    with raises("out_placements", "bare Placement"):
        local_map(lambda a: a, R, ([R],))
    with raises("in_placements[1]", "mixes Placements"):
        local_map(lambda a: a, [R], ([R], [R, "x"]))


def test_dtensor_keyword_argument(mesh):
    f = local_map(lambda a, *, b: a + b, [R, R], ([R, R],))
    x = distribute(randn(4), mesh, [R, R])
    with raises("kwargs['b']", "passed by keyword", "positionally"):
        f(x, b=x)


def test_prefix_structure_mismatch(mesh):
    f = local_map(lambda xs: xs[0], [R, R], ([[R, R], [R, R], [R, R]],))
    x = distribute(randn(4), mesh, [R, R])
    with raises("args[0]", "3 entries but args[0] has 2"):
        f([x, x])
    g = local_map(lambda d: d["a"], [R, R], ({"a": [R, R], "c": [R, R]},))
    with raises("args[0]", "keys that differ"):
        g({"a": x, "b": x})


def test_in_grad_placements_none_for_dtensor(mesh):
    f = local_map(lambda a, b: a + b, [R, R], ([R, R], [R, R]), ([R, R], None))
    x = distribute(randn(4), mesh, [R, R])
    with raises("args[1]", "in_grad_placements spec is None"):
        f(x, x)


def test_uneven_output_not_in_chunk_layout():
    """Ranks returning 2,3,3,2 rows (not torch.chunk's 3,3,3,1) cannot form a DTensor: said, not guessed."""
    from localmap import compat as _compat

    with simulated_mesh(4) as mesh:
        x = distribute(randn(10, 2), mesh, [S0])
        sizes = {0: 2, 1: 3, 2: 3, 3: 2}
        f = local_map(lambda a: _compat.simulated_rank_map(lambda r: torch.zeros(sizes[r], 2)), [S0], ([S0],))
        with raises("outputs", "not DTensor's chunk layout for 10 rows", "[3, 3, 3, 1]", "[2, 3, 3, 2]"):
            f(x)


def test_not_a_mesh():
    with raises("device_mesh", "is not a DeviceMesh"):
        local_map(lambda a: a, [R], ([R],), device_mesh="tp")


def test_errors_are_value_errors_with_fields(mesh):
    f = local_map(lambda a: a, [S0, R], ([S0, R],))
    with pytest.raises(ValueError) as info:
        f(distribute(randn(4, 4), mesh, [R, R]))
    err = info.value
    assert err.path == "args[0]" and err.mesh_dim == 0 and err.fix and err.expected and err.given
