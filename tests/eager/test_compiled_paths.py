"""torch.compile regressions of issue 19, each compared with eager and with one device on a simulated mesh
(aot_eager): Partial('avg') gradient scaling, regions returning several tensors (tuple, list, dict, nested;
torchtitan's FusedQKVLinear._split and ChunkedLossWrapper._chunk), regions made from torch.nn.functional
functions inside the compiled function, and PyTorch's simulator failing on some 2-D programs (docs/compile.md).
Real gloo processes with inductor: tests/distributed/test_compile.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from helpers import R, S0, S1, doubled, max_diff, randn
from localmap import LocalMapError, Partial, clear_caches, local_map
from localmap import collectives as C
from localmap.core.refusals import SIMULATED_COMPILE
from localmap.testing import distribute, full, on_one_device

AVG = Partial("avg")
S2 = Shard(2)


def _run(fn, mesh, leaves, placements, backend):
    """fn on DTensors of `leaves` (eagerly, or compiled with `backend`): the scalar it returns, each leaf's
    gradient, the gradients' placements, all global."""
    if backend != "eager":
        torch.compiler.reset()
        fn = torch.compile(fn, backend=backend, fullgraph=True)
    clear_caches()
    ds = [distribute(t, mesh, p, requires_grad=True) for t, p in zip(leaves, placements)]
    loss = fn(*ds)
    loss.backward()
    return [full(loss)] + [full(d.grad) for d in ds], [tuple(d.grad.placements) for d in ds]


def _one_device(fn, leaves):
    """fn on the global tensors: its value and the leaves' gradients."""
    with on_one_device():
        ts = [t.clone().requires_grad_() for t in leaves]
        loss = fn(*ts)
        loss.backward()
        return [loss.detach()] + [t.grad for t in ts]


def _assert_all_close(got, want, atol=1e-4):
    """Within `atol` relative to the values' scale (at least 1): float32 sums of a few hundred differ in the
    last bits by summation order, which a compiled graph may change."""
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
        assert max_diff(a, b) <= atol * scale, (k, max_diff(a, b), scale)


# ---- 1. Partial('avg') gradients ------------------------------------------------------------------------------

_AVG_CASES = {
    # a Partial('avg') output: each rank's local value gets 1/n of the output's gradient
    "output Partial('avg')": (lambda a, b: (a @ b).mean(0), [AVG], ([S0], [R]), [[S0], [R]], lambda a, b: (a @ b).mean(0)),
    # a Partial('avg') input whose gradient is Replicate: n times the local gradient
    "input Partial('avg')": (lambda a, b: a @ b, [AVG], ([R], [AVG]), [[R], [AVG]], lambda a, b: a @ b),
}


@pytest.mark.parametrize("case", sorted(_AVG_CASES))
def test_partial_avg_gradients_as_eagerly(sim_mesh_4, case):
    """Compiled, DTensor's own to_local/from_local carry the gradient without the Partial('avg') scaling the
    eager path applies (placements.algebra): the gradients were n times too large (n/n for the input case's
    weight, n for its other input). Now the same as eager and one device."""
    body, out, ins, placements, reference = _AVG_CASES[case]
    mesh = sim_mesh_4
    region = local_map(body, out, ins)
    leaves = [randn(8, 3), randn(3, 2)]

    def step(x, w):
        return (region(x, w).redistribute(mesh, [R]) ** 2).sum()

    eager, eager_pl = _run(step, mesh, leaves, placements, "eager")
    got, got_pl = _run(step, mesh, leaves, placements, "aot_eager")
    assert got_pl == eager_pl
    _assert_all_close(got, eager, 1e-5)
    _assert_all_close(got, _one_device(lambda x, w: (reference(x, w) ** 2).sum(), leaves))


# ---- 9. several outputs -------------------------------------------------------------------------------------

