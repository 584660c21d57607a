"""Behaviour of local_map beyond placement combinations: spec forms, arguments, outputs, uneven shards,
redistribution and mesh inference, each checked against the single-device computation."""

import pytest
import torch
from torch.distributed.tensor import DTensor

import localmap
from helpers import P, R, S0, S1, check_region, max_diff, randn, rel_diff
from localmap import local_map
from localmap.testing import distribute, full, on_one_device


def test_placement_classes_are_pytorchs():
    from torch.distributed.tensor import Partial, Replicate, Shard

    assert localmap.Shard is Shard and localmap.Replicate is Replicate and localmap.Partial is Partial
    assert issubclass(localmap.LocalMapError, ValueError)


def test_decorator_and_functional_forms_agree(sim_mesh_4):
    x, w = randn(8, 4), randn(4, 6)

    @local_map(out_placements=[S0], in_placements=([S0], [R]), device_mesh=sim_mesh_4)
    def deco(a, b):
        return a @ b

    func = local_map(lambda a, b: a @ b, [S0], ([S0], [R]), None, sim_mesh_4)
    xd, wd = distribute(x, sim_mesh_4, [S0]), distribute(w, sim_mesh_4, [R])
    assert max_diff(full(deco(xd, wd)), full(func(xd, wd))) == 0
    assert max_diff(full(deco(xd, wd)), x @ w) < 1e-5
    assert deco.__name__ == "deco"


def test_plain_tensors_give_plain_outputs(sim_mesh_4):
    """No DTensor argument: the function runs as is and its outputs are returned unchanged."""
    f = local_map(lambda a: a * 2, [S0], ([S0],), device_mesh=sim_mesh_4)
    with on_one_device():
        x = torch.ones(4)
        y = f(x)
        assert type(y) is torch.Tensor and torch.equal(y, x * 2)


def test_prefix_spec_for_list_and_dict_arguments(sim_mesh_4):
    """One spec for a whole list, a dict of specs for a dict: the JAX-style prefix form."""
    xs = [randn(8, 4), randn(8, 4)]
    ws = {"a": randn(4, 3), "b": randn(4, 3)}

    def body(xs, ws):
        return xs[0] @ ws["a"] + xs[1] @ ws["b"]

    f = local_map(body, out_placements=[S0], in_placements=([S0], {"a": [R], "b": [R]}),
                  in_grad_placements=([S0], [P]))  # one grad spec for the whole dict
    xds = [distribute(x, sim_mesh_4, [S0], requires_grad=True) for x in xs]
    wds = {k: distribute(w, sim_mesh_4, [R], requires_grad=True) for k, w in ws.items()}
    out = f(xds, wds)
    with on_one_device():
        ref_x = [x.clone().requires_grad_() for x in xs]
        ref_w = {k: w.clone().requires_grad_() for k, w in ws.items()}
        ref = body(ref_x, ref_w)
        ref.sum().backward()
    assert max_diff(full(out), ref) < 1e-5
    out.backward(distribute(torch.ones(8, 3), sim_mesh_4, [S0]))
    for d, r in zip(xds, ref_x):
        assert d.grad.placements == (S0,) and max_diff(full(d.grad), r.grad) < 1e-5
    for k in ws:
        assert wds[k].grad.placements == (P,) and max_diff(full(wds[k].grad), ref_w[k].grad) < 1e-5


def test_flat_form_per_leaf_still_works(sim_mesh_4):
    """PyTorch's form: one spec per flattened leaf, even for container arguments."""
    x, w = randn(8, 4), randn(4, 3)
    f = local_map(lambda pair: pair[0] @ pair[1], [S0], ([S0], [R]))
    out = f([distribute(x, sim_mesh_4, [S0]), distribute(w, sim_mesh_4, [R])])
    assert max_diff(full(out), x @ w) < 1e-5


def test_non_tensor_arguments_and_outputs(sim_mesh_4):
    x = randn(8, 4)

    def body(a, scale, name):
        return a * scale, name.upper(), None

    f = local_map(body, out_placements=([S0], None, None), in_placements=([S0], None, None))
    y, name, nothing = f(distribute(x, sim_mesh_4, [S0]), 3.0, "ok")
    assert isinstance(y, DTensor) and max_diff(full(y), x * 3) < 1e-6
    assert name == "OK" and nothing is None


def test_plain_tensor_argument_passes_through(sim_mesh_4):
    """A plain tensor next to DTensors reaches the function unchanged (PyTorch's meaning)."""
    x = randn(8, 4)
    with on_one_device():
        bias = torch.arange(4.0)
    f = local_map(lambda a, b: a + b, [S0], ([S0], [R]))
    assert max_diff(full(f(distribute(x, sim_mesh_4, [S0]), bias)), x + bias) < 1e-6


