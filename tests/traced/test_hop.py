"""The local_map operator: one node per region, local-shaped forward/backward graphs, their runtime.

Tracing tests use a fake process group with 2048 ranks as (8, 8, 4, 8) named dp, tp, cp, ep (fake_mesh_8x8x4x8);
value tests use a 1-rank fake mesh (fake_mesh_1), where local and global coincide, and compare with plain eager
autograd."""

import io
import threading
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import localmap
from localmap import LocalMapError
from localmap.hop import defer_inlining, is_deferring, local_map_hop

R = Replicate()

_FAKE = FakeTensorMode()


def fake(*shape, requires_grad=True, mode=None):
    with mode or _FAKE:
        return torch.randn(*shape, requires_grad=requires_grad)


def region_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is local_map_hop]


def submodule(gm, node):
    return getattr(gm, node.args[0].target)


def trace_train(fn, *args, mode="fake"):
    """make_fx of loss -> grads of all tensor args, with regions deferred."""
    def train(*a):
        loss = fn(*a)
        leaves = [t for t in a if isinstance(t, torch.Tensor) and t.requires_grad]
        return (loss, *torch.autograd.grad(loss, leaves))
    with defer_inlining():
        return make_fx(train, tracing_mode=mode)(*args)


# ---- transformer block: decorator and functional forms, local shapes -------------------------------------------

ATTN_IN = ([Shard(0), Shard(1), Shard(2), R], [Shard(0), Shard(1), R, R], [Shard(0), Shard(1), R, R])
ATTN_OUT = [Shard(0), Shard(1), Shard(2), R]


def _block(attn, x, wq, wk, wv):
    q, k, v = ((x @ w).view(8, 16, 16, 6).transpose(1, 2) for w in (wq, wk, wv))  # [b, h, s, d]
    return attn(q, k, v).sum()


def test_transformer_block_region(fake_mesh_8x8x4x8):
    seen = []

    @localmap.local_map(out_placements=ATTN_OUT, in_placements=ATTN_IN, device_mesh=fake_mesh_8x8x4x8)
    def attn_deco(q, k, v):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return F.scaled_dot_product_attention(q, k, v)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    attn_func = localmap.local_map(sdpa, ATTN_OUT, ATTN_IN, None, fake_mesh_8x8x4x8)
    mode = FakeTensorMode()
    args = [fake(8, 16, 96, mode=mode)] + [fake(96, 96, mode=mode) for _ in range(3)]
    deco = trace_train(partial(_block, attn_deco), *args)
    func = trace_train(partial(_block, attn_func), *args)
    assert deco.code == func.code
    assert seen[0] == ((1, 2, 4, 6), (1, 2, 16, 6), (1, 2, 16, 6))  # sharded over dp, tp (and cp for q)

    fw_node, bw_node = region_nodes(deco)
    assert [tuple(a.meta["val"].shape) for a in fw_node.args[1:]] == [(8, 16, 16, 6)] * 3  # global outside
    assert tuple(fw_node.meta["val"][0].shape) == (8, 16, 16, 6)
    fw = submodule(deco, fw_node)
    assert [tuple(p.meta["val"].shape) for p in fw.graph.find_nodes(op="placeholder")] == \
        [(1, 2, 4, 6), (1, 2, 16, 6), (1, 2, 16, 6)]
    assert fw_node.meta["local_map_kwargs"]["in_placements"] == tuple(tuple(p) for p in ATTN_IN)
    assert bw_node.meta["local_map_kwargs"]["in_placements"] == (tuple(ATTN_OUT),)
    assert [tuple(g.shape) for g in bw_node.meta["val"]] == [(8, 16, 16, 6)] * 3  # global gradients
    for a, b in zip(deco.named_children(), func.named_children()):
        assert a[1].code == b[1].code


def test_default_is_inline(fake_mesh_8x8x4x8):
    f = localmap.local_map(lambda a: a.sin(), [Shard(0), R, R, R], ([Shard(0), R, R, R],),
                           device_mesh=fake_mesh_8x8x4x8)
    x = fake(64, 4)
    gm = make_fx(lambda a: torch.autograd.grad(f(a).sum(), [a]), tracing_mode="fake")(x)
    assert not region_nodes(gm) and "sin" in gm.code  # no region: plain ops in global shapes


# ---- direct operator call ---------------------------------------------------------------------------------------