_STRUCTURES = {
    "tensor": (lambda a: a * 2, [S0]),
    "tuple": (lambda a: (a * 2, a + 1, a.sin()), ([S0], [S0], [S0])),
    "list": (lambda a: [a * 2, a.cos()], [[S0], [S0]]),
    "dict": (lambda a: {"y": a * 2, "z": a.sin()}, {"y": [S0], "z": [S0]}),
    "nested": (lambda a: (a * 2, {"z": [a + 1, a.sin()]}), ([S0], {"z": [[S0], [S0]]})),
}


def _weighted_sum(out):
    """A scalar from every tensor of an output structure, each weighted differently (a leaf lost or swapped
    changes it)."""
    leaves = [out] if isinstance(out, torch.Tensor) else torch.utils._pytree.tree_leaves(out)
    total = 0
    for k, t in enumerate(leaves):
        t = t.redistribute(t.device_mesh, [R]) if isinstance(t, DTensor) else t
        total = total + ((t ** 2) * (k + 1)).sum()
    return total


def _skeleton(out):
    """The output structure with each leaf's kind in its place (a DTensor and a tensor are both tensors)."""
    return torch.utils._pytree.tree_map(lambda t: "tensor" if isinstance(t, torch.Tensor) else repr(t), out)


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("fullgraph", [True, False])
@pytest.mark.parametrize("structure", list(_STRUCTURES))
def test_outputs_keep_their_structure(sim_mesh_4, structure, fullgraph, check):
    """A region returning a flat tuple of tensors returned only the first under torch.compile (no treespec for
    a flat tuple): every structure now comes back as eagerly, with the same values and gradients."""
    body, out = _STRUCTURES[structure]
    region = local_map(body, out, ([S0],), check=check)
    x = randn(8, 3)
    with on_one_device():
        want = body(x)

    results = {}
    for mode in ("eager", "compiled"):
        clear_caches()
        fn = region if mode == "eager" else torch.compile(region, backend="aot_eager", fullgraph=fullgraph)
        torch.compiler.reset()
        dx = distribute(x, sim_mesh_4, [S0], requires_grad=True)
        got = fn(dx)
        _weighted_sum(got).backward()
        results[mode] = (_skeleton(got), [full(t) for t in torch.utils._pytree.tree_leaves(got)], full(dx.grad))
    reference = _one_device(lambda a: _weighted_sum(body(a)), [x])
    assert results["compiled"][0] == results["eager"][0] == _skeleton(want)
    _assert_all_close(results["compiled"][1], torch.utils._pytree.tree_leaves(want), 1e-5)
    _assert_all_close([results["compiled"][2]], [results["eager"][2]], 1e-5)
    _assert_all_close([results["compiled"][2]], reference[1:])


def _split_qkv(t, hpk, hd):
    """torchtitan's FusedQKVLinear._split (its split of the fused projection; a tuple of three)."""
    b, s = t.shape[0], t.shape[1]
    xq, xk, xv = torch.split(t, [hpk, 1, 1], dim=-2)
    return xq.reshape(b, s, -1, hd).contiguous(), xk.reshape(b, s, -1, hd).contiguous(), \
        xv.reshape(b, s, -1, hd).contiguous()


def test_fused_qkv_split_compiled(sim_mesh_4):
    """torchtitan's FusedQKVLinear: `xq, xk, xv = local_map(_split, ...)(qkv)` with the kv heads sharded. With
    a batch of 3 the unpacking of the first output alone went through silently with wrong values. (After
    tests/eager/test_compiled.py in one process it failed in AOT autograd's partitioner, 'Node tangents_5 was
    invalid, but is output': a stale mesh from DTensor's sharding-propagation cache; docs/compile.md.)"""
    mesh = sim_mesh_4
    hpk, hd = 2, 2
    qkv = randn(3, 2, 4, hpk + 2, hd)  # [batch, seq, kv heads, heads per kv + 2, head dim]
    p = (S2,)

    def attention_inputs(qkv):
        split = local_map(lambda t: _split_qkv(t, hpk, hd), out_placements=(p,) * 3, in_placements=(p,),
                          in_grad_placements=(p,), device_mesh=qkv.device_mesh)
        xq, xk, xv = split(qkv)
        return sum(((t.redistribute(mesh, [R]) ** 2) * (k + 1)).sum() for k, t in enumerate((xq, xk, xv)))

    eager, _ = _run(attention_inputs, mesh, [qkv], [p], "eager")
    got, _ = _run(attention_inputs, mesh, [qkv], [p], "aot_eager")
    _assert_all_close(got, eager, 1e-5)
    _assert_all_close(got, _one_device(
        lambda t: sum(((u ** 2) * (k + 1)).sum() for k, u in enumerate(_split_qkv(t, hpk, hd))), [qkv]))