def test_keyword_arguments_pass_through(sim_mesh_4):
    """Keyword arguments reach the function unchanged; they take no spec (documented)."""
    x = randn(8, 4)
    f = local_map(lambda a, *, scale=1.0: a * scale, [S0], ([S0],))
    assert max_diff(full(f(distribute(x, sim_mesh_4, [S0]), scale=2.0)), x * 2) < 1e-6


def test_multiple_outputs_structure(sim_mesh_4):
    x = randn(8, 4)
    f = local_map(lambda a: {"double": a * 2, "sum": a.sum(0)}, out_placements={"double": [S0], "sum": [P]},
                  in_placements=([S0],))
    out = f(distribute(x, sim_mesh_4, [S0]))
    assert max_diff(full(out["double"]), x * 2) < 1e-6
    assert out["sum"].placements == (P,) and max_diff(full(out["sum"]), x.sum(0)) < 1e-5


def test_one_out_spec_for_all_outputs(sim_mesh_4):
    x = randn(8, 4)
    a, b = local_map(lambda t: (t + 1, t - 1), out_placements=[S0], in_placements=([S0],))(
        distribute(x, sim_mesh_4, [S0]))
    assert max_diff(full(a), x + 1) < 1e-6 and max_diff(full(b), x - 1) < 1e-6


def test_in_placements_none_uses_input_placements(sim_mesh_2x2):
    x = randn(8, 4)
    f = local_map(lambda a: a * 2, out_placements=[S0, S1])
    d = distribute(x, sim_mesh_2x2, [S0, S1], requires_grad=True)
    out = f(d)
    out.backward(distribute(torch.ones(8, 4), sim_mesh_2x2, [S0, S1]))
    assert max_diff(full(out), x * 2) < 1e-6
    assert d.grad.placements == (S0, S1) and max_diff(full(d.grad), torch.full((8, 4), 2.0)) < 1e-6


def test_negative_shard_dims_are_normalized(sim_mesh_4):
    x = randn(4, 8)
    check_region(sim_mesh_4, lambda a: a * 3, [x], [(S1,)], (S1,), None)
    f = local_map(lambda a: a * 3, out_placements=[localmap.Shard(-1)], in_placements=([localmap.Shard(-1)],))
    out = f(distribute(x, sim_mesh_4, [S1]))
    assert out.placements == (S1,) and max_diff(full(out), x * 3) < 1e-6


@pytest.mark.parametrize("rows", [10, 3, 1])
def test_uneven_shards_values_and_gradients(sim_mesh_4, rows):
    """10 rows on 4 ranks is 3,3,3,1; 3 rows is 1,1,1,0 (an empty shard); 1 row is 1,0,0,0."""
    x, w = randn(rows, 6), randn(6, 5)
    check_region(sim_mesh_4, lambda a, b: torch.relu(a @ b), [x, w], [(S0,), (R,)], (S0,), [(S0,), (P,)])


def test_uneven_shards_2d_nested(sim_mesh_2x2):
    """Dim 0 sharded over both mesh dims (nested) and dim 1 over one, both uneven."""
    x = randn(7, 5)
    check_region(sim_mesh_2x2, lambda a: a.sin() * 2, [x], [(S0, S0)], (S0, S0), None)
    check_region(sim_mesh_2x2, lambda a: a.sin() * 2, [x], [(S0, S1)], (S0, S1), None)


def test_uneven_output_with_changed_size(sim_mesh_4):
    """An output whose sharded dim differs from the input's still gets its true global size."""
    x = randn(10, 4)
    f = local_map(lambda a: torch.cat([a, a], dim=1), [S0], ([S0],))
    out = f(distribute(x, sim_mesh_4, [S0]))
    assert out.shape == (10, 8) and max_diff(full(out), torch.cat([x, x], 1)) < 1e-6


def test_redistribute_inputs(sim_mesh_2x2):
    x, w = randn(8, 6), randn(6, 4)
    f = local_map(lambda a, b: a @ b, out_placements=[R, S0], in_placements=([R, S0], [R, R]),
                  in_grad_placements=([R, S0], [R, P]), redistribute_inputs=True)
    xd = distribute(x, sim_mesh_2x2, [S1, R], requires_grad=True)  # needs resharding to [R, S0]
    wd = distribute(w, sim_mesh_2x2, [R, R], requires_grad=True)
    out = f(xd, wd)
    assert max_diff(full(out), x @ w) < 1e-5
    out.backward(distribute(torch.ones(8, 4), sim_mesh_2x2, [R, S0]))
    with on_one_device():
        ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
        (ref_x @ ref_w).sum().backward()
    assert max_diff(full(xd.grad), ref_x.grad) < 1e-5 and max_diff(full(wd.grad), ref_w.grad) < 1e-5