def test_direct_call_on_fake_global_input(fake_mesh_8x8x4x8):
    def body_fn(x):
        return (torch.tanh(x) * 2,)

    body = make_fx(body_fn)(torch.randn(10, 80))
    placements = (R, R, R, Shard(0))  # Shard(0) over 'ep' (8 ranks)
    body.meta["local_map_kwargs"] = dict(in_placements=(placements,), out_placements=(placements,),
                                         in_grad_placements=None, device_mesh=fake_mesh_8x8x4x8)
    x = fake(80, 80)
    gm = trace_train(lambda a: local_map_hop(body, a)[0].sum(), x)
    fw_node, bw_node = region_nodes(gm)
    fw = submodule(gm, fw_node)
    assert tuple(fw.graph.find_nodes(op="placeholder")[0].meta["val"].shape) == (10, 80)
    assert tuple(fw_node.meta["val"][0].shape) == (80, 80)  # the global shape is unchanged
    assert tuple(bw_node.meta["val"][0].shape) == (80, 80)
    saved = fw_node.meta["val"][1:]
    assert saved and all(tuple(t.shape) == (10, 80) for t in saved)  # activations stay local


def test_same_input_passed_twice(fake_mesh_8x8x4x8):
    """Each use of an input is converted from its own placements, not converted twice."""
    f = localmap.local_map(lambda a, b: a @ b, [Shard(0), R, R, R], ([Shard(0), R, R, R], [R, R, R, R]),
                           device_mesh=fake_mesh_8x8x4x8)
    x = fake(64, 64)
    gm = trace_train(lambda a: f(a, a).sum(), x)
    fw = submodule(gm, region_nodes(gm)[0])
    assert [tuple(p.meta["val"].shape) for p in fw.graph.find_nodes(op="placeholder")] == [(8, 64), (64, 64)]


# ---- selective activation checkpointing -------------------------------------------------------------------------

def _save_sin(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.sin.default else CheckpointPolicy.PREFER_RECOMPUTE


def test_selective_checkpoint_inside_region(fake_mesh_8x8x4x8):
    def inner(x):
        return x.sin().cos().exp()

    @localmap.local_map(out_placements=[Shard(0), R, R, R], in_placements=([Shard(0), R, R, R],),
                        device_mesh=fake_mesh_8x8x4x8)
    def region(x):
        return checkpoint(inner, x, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _save_sin))

    gm = trace_train(lambda a: region(a).sum(), fake(64, 8))
    fw_node, bw_node = region_nodes(gm)
    fw, bw = submodule(gm, fw_node), submodule(gm, bw_node)
    fw_out = [n.name for n in fw.graph.find_nodes(op="output")[0].args[0]]
    bw_in = [n.name for n in bw.graph.find_nodes(op="placeholder")]
    assert "sin" in fw_out[1:] and "sin" in bw_in  # saved
    assert not any(name.startswith(("cos", "exp")) for name in fw_out[1:] + bw_in)  # recomputed
    assert any(n.target == torch.ops.aten.cos.default for n in bw.graph.nodes)


def test_selective_checkpoint_around_region(fake_mesh_1):
    """SAC around a region (the region is one op to the policy): same values and gradients as without."""
    f = localmap.local_map(lambda a, w: torch.relu(a @ w), [R], ([R], [R]), device_mesh=fake_mesh_1)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op is local_map_hop else CheckpointPolicy.PREFER_RECOMPUTE

    x, w = torch.randn(6, 4, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    ref = torch.autograd.grad((torch.relu(x @ w) * 3).sum(), [x, w])
    with defer_inlining():
        loss = checkpoint(lambda a, b: (f(a, b) * 3).sum(), x, w, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, policy))
        got = torch.autograd.grad(loss, [x, w])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


# ---- argument and output kinds ----------------------------------------------------------------------------------

def test_none_gradients_and_non_tensor_inputs(fake_mesh_8x8x4x8):
    """An input without requires_grad gets None; an int and an nn.Module take None placements."""
    scale = torch.nn.Linear(4, 4)
    P4 = [Shard(0), R, R, R]
    f = localmap.local_map(lambda a, b, n, mod: (a * b) * n, P4, (P4, P4, None, None), device_mesh=fake_mesh_8x8x4x8)
    x, y = fake(64, 4), fake(64, 4, requires_grad=False)

    def loss(a, b):
        return f(a, b, 3, scale).sum()

    gm = trace_train(loss, x, y)
    fw_node, bw_node = region_nodes(gm)
    bw = submodule(gm, bw_node)
    assert bw.graph.find_nodes(op="output")[0].args[0][1] is None  # no gradient for b
    assert len(fw_node.args) == 3  # body + the two tensors: the int and the module are constants