def test_chunked_loss_chunks_compiled(sim_mesh_4):
    """torchtitan's ChunkedLossWrapper._chunk: the local sequence shard split into equal chunks by a region
    returning a tuple; each chunk's loss, summed. Each chunk is the same chunk of every rank's shard, so its
    global value is those rows of every shard."""
    mesh, chunks = sim_mesh_4, 2
    h, w = randn(2, 16, 3), randn(3, 5)

    def chunk_local(t):
        size = t.shape[1] // chunks
        return tuple(c.contiguous() for c in torch.split(t, [size] * chunks, dim=1))

    def step(h, w):
        p = h.placements
        pieces = local_map(chunk_local, out_placements=(p,) * chunks, in_placements=(p,),
                           device_mesh=h.device_mesh)(h)
        return sum(((c @ w) ** 2).sum() * (k + 1) for k, c in enumerate(pieces)), [c.detach() for c in pieces]

    results = {}
    for mode in ("eager", "aot_eager"):
        fn = step if mode == "eager" else torch.compile(step, backend="aot_eager", fullgraph=True)
        torch.compiler.reset()
        clear_caches()
        dh, dw = distribute(h, mesh, [S1], requires_grad=True), distribute(w, mesh, [R], requires_grad=True)
        loss, pieces = fn(dh, dw)
        loss.backward()
        results[mode] = [full(loss), full(dh.grad), full(dw.grad)] + [full(c) for c in pieces]
    with on_one_device():  # chunk k of the global value: rows k of each rank's 4 rows, in 2-row chunks
        want_pieces = [h.view(2, 4, chunks, 2, 3)[:, :, k].reshape(2, 8, 3) for k in range(chunks)]
        mask = torch.tensor([(row % 4) // 2 + 1.0 for row in range(16)]).view(1, 16, 1)
    reference = _one_device(lambda a, b: (((a @ b) ** 2) * mask).sum(), [h, w])
    assert len(results["aot_eager"]) == 3 + chunks
    _assert_all_close(results["aot_eager"], results["eager"], 1e-5)
    _assert_all_close(results["aot_eager"], reference + want_pieces)


# ---- 10. regions made from torch.nn.functional inside the compiled function --------------------------------

# interpolate with Dynamo only: AOT autograd's functionalization of its _unsafe_index on the simulator's
# LocalTensor fails with PyTorch's own local_map too (docs/compile.md); gloo runs it with inductor.
_FUNCTIONAL = {
    "silu": (lambda x: local_map(F.silu, [S0], ([S0],))(x), lambda x: F.silu(x), "aot_eager"),
    "interpolate": (lambda x: local_map(F.interpolate, [S0], ([S0],))(x, scale_factor=2, mode="nearest"),
                    lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), "eager"),
}


@pytest.mark.parametrize("name", sorted(_FUNCTIONAL))
def test_functional_region_made_while_compiling(sim_mesh_4, name):
    """`local_map(F.silu, ...)` made inside the compiled function failed in Dynamo at the functools.wraps of
    region construction ("missing tp_iter": Dynamo cannot iterate a torch function's attribute dict)."""
    region_call, reference, backend = _FUNCTIONAL[name]
    mesh = sim_mesh_4

    def step(x):
        return (region_call(x).redistribute(mesh, [R]) ** 2).sum()

    x = randn(8, 2, 3)
    eager, _ = _run(step, mesh, [x], [[S0]], "eager")
    got, _ = _run(step, mesh, [x], [[S0]], backend)
    _assert_all_close(got, eager, 1e-5)
    _assert_all_close(got, _one_device(lambda t: (reference(t) ** 2).sum(), [x]))


def test_functional_wrapper_keeps_its_metadata_eagerly():
    wrapped = local_map(F.silu, [S0], ([S0],))
    assert wrapped.__name__ == "silu" and wrapped.__wrapped__ is F.silu


# ---- 8. PyTorch's simulator on a 2-D mesh ------------------------------------------------------------------

def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


_SIMULATOR_2D = ("PyTorch's simulator (LocalTensor) on a 2-D mesh: a compiled function's DTensor output whose local "
                 "shard has size 1 in its first dim gets its backward tangent's metadata guessed as a plain tensor "
                 "('expected SubclassCreationMeta, got PlainTensorMeta' in AOT autograd); plain DTensor ops fail "
                 "the same, real process groups are not affected (docs/compile.md)")


@pytest.mark.xfail(raises=AssertionError, reason=_SIMULATOR_2D, strict=False)
@pytest.mark.parametrize("program", ["plain DTensor", "PyTorch's local_map"])
def test_simulator_2d_output_tangent_without_localmap(sim_mesh_2x2, program):
    """The failure of issue 19 item 8, reproduced without localmap's regions: only PyTorch's DTensor, its own
    local_map, its simulator and torch.compile."""
    from torch.distributed.tensor.experimental import local_map as torch_local_map

    mesh = sim_mesh_2x2
    x = distribute(randn(2, 8, 4), mesh, [S0, S1], requires_grad=True)  # local batch 1
    w = distribute(randn(4), mesh, [R, R], requires_grad=True)
    body = _rms if program == "plain DTensor" else \
        torch_local_map(_rms, [S0, S1], ([S0, S1], [R, R]), ([S0, S1], [Partial(), Partial()]), mesh)
    torch.compiler.reset()
    out = torch.compile(body, backend="aot_eager", fullgraph=True)(x, w)
    (out * 3).sum().backward()


@pytest.mark.xfail(raises=AssertionError, reason=_SIMULATOR_2D, strict=False)
def test_simulator_2d_sequence_parallel_rms_norm_output(sim_mesh_2x2):
    """The same failure with localmap's region: the compiled function returns the region's output."""
    mesh = sim_mesh_2x2
    region = local_map(_rms, [S0, S1], ([S0, S1], [R, R]))
    x = distribute(randn(2, 8, 4), mesh, [S0, S1], requires_grad=True)
    w = distribute(randn(4), mesh, [R, R], requires_grad=True)
    torch.compiler.reset()
    (torch.compile(region, backend="aot_eager", fullgraph=True)(x, w) * 3).sum().backward()


STALE_SHARDING_CACHE = ("PyTorch's DTensor: its sharding-propagation caches key specs by mesh equality, so a new "
                        "simulated world is handed specs holding the ended world's mesh; compiling a Partial output "
                        "then asks the simulator for that mesh's coordinates under FakeTensorMode (docs/compile.md)")


def _contract_in_two_worlds(world):
    """A sharded contraction (a Partial output) compiled with aot_eager in two simulated worlds one after the
    other, each made by `world()`; returns the second world's compiled value and the one-device value."""
    def contract(x, w):
        return x @ w

    for _ in range(2):
        with world() as mesh:
            xs, ws = randn(4, 8), randn(8, 6)
            x = distribute(xs, mesh, [Shard(1)], requires_grad=True)
            w = distribute(ws, mesh, [Shard(0)], requires_grad=True)
            torch.compiler.reset()
            out = torch.compile(contract, backend="aot_eager", fullgraph=True)(x, w)
            assert out.placements == (Partial(),)
            got = full(out)
    with on_one_device():
        return got, xs @ ws


@pytest.mark.compile
def test_partial_output_compiled_in_a_second_simulated_world():
    """A second simulated world in one process failed to compile a Partial output (BackendCompilerFailed,
    'Please convert all Tensors to FakeTensors first'), which made the compiled matrix cells order-dependent:
    localmap.testing.simulated_mesh now drops DTensor's sharding-propagation caches when its world ends."""
    from localmap.testing import simulated_mesh

    got, want = _contract_in_two_worlds(lambda: simulated_mesh(4))
    assert max_diff(got, want) < 1e-5


@pytest.mark.compile
@pytest.mark.xfail(raises=torch._dynamo.exc.BackendCompilerFailed, reason=STALE_SHARDING_CACHE, strict=True)
def test_second_world_stale_sharding_cache_without_localmap():
    """The cause, with PyTorch's own simulator set up by hand (fake process group, LocalTensorMode), which keeps
    DTensor's caches across worlds."""
    try:
        _contract_in_two_worlds(_plain_simulated_world)
    finally:  # leave no stale entry for the tests after this one
        from localmap.compat import forget_ended_world
        forget_ended_world()


@contextlib.contextmanager
def _plain_simulated_world():
    """PyTorch's simulator set up by hand, without localmap.testing: a fake process group of 4 and LocalTensorMode."""
    import torch.distributed as dist
    from torch.distributed._local_tensor import LocalTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        with LocalTensorMode(4):
            yield init_device_mesh("cpu", (4,))
    finally:
        dist.destroy_process_group()


# ---- a view of a tensor after an in-place op on it, under AOT autograd on the simulator ------------------------

VIEW_AFTER_IN_PLACE = ("PyTorch's simulator under AOT autograd: a view taken after an in-place op (std's backward: "
                       "masked_fill_ then unsqueeze) is regenerated untraced inside LocalTensor's aliasing fix-up and "
                       "enters the graph as a constant ('Unexpected fake buffer _tensor_constant0'); docs/compile.md")


def _std_step(x):
    return (x.std(1) + x.var(1)).pow(2).sum()


@pytest.mark.compile
@pytest.mark.parametrize("program", ["localmap region", "plain DTensor"])
def test_view_after_in_place_compiled_on_the_simulator(sim_mesh_4, program):
    """std over an unsharded dim (its backward makes a view of a tensor it filled in place) and a sum's backward
    expanding the simulator's all_reduce result (written in place) compiled with aot_eager on the simulated mesh:
    they failed in AOT autograd until localmap.testing.simulated_mesh brought such views up to date while tracing
    (compat.local_tensor_mode). Compared with eager and with one device."""
    from localmap import collectives as C

    def region_step(x):
        def body_fn(t):
            return t.std(1) + t.var(1) + (t * C.pvary(C.all_reduce(t.sum(0, keepdim=True), 0), 0)).sum(1)

        body = local_map(body_fn, (S0,), ((S0,),), None, sim_mesh_4)
        return body(x).pow(2).sum()

    def region_reference(x):
        return (x.std(1) + x.var(1) + (x * x.sum(0, keepdim=True)).sum(1)).pow(2).sum()

    step, reference = (region_step, region_reference) if program == "localmap region" else (_std_step, _std_step)
    leaves = [randn(8, 4)]
    eager, _ = _run(step, sim_mesh_4, leaves, [[S0]], "eager")
    got, _ = _run(step, sim_mesh_4, leaves, [[S0]], "aot_eager")
    _assert_all_close(got, eager, 1e-5)
    _assert_all_close(got, _one_device(reference, leaves))


@pytest.mark.compile
@pytest.mark.xfail(raises=torch._dynamo.exc.BackendCompilerFailed, reason=VIEW_AFTER_IN_PLACE, strict=True)
def test_view_after_in_place_without_localmap():
    """The cause, with PyTorch's own simulator set up by hand and plain DTensor ops: x.std(1) compiled."""
    try:
        with _plain_simulated_world() as mesh:
            x = distribute(randn(8, 4), mesh, [S0], requires_grad=True)
            torch.compiler.reset()
            torch.compile(_std_step, backend="aot_eager", fullgraph=True)(x).backward()
    finally:
        from localmap.compat import forget_ended_world
        forget_ended_world()


@pytest.mark.parametrize("batch", [2, 4])
def test_sequence_parallel_rms_norm_on_2d_mesh(sim_mesh_2x2, batch):
    """The sequence-parallel RMSNorm region on the 2-D simulated mesh, compiled, equals eager and one device:
    with its loss inside the compiled function (any batch), or returned with a local batch above 1."""
    mesh = sim_mesh_2x2
    region = local_map(_rms, [S0, S1], ([S0, S1], [R, R]))
    leaves, placements = [randn(batch, 8, 4), randn(4)], [[S0, S1], [R, R]]

    def step(x, w):
        return (region(x, w).redistribute(mesh, [R, R]) ** 2).sum()

    eager, eager_pl = _run(step, mesh, leaves, placements, "eager")
    got, got_pl = _run(step, mesh, leaves, placements, "aot_eager")
    assert got_pl == eager_pl == [(S0, S1), (Partial(), Partial())]
    _assert_all_close(got, eager, 1e-5)
    _assert_all_close(got, _one_device(lambda x, w: (_rms(x, w) ** 2).sum(), leaves))
    if batch > 2:  # the region's output returned, its backward from outside the compiled function
        x = distribute(leaves[0], mesh, placements[0], requires_grad=True)
        torch.compiler.reset()
        (torch.compile(region, backend="aot_eager", fullgraph=True)(x, distribute(leaves[1], mesh, [R, R])) * 3
         ).sum().backward()
        _assert_all_close([full(x.grad)], _one_device(lambda t: (_rms(t, leaves[1]) * 3).sum(), leaves[:1])[1:])


DYNAMO_HASATTR = ("PyTorch's Dynamo answers hasattr(dtensor, 'to_local') False (a DTensor method outside "
                  "all_tensor_attrs reads as a GetAttrVariable), on 2.13 and 2.14.1; docs/compile.md")


@pytest.mark.compile
@pytest.mark.xfail(raises=AssertionError, reason=DYNAMO_HASATTR, strict=True)
def test_dynamo_hasattr_of_a_dtensor_method_without_localmap(sim_mesh_4):
    """Why the catalogue's closed-over weights read `isinstance(w, DTensor)`: a body that asked
    `hasattr(w, "to_local")` computed with the DTensor itself when compiled and failed in Dynamo (mixed
    torch.Tensor and DTensor). No localmap region here: plain Dynamo on a DTensor."""
    w = distribute(randn(6, 8), sim_mesh_4, [S1])
    eager = hasattr(w, "to_local")
    torch.compiler.reset()
    compiled = torch.compile(lambda x: x + (1 if hasattr(w, "to_local") else 0), backend="eager", fullgraph=True)
    with on_one_device():
        got = bool(compiled(torch.zeros(1)).item())
    assert got == eager, f"compiled hasattr(w, 'to_local') is {got}, eagerly {eager}"


SIMULATOR_FACTORY = ("PyTorch's simulator under AOT autograd: a tensor a compiled function makes with a factory "
                     "(torch.arange, torch.tensor) is a plain FunctionalTensor, and LocalTensor refuses to meet it "
                     "(TypeError / Multiple dispatch failed); docs/compile.md, item 4")


@pytest.mark.compile
@pytest.mark.xfail(raises=torch._dynamo.exc.BackendCompilerFailed, reason=SIMULATOR_FACTORY, strict=True)
def test_simulator_factory_tensor_meets_local_tensor_without_localmap(sim_mesh_4):
    """PyTorch's simulator without localmap: a local tensor minus an arange made in the compiled function.
    Eagerly, and on gloo processes, it works. localmap's axis_index and ppermute (an all_to_all of an arange; an
    index table) make those tensors from a region input on this path instead; a body's own factory is refused
    (the tests below)."""
    x = distribute(randn(8, 4), sim_mesh_4, [R])

    def minus_arange(d):
        local = d.to_local() - torch.arange(4, dtype=torch.float32)
        return DTensor.from_local(local, sim_mesh_4, [R], run_check=False)

    assert torch.equal(full(minus_arange(x)), full(x) - torch.arange(4.0))
    torch.compiler.reset()
    torch.compile(minus_arange, backend="aot_eager", fullgraph=True)(x)


# ---- bodies torch.compile cannot trace: refused by name ----------------------------------------------------------

def _branch_on_values(x, w):
    if x.new_ones(()).item() > 0:  # a Python branch on a tensor value
        return x @ w
    return x


def _no_fake_impl(x, w):
    return doubled(x) @ w  # a custom op without a fake implementation


_UNTRACEABLE = {  # body, fullgraph, given gradient placements -> what the refusal says
    "branch on values, fullgraph": (_branch_on_values, True, True,
                                    ("torch.compile (fullgraph=True) cannot trace its body", "tensor values",
                                     "GuardOnDataDependentSymNode", "torch.where", "fullgraph=False")),
    "branch on values, fullgraph, gradients inferred": (_branch_on_values, True, False,
                                                        ("torch.compile (fullgraph=True) cannot trace its body",
                                                         "tensor values", "run this region eagerly")),
    "no fake implementation": (_no_fake_impl, True, True, ("torch.compile cannot trace its body",
                                                           "no fake implementation", "register_fake")),
    "no fake implementation, graph breaks allowed": (_no_fake_impl, False, True,
                                                     ("torch.compile cannot trace its body", "register_fake")),
}


def _region_of(body, mesh, given):
    return local_map(body, (S0,), ((S0,), (R,)), ((S0,), (Partial(),)) if given else None, mesh)


@pytest.mark.compile
@pytest.mark.parametrize("case", list(_UNTRACEABLE))
def test_untraceable_body_refused_by_name_when_compiled(sim_mesh_4, case):
    """A body Dynamo cannot trace (a branch on a tensor value where no graph break is allowed; an op without a
    fake implementation anywhere) is refused at trace time with a LocalMapError naming torch.compile, the region,
    the reason and the fix; it was Dynamo's raw data-dependent guard (UserError) or TorchRuntimeError."""
    body, fullgraph, given, said = _UNTRACEABLE[case]
    region = _region_of(body, sim_mesh_4, given)
    x = distribute(randn(8, 6), sim_mesh_4, [S0], requires_grad=True)
    w = distribute(randn(6, 4), sim_mesh_4, [R], requires_grad=True)
    torch.compiler.reset()
    with pytest.raises(LocalMapError) as info:
        torch.compile(region, backend="aot_eager", fullgraph=fullgraph)(x, w)
    for fragment in (f"region {body.__name__!r}", *said):
        assert fragment in str(info.value), str(info.value)


@pytest.mark.compile
def test_branch_on_values_compiled_with_graph_breaks_matches_one_device(sim_mesh_4):
    """With graph breaks allowed (fullgraph=False), Dynamo runs the branch eagerly: not refused, and with its
    gradient placements given the region gives one device's values and gradients (unchecked: it warns)."""
    region = _region_of(_branch_on_values, sim_mesh_4, True)
    leaves = [randn(8, 6), randn(6, 4)]
    torch.compiler.reset()
    compiled = torch.compile(lambda x, w: region(x, w).pow(2).sum(), backend="aot_eager", fullgraph=False)
    with pytest.warns(UserWarning, match="could not be checked"):
        got, _ = _run(compiled, sim_mesh_4, leaves, [[S0], [R]], "eager")  # (already compiled)
    _assert_all_close(got, _one_device(lambda x, w: (x @ w).pow(2).sum(), leaves))


# localmap's collectives on that path make their index tensors from a region input (a simulated tensor there), and
# a body's own factory is refused by name: each case against eager and one device.
_COLLECTIVE_BODIES = {
    "axis_index": (lambda x: x * (1 + C.axis_index(0)), lambda x: x * torch.arange(1, 5.0).repeat_interleave(2)[:, None]),
    "shift by 1": (lambda x: C.shift(x, 0, 1), lambda x: torch.roll(x, 2, 0)),
    "ppermute, reversed": (lambda x: C.ppermute(x, 0, [(r, 3 - r) for r in range(4)]),
                           lambda x: torch.cat(list(x.split(2)[::-1]))),
}


@pytest.mark.compile
@pytest.mark.parametrize("case", list(_COLLECTIVE_BODIES))
def test_collectives_compiled_on_a_simulated_mesh(sim_mesh_4, case):
    """axis_index's arange and ppermute's index table were factory tensors: BackendCompilerFailed here. Each rank
    of the compiled result holds a plain tensor (a factory's node in the graph would have become a LocalTensor
    nested in one at run time) with the one-device value."""
    body, one = _COLLECTIVE_BODIES[case]
    region = local_map(body, out_placements=[S0], in_placements=([S0],), device_mesh=sim_mesh_4, check=False)
    xs = randn(8, 3)
    x = distribute(xs, sim_mesh_4, [S0], requires_grad=True)
    torch.compiler.reset()
    got = torch.compile(lambda d: region(d), backend="aot_eager", fullgraph=True)(x)
    per_rank = got.to_local()._local_tensors.values()
    assert all(type(t) is torch.Tensor for t in per_rank), [type(t) for t in per_rank]
    eager = region(x)
    with on_one_device():
        want = one(xs)
    assert torch.equal(full(got), full(eager)) and torch.equal(full(got), want)
    (got * got).sum().backward()
    with on_one_device():
        leaf = xs.clone().requires_grad_()
        (one(leaf) ** 2).sum().backward()
    assert max_diff(full(x.grad), leaf.grad) <= 1e-5


@pytest.mark.compile
def test_simulated_compile_refuses_a_body_factory_by_name(sim_mesh_4):
    """A body's own torch.arange cannot run compiled on the simulator; refused naming the path, the call and
    its line, not PyTorch's BackendCompilerFailed. Eagerly it runs."""
    region = local_map(lambda x: x - torch.arange(3.0), out_placements=[S0], in_placements=([S0],),
                       device_mesh=sim_mesh_4, check=False)
    x = distribute(randn(8, 3), sim_mesh_4, [S0])
    assert torch.equal(full(region(x)), full(x) - torch.arange(3.0))
    torch.compiler.reset()
    with pytest.raises(LocalMapError) as info:
        torch.compile(lambda d: region(d), backend="aot_eager", fullgraph=True)(x)
    for said in (SIMULATED_COMPILE, "makes a tensor with a factory", "torch.arange", "x - torch.arange(3.0)"):
        assert said in str(info.value), str(info.value)


@pytest.mark.compile
def test_axis_index_outside_a_region_compiled_on_a_simulated_mesh_refused(sim_mesh_4):
    """Outside a region body there is no simulated tensor to make the rank ids from: refused by name."""
    x = distribute(randn(8, 3), sim_mesh_4, [S0])

    def scaled(d):
        local = d.to_local() * C.axis_index(0, mesh=sim_mesh_4)
        return DTensor.from_local(local, sim_mesh_4, [S0], run_check=False)

    torch.compiler.reset()
    with pytest.raises(LocalMapError, match="compiled on a simulated mesh .* outside a region body"):
        torch.compile(scaled, backend="aot_eager", fullgraph=True)(x)
