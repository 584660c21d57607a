"""The check's light trace (compat.recording) builds the graph make_fx builds on fake tensors, node by node, and
refuses what only make_fx follows (the check then traces with make_fx: docs/check-verdicts.md, "Cost and
budget")."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from localmap import collectives, compat
from localmap.check.function import _decompositions
from localmap.context import in_region
from localmap.testing import simulated_mesh

TABLE = torch.randn(4, 8)  # a tensor a body closes over: a constant in both graphs


def _signature(gm: fx.GraphModule) -> list:
    """Each node as the check reads it: op, target, arguments (nodes by position), output metadata."""
    index: dict[fx.Node, int] = {}

    def arg(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return ("node", index[a])
        if isinstance(a, (list, tuple)):
            return tuple(arg(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, arg(v)) for k, v in a.items()))
        return "device" if isinstance(a, torch.device) else repr(a)

    def val(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (tuple(v.shape), v.dtype)
        return tuple(val(x) for x in v) if isinstance(v, (list, tuple)) else None

    rows = []
    for k, node in enumerate(gm.graph.nodes):
        index[node] = k
        target = str(node.target) if node.op == "call_function" else node.op
        rows.append((node.op, target, arg(node.args), arg(node.kwargs), val(node.meta.get("val"))))
    return rows


def _both(body: Any, *inputs: torch.Tensor) -> tuple[list, list]:
    def flat(*xs: torch.Tensor) -> tuple:
        out = body(*xs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    with compat.isolated_tracing():
        light = compat.record(flat, list(inputs), _decompositions())
        fake_mode = compat.new_fake_mode()
        with fake_mode:
            fakes = [torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype) for t in inputs]
        with compat.lazy_graph_modules():
            full = compat.make_fx(flat, decomposition_table=_decompositions(), tracing_mode="fake")(*fakes)
    return _signature(light), _signature(full)


BODIES = {
    "elementwise and matmul": (lambda x, w: torch.tanh(x @ w) * 0.5 + x, [(8, 8), (8, 8)]),
    "a closed-over table and a literal": (lambda x: x + TABLE + torch.tensor(2.0), [(4, 8)]),
    "split and a reduction's two outputs": (lambda x: (*torch.split(x, 2), torch.max(x, 0).values), [(4, 8)]),
    "a factory and a view": (lambda x: (torch.zeros(4, 8) + x).view(2, 16).t(), [(4, 8)]),
    "softmax and layer norm (decomposed)": (lambda x: F.layer_norm(F.softmax(x, -1), (8,)), [(4, 8)]),
    "in place on its own value": (lambda x: (x * 1).add_(1).relu_(), [(4, 8)]),
    "a cross-entropy": (lambda x, y: F.cross_entropy(x, y.long()), [(4, 8), (4,)]),
}


@pytest.mark.parametrize("name", BODIES)
def test_the_light_trace_builds_make_fx_graph(name):
    body, shapes = BODIES[name]
    inputs = [torch.randn(*s) if len(s) > 1 else torch.randint(0, 8, s).float() for s in shapes]
    light, full = _both(body, *inputs)
    assert light == full


def test_collectives_in_a_region_trace_as_under_make_fx():
    """Functional collectives wait at once under both (the recorder answers PyTorch's "am I traced?" as make_fx
    does), and a rank's index comes from its all_to_all."""
    with simulated_mesh(4) as mesh:
        def body(x: torch.Tensor) -> torch.Tensor:
            with in_region(mesh):
                return collectives.all_reduce(x * collectives.axis_index(0), 0)

        light, full = _both(body, torch.randn(8))
    assert light == full
    assert any("wait_tensor" in row[1] for row in light)


REFUSED = {
    "a value read into Python": lambda x: x * x.sum().item(),
    "attention (its kernel is picked by the device)": lambda x: F.scaled_dot_product_attention(x, x, x),
    "a write into a closed-over tensor": lambda x: TABLE.clone().add_(1) + TABLE.add_(0) + x,
}


@pytest.mark.parametrize("name", REFUSED)
def test_the_light_trace_refuses_what_only_make_fx_follows(name):
    with compat.isolated_tracing(), pytest.raises(compat.NotRecordable):
        compat.record(lambda x: (REFUSED[name](x),), [torch.randn(2, 4, 8)], _decompositions())


def _probe_outcome(probe: Any) -> Any:
    try:
        return probe()
    except Exception:  # a question DTensor refuses (the check reads it as "no rule for these inputs")
        return "raises"


def test_dtensors_output_metadata_probe_on_meta_tensors_answers_as_its_fake_probe():
    """The check asks DTensor's propagation through a view of its propagator whose probe of the global output's
    metadata runs on meta tensors (compat.dtensor._ProbedOnMeta): it answers as DTensor's own fake-tensor probe
    does, for one and several outputs, list arguments, a factory (left to DTensor's probe) and a refused view."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._op_schema import OpSchema

    aten = torch.ops.aten
    with simulated_mesh(4) as mesh:
        def spec(shape: tuple, p: Any) -> Any:
            stride = [1] * len(shape)
            for d in reversed(range(len(shape) - 1)):
                stride[d] = stride[d + 1] * shape[d + 1]
            return compat.make_spec(mesh, (p,), shape, stride, torch.float32)

        a, b = spec((16, 8), Shard(0)), spec((8, 4), Replicate())
        questions = [(aten.mm.default, (a, b)), (aten.add.Tensor, (a, a)), (aten.exp.default, (a,)),
                     (aten.amax.default, (a, [-1], True)), (aten.view.default, (a, [4, 4, 8])),
                     (aten.view.default, (a, [3, 5])), (aten.cat.default, ([a, a], 1)),
                     (aten.split.Tensor, (a, 4)), (aten.var_mean.correction, (a, [1])),
                     (aten.zeros_like.default, (a,)), (aten.t.default, (b,))]
        prop = DTensor._op_dispatcher.sharding_propagator
        answered = []
        for op, args in questions:  # dispatch modes off, as while the check types
            schema = OpSchema(op, args, {}, schema_info=compat.dtensor._schema_info(prop, op))
            with compat.isolated_tracing():
                on_meta = _probe_outcome(
                    lambda: compat.dtensor._ProbedOnMeta(prop)._propagate_tensor_meta_non_cached(schema))
                with compat.dtensor._shared_probe_mode():
                    on_fakes = _probe_outcome(lambda: prop._propagate_tensor_meta_non_cached(schema))
            assert on_meta == on_fakes, (op, on_meta, on_fakes)
            answered.append(on_meta != "raises")
        assert answered.count(False) == 1  # only the view that fits no global shape is refused