def test_filtered_output_gradient(fake_mesh_8x8x4x8):
    """An output that does not require grad gets no tangent."""
    P4 = [Shard(0), R, R, R]
    f = localmap.local_map(lambda a: (a.exp(), a.argmax(-1)), (P4, P4), (P4,), device_mesh=fake_mesh_8x8x4x8)
    gm = trace_train(lambda a: f(a)[0].sum(), fake(64, 4))
    fw_node, bw_node = region_nodes(gm)
    bw = submodule(gm, bw_node)
    num_act = bw.meta["localmap"]["num_activations"]
    assert len(bw.graph.find_nodes(op="placeholder")) == num_act + 1
    assert bw_node.meta["local_map_kwargs"]["in_placements"] == (tuple(P4),)


def test_symint_activations_from_moe_all_to_all(fake_mesh_8x8x4x8):
    import torch.distributed._functional_collectives as funcol

    EP = [R, R, R, Shard(0)]

    @localmap.local_map(out_placements=EP, in_placements=(EP, EP), device_mesh=fake_mesh_8x8x4x8)
    def moe(x, counts):
        splits = counts.tolist()  # data-dependent split sizes
        routed = funcol.all_to_all_single(x, splits, splits, group=(fake_mesh_8x8x4x8, 3))
        expert = torch.relu(routed) * 2
        back = funcol.all_to_all_single(expert, splits, splits, group=(fake_mesh_8x8x4x8, 3))
        return back.index_select(0, torch.arange(x.shape[0], device=x.device))

    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = fake(64, 8, mode=mode)
    with mode:
        counts = torch.ones(64, dtype=torch.int64)
    gm = trace_train(lambda a, c: moe(a, c).sum(), x, counts)
    fw_node, bw_node = region_nodes(gm)
    saved = fw_node.meta["val"][1:]
    assert any(isinstance(s, torch.SymInt) for s in saved)
    assert tuple(fw_node.meta["val"][0].shape) == (64, 8)
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    assert not free_unbacked_symbols(fw_node.meta["val"][0].shape)  # nothing unbacked leaks out


def test_fx_annotations_carried(fake_mesh_8x8x4x8):
    import torch.fx.traceback as fx_traceback

    P4 = [Shard(0), R, R, R]

    @localmap.local_map(out_placements=P4, in_placements=(P4,), device_mesh=fake_mesh_8x8x4x8)
    def region(x):
        with fx_traceback.annotate({"stage": "expert"}):
            return x.sin() * 2

    with fx_traceback.preserve_node_meta():
        gm = trace_train(lambda a: region(a).sum(), fake(64, 4))
    fw_node, bw_node = region_nodes(gm)
    for node in (fw_node, bw_node):
        sub = submodule(gm, node)
        tagged = [n for n in sub.graph.nodes if (n.meta.get("custom") or {}).get("stage") == "expert"]
        assert tagged, sub.code


def test_as_strided_under_dynamic_shapes(fake_mesh_8x8x4x8):
    P4 = [Shard(0), R, R, R]

    @localmap.local_map(out_placements=P4, in_placements=(P4,), device_mesh=fake_mesh_8x8x4x8)
    def region(x):
        return x.as_strided((x.shape[0], 2), (x.stride(0), 1)) * 3

    gm = trace_train(lambda a: region(a).sum(), torch.randn(64, 4, requires_grad=True), mode="symbolic")
    fw_node, _ = region_nodes(gm)
    assert isinstance(fw_node.meta["val"][0].shape[0], torch.SymInt)


def test_outputs_aliasing_inputs_are_cloned(fake_mesh_1):
    f = localmap.local_map(lambda a, b: (a, a * b), ([R], [R]), ([R], [R]), device_mesh=fake_mesh_1)
    x, w = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    with defer_inlining():
        same, prod = f(x, w)
        assert same.data_ptr() != x.data_ptr()
        (same.sum() + prod.sum()).backward()
    torch.testing.assert_close(x.grad, 1 + w.detach())


def test_mutating_body_is_rejected(fake_mesh_8x8x4x8):
    P4 = [Shard(0), R, R, R]
    f = localmap.local_map(lambda a: a.mul_(2), P4, (P4,), device_mesh=fake_mesh_8x8x4x8)
    with pytest.raises(LocalMapError, match="args\\[0\\].*mutated.*aten.mul_"):
        trace_train(lambda a: f(a * 1).sum(), fake(64, 4))