def test_upstream_gradient_with_other_placements(sim_mesh_4):
    """The gradient reaching a Shard output may come Replicate (or Partial); it is brought to Shard."""
    x = randn(8, 4)
    f = local_map(lambda a: a * 2, [S0], ([S0],))
    for upstream in ([R], [P]):
        d = distribute(x, sim_mesh_4, [S0], requires_grad=True)
        f(d).backward(distribute(torch.ones(8, 4), sim_mesh_4, upstream))
        assert max_diff(full(d.grad), torch.full((8, 4), 2.0)) < 1e-6


def test_region_then_dtensor_ops(sim_mesh_2x2):
    """A region inside a DTensor program: DTensor ops before and after, loss and backward."""
    x, w1, w2 = randn(8, 6), randn(6, 12), randn(12, 6)
    mlp_in = local_map(lambda a, b: torch.relu(a @ b), [S0, S1], ([S0, R], [R, S1]), ([S0, P], [P, S1]))
    mlp_out = local_map(lambda h, b: h @ b, [S0, P], ([S0, S1], [R, S0]), ([S0, S1], [P, S0]))
    xd = distribute(x, sim_mesh_2x2, [S0, R], requires_grad=True)
    w1d = distribute(w1, sim_mesh_2x2, [R, S1], requires_grad=True)
    w2d = distribute(w2, sim_mesh_2x2, [R, S0], requires_grad=True)
    loss = (mlp_out(mlp_in(xd * 1.5, w1d), w2d) ** 2).mean()
    loss.backward()
    with on_one_device():
        rx, r1, r2 = (t.clone().requires_grad_() for t in (x, w1, w2))
        ref = ((torch.relu((rx * 1.5) @ r1) @ r2) ** 2).mean()
        ref.backward()
    assert rel_diff(full(loss), ref) < 1e-5  # relative: the loss is near 1e2 for some draws
    for d, r in ((xd, rx), (w1d, r1), (w2d, r2)):
        assert rel_diff(full(d.grad), r.grad) < 1e-5


def test_no_grad_and_inputs_without_grad(sim_mesh_4):
    x, w = randn(8, 4), randn(4, 3)
    f = local_map(lambda a, b: a @ b, [S0], ([S0], [R]), ([S0], [P]))
    xd, wd = distribute(x, sim_mesh_4, [S0]), distribute(w, sim_mesh_4, [R], requires_grad=True)
    with torch.no_grad():
        out = f(xd, wd)
    assert not out.requires_grad and max_diff(full(out), x @ w) < 1e-5
    out = f(xd, wd)
    out.backward(distribute(torch.ones(8, 3), sim_mesh_4, [S0]))
    assert xd.grad is None and max_diff(full(wd.grad), x.sum(0)[:, None].expand(4, 3)) < 1e-5


def test_repeated_calls_use_cached_specs(sim_mesh_4):
    """Second and later calls hit the caches and still give the right placements and values."""
    f = local_map(lambda a: a + 1, [S0], ([S0],))
    for rows in (8, 12, 8):
        x = randn(rows, 4)
        out = f(distribute(x, sim_mesh_4, [S0]))
        assert out.shape == (rows, 4) and max_diff(full(out), x + 1) < 1e-6
    assert f.region.cache_info()["output_plans"] == 1


def test_decorated_method_binds_self(sim_mesh_4):
    """The wrapper is a plain function, so a decorated method gets `self` (a non-tensor with a None spec)."""
    x = randn(8, 4)

    class Scale:
        factor = 3.0

        @local_map(out_placements=[S0], in_placements=(None, [S0]))
        def apply(self, a):
            return a * self.factor

    assert max_diff(full(Scale().apply(distribute(x, sim_mesh_4, [S0]))), x * 3) < 1e-6


def test_partial_weight_gradient_spec_is_remembered_and_right(sim_mesh_4, monkeypatch):
    """A Replicate weight's Partial gradient (inferred, then given): its spec is built once per weight and
    reused on later steps, and every step's gradient equals one device's; clear_caches forgets it."""
    import localmap.eager.autograd as autograd

    built = []
    make_spec = autograd.make_spec
    monkeypatch.setattr(autograd, "make_spec", lambda *a: built.append(a[1]) or make_spec(*a))
    x, w = randn(8, 4), randn(4, 3)
    with on_one_device():
        ref = w.clone().requires_grad_()
        (x @ ref).sum().backward()
    dw = distribute(w, sim_mesh_4, [R], requires_grad=True)
    for region in (local_map(lambda a, b: a @ b, [S0], ([S0], [R])),
                   local_map(lambda a, b: a @ b, [S0], ([S0], [R]), ([S0], [P]))):
        localmap.clear_caches()
        counts = []
        for step in range(3):
            if step == 2:
                localmap.clear_caches()
            dw.grad = None
            region(distribute(x, sim_mesh_4, [S0]), dw).sum().backward()
            assert dw.grad.placements == (P,) and max_diff(full(dw.grad), ref.grad) <= 1e-5
            counts.append(built.count((P,)))
        assert counts[1] == counts[0] >= 1 and counts[2] == counts[1] + 1