def test_bad_counts(fake_mesh_8x8x4x8):
    body = make_fx(lambda a: (a * 2,))(torch.randn(8, 4))
    body.meta["local_map_kwargs"] = dict(in_placements=((R,) * 4, (R,) * 4), out_placements=((R,) * 4,),
                                         device_mesh=fake_mesh_8x8x4x8)
    with pytest.raises(LocalMapError, match="in_placements.*2 entries for 1 operator inputs"):
        trace_train(lambda a: local_map_hop(body, a)[0].sum(), fake(8, 4))
    body.meta["local_map_kwargs"] = dict(in_placements=((R,) * 4,), out_placements=((R,) * 4, (R,) * 4),
                                         device_mesh=fake_mesh_8x8x4x8)
    with pytest.raises(LocalMapError, match="returns 1 outputs but out_placements has 2"):
        trace_train(lambda a: local_map_hop(body, a)[0].sum(), fake(8, 4))
    body.meta.pop("local_map_kwargs")
    with pytest.raises(LocalMapError, match="local_map_kwargs"):
        trace_train(lambda a: local_map_hop(body, a)[0].sum(), fake(8, 4))


# ---- in_grad_placements -----------------------------------------------------------------------------------------

def test_in_grad_placements_in_backward_metadata(fake_mesh_8x8x4x8):
    X, W = [Shard(0), R, R, R], [R, R, R, R]
    f = localmap.local_map(lambda a, w: a @ w, X, (X, W), (X, [Partial(), R, R, R]), device_mesh=fake_mesh_8x8x4x8)
    gm = trace_train(lambda a, w: f(a, w).sum(), fake(64, 4), fake(4, 3))
    fw_node, bw_node = region_nodes(gm)
    assert bw_node.meta["local_map_kwargs"]["out_placements"] == (tuple(X), (Partial(), R, R, R))
    # Left out, the gradient placements are inferred from the body: w meets data sharded over 'dp'.
    f2 = localmap.local_map(lambda a, w: a @ w, X, (X, W), device_mesh=fake_mesh_8x8x4x8)
    gm2 = trace_train(lambda a, w: f2(a, w).sum(), fake(64, 4), fake(4, 3))
    assert region_nodes(gm2)[1].meta["local_map_kwargs"]["out_placements"] == (tuple(X), (Partial(), R, R, R))
    # With the check off, nothing is inferred: the inputs' own placements (PyTorch's default).
    f3 = localmap.local_map(lambda a, w: a @ w, X, (X, W), device_mesh=fake_mesh_8x8x4x8, check=False)
    gm3 = trace_train(lambda a, w: f3(a, w).sum(), fake(64, 4), fake(4, 3))
    assert region_nodes(gm3)[1].meta["local_map_kwargs"]["out_placements"] == (tuple(X), tuple(W))


def test_in_grad_placements_values_on_one_rank(fake_mesh_1):
    # On one rank a Partial gradient equals a Replicate one; the check (which would call it Replicate) is off
    # to show that a given in_grad_placements is used as given.
    f = localmap.local_map(lambda a, w: torch.tanh(a @ w), [R], ([R], [R]), ([R], [Partial()]),
                           device_mesh=fake_mesh_1, check=False)
    x, w = torch.randn(5, 4, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    with defer_inlining():
        got = torch.autograd.grad(f(x, w).pow(2).sum(), [x, w])
    ref = torch.autograd.grad(torch.tanh(x @ w).pow(2).sum(), [x, w])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


# ---- traced graphs as artifacts ---------------------------------------------------------------------------------

def test_traced_graph_print_codegen_save_rerun(fake_mesh_1):
    f = localmap.local_map(lambda a, w: torch.relu(a @ w) * 2, [R], ([R], [R]), device_mesh=fake_mesh_1)

    def loss(a, w):
        return (f(a, w) + 1).pow(2).mean()

    x, w = torch.randn(6, 4, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    mode = FakeTensorMode()
    with mode:
        fx_, fw_ = mode.from_tensor(x).requires_grad_(), mode.from_tensor(w).requires_grad_()
    gm = trace_train(loss, fx_, fw_)
    text = gm.print_readable(print_output=False)
    assert "torch.ops.higher_order.localmap_region" in gm.code and "local_map_fw_0" in text

    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [n.target for n in region_nodes(loaded)] == [local_map_hop, local_map_hop]

    ref_loss = loss(x, w)
    ref = torch.autograd.grad(ref_loss, [x, w])
    for module in (gm, loaded):
        got = module(x.detach(), w.detach())  # real tensors, 1-rank mesh: local == global
        torch.testing.assert_close(got[0], ref_loss)
        for g, r in zip(got[1:], ref):
            torch.testing.assert_close(g, r)
    with defer_inlining(), FakeTensorMode() as m2:  # on fake inputs it reproduces the metadata
        out = loaded(m2.from_tensor(x), m2.from_tensor(w))
    assert [tuple(t.shape) for t in out] == [(), (6, 4), (4, 5)]


# ---- defer_inlining and the cache -------------------------------------------------------------------------------

def test_defer_inlining_nests_restores_and_is_per_thread():
    assert not is_deferring()
    with defer_inlining():
        with defer_inlining():
            assert is_deferring()
        assert is_deferring()
        seen = []
        t = threading.Thread(target=lambda: seen.append(is_deferring()))
        t.start()
        t.join()
        assert seen == [False]
    assert not is_deferring()
    with pytest.raises(RuntimeError):
        with defer_inlining():
            raise RuntimeError("boom")
    assert not is_deferring()


def test_identical_regions_are_built_once(fake_mesh_8x8x4x8):
    P4 = [Shard(0), R, R, R]
    layer = localmap.local_map(lambda a, w: torch.relu(a @ w), P4, (P4, [R] * 4), device_mesh=fake_mesh_8x8x4x8)
    ws = [fake(16, 16) for _ in range(32)]

    def model(x, *ws):
        for w in ws:
            x = layer(x, w)
        return x.sum()

    before = localmap.cache_info()["regions_built"]
    gm = trace_train(model, fake(64, 16), *ws)
    assert localmap.cache_info()["regions_built"] - before == 1
    fw_nodes = region_nodes(gm)
    assert len(fw_nodes) == 64  # 32 forward + 32 backward nodes
    assert len({n.args[0].target for n in fw_nodes}) == 2  # sharing one forward and one backward submodule


def test_functionalization_unwraps_and_rewraps(fake_mesh_8x8x4x8):
    P4 = [Shard(0), R, R, R]
    f = localmap.local_map(lambda a: a.cos() + 1, P4, (P4,), device_mesh=fake_mesh_8x8x4x8)

    def prog(a):
        b = a.clone()
        b.add_(1)  # a mutation outside the region, which functionalization removes
        return f(b).sum()

    with defer_inlining():
        gm = make_fx(torch.func.functionalize(prog), tracing_mode="fake")(torch.randn(64, 4))
    assert len(region_nodes(gm)) == 1 and "add_" not in gm.code
    assert tuple(region_nodes(gm)[0].meta["val"][0].shape) == (64, 4)


def test_direct_call_with_mutating_body_is_rejected(fake_mesh_8x8x4x8):
    body = make_fx(lambda a: (a.add_(1),))(torch.randn(8, 4))
    body.meta["local_map_kwargs"] = dict(in_placements=((R,) * 4,), out_placements=((R,) * 4,),
                                         device_mesh=fake_mesh_8x8x4x8)
    with pytest.raises(LocalMapError, match="mutated.*aten.add_"):
        trace_train(lambda a: local_map_hop(body, a * 1)[0].sum(), fake(8, 4))
    with defer_inlining(), pytest.raises(LocalMapError, match="mutated.*aten.add_"):
        make_fx(torch.func.functionalize(lambda a: local_map_hop(body, a)[0]), tracing_mode="fake")(
            torch.randn(8, 4))


def test_partitioner_is_selectable(fake_mesh_8x8x4x8):
    """min-cut recomputes the cheap sin in the backward; the default partitioner saves it."""
    P4 = [Shard(0), R, R, R]
    f = localmap.local_map(lambda a: a.sin().cos(), P4, (P4,), device_mesh=fake_mesh_8x8x4x8)

    def saved(partitioner):
        def train(a):
            return torch.autograd.grad(f(a).sum(), [a])
        with defer_inlining(partitioner):
            gm = make_fx(train, tracing_mode="fake")(fake(64, 4))
        fw = submodule(gm, region_nodes(gm)[0])
        return [n.name for n in fw.graph.find_nodes(op="output")[0].args[0][1:]]

    assert "sin" in saved("default") and "sin" not in saved("min_cut")
    with pytest.raises(LocalMapError, match=r"(?s)defer_inlining: partitioner.*given:    'greedy'"):
        with defer_inlining("greedy"):
            pass
    assert not is_deferring()


def test_none_and_symint_arguments_under_dynamic_shapes(fake_mesh_8x8x4x8):
    """A None argument is a body constant; a SymInt argument (a size under dynamic shapes) is an input."""
    P4 = [Shard(0), R, R, R]
    f = localmap.local_map(lambda a, n, nothing: a * n if nothing is None else a, P4, (P4, None, None),
                           device_mesh=fake_mesh_8x8x4x8)
    gm = trace_train(lambda a: f(a, a.shape[1], None).sum(), torch.randn(64, 4, requires_grad=True),
                     mode="symbolic")
    fw_node = region_nodes(gm)[0]
    assert len(fw_node.args) == 3 and isinstance(fw_node.args[2].meta["val"], torch.SymInt)
