"""torchtitan 0.3.0's own ``local_map`` call sites, built tiny, run with localmap's ``local_map`` swapped in (the
default check on) and with PyTorch's, each compared with one device: values and gradients (inputs and parameters).

torchtitan imports ``local_map`` by name in three modules (``protocols.module`` for every module whose sharding
config has a ``LocalMapConfig``: RoutedExperts, tok_embeddings, inner attention; ``components.loss`` for the
cross-entropy and ChunkedLossWrapper's ``_chunk``; ``models.common.attention`` for FusedQKVLinear's ``_split``);
the swap replaces that name. Sites that read their rank from a process group (vocab-parallel embedding and loss,
expert parallelism's all_to_all with ``.tolist()`` splits) run in two gloo processes; the rest on a simulated mesh.
"""

from __future__ import annotations

import copy
import functools
import types
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

titan = pytest.importorskip("torchtitan", reason="the test extra installs torchtitan on Python >= 3.11")

import torch.distributed.tensor.experimental as torch_experimental  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor  # noqa: E402

import localmap  # noqa: E402
from helpers import rel_diff  # noqa: E402
from localmap.testing import distribute, full, on_one_device, run_gloo, simulated_mesh  # noqa: E402

R, S0, S1, S2 = Replicate(), Shard(0), Shard(1), Shard(2)
IMPLS = {"torch": lambda: torch_experimental.local_map, "localmap": lambda: localmap.local_map,
         "localmap-unchecked": lambda: functools.partial(localmap.local_map, check=False),
         "localmap-strict": lambda: functools.partial(localmap.local_map, check="strict")}
SWAPPED = ("torchtitan.protocols.module", "torchtitan.components.loss", "torchtitan.models.common.attention")
TOL = 2e-2  # relative; the MoE's grouped matmuls run in bfloat16, the rest match to float32 rounding


def _prepare(impl: str) -> None:
    """torchtitan on a CPU torch with its DTensor backend, and `impl`'s local_map where torchtitan calls it."""
    import importlib

    from torchtitan.distributed import parallel_dims, utils
    from torchtitan.models.common import token_dispatcher

    utils.set_spmd_backend("partial_dtensor")
    parallel_dims.device_type = token_dispatcher.device_type = "cpu"  # it guesses "cuda" without a GPU
    for name in SWAPPED:
        importlib.import_module(name).local_map = IMPLS[impl]()


@pytest.fixture(autouse=True)
def _restore_torchtitan():
    """Each test swaps torchtitan's local_map; put PyTorch's back afterwards."""
    yield
    _prepare("torch")


@dataclass
class Site:
    module: torch.nn.Module  # torchtitan's module (or a function wrapped as one), weights set
    inputs: tuple  # global tensors
    placements: list  # per input: placements on the tp mesh, or a function (local shard of ids) -> DTensor
    grad_placements: tuple  # of the upstream gradient
    call: Callable = lambda m, *a: m(*a)
    parallel: dict = None  # ParallelDims degrees beyond tp=2


class _Fn(torch.nn.Module):
    """A torchtitan function (loss, chunking) where a module is expected."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)

    def parallelize(self, parallel_dims: Any) -> None:
        del parallel_dims


def _normal(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


# ---- the sites ---------------------------------------------------------------------------------------------------

def _routed_experts(ep: bool) -> Site:
    """RoutedExperts (moe_sharding.py): EP off, inputs Replicate and the output Partial on tp (weights sharded
    on the hidden dims); EP on, tokens sequence-sharded, the experts sharded over ep, all_to_all dispatch."""
    from torchtitan.models.common import moe_sharding
    from torchtitan.models.common.moe import GroupedExperts, RoutedExperts
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher

    spmd = moe_sharding.spmd
    dispatcher = (AllToAllTokenDispatcher if ep else LocalTokenDispatcher).Config(num_experts=4, top_k=2)
    cfg = RoutedExperts.Config(inner_experts=GroupedExperts.Config(dim=8, hidden_dim=16, num_experts=4),
                               token_dispatcher=dispatcher)
    cfg.sharding_config, cfg.inner_experts.sharding_config = moe_sharding._routed_experts_sharding_configs(
        enable_ep=ep, enable_sp=ep,
        expert_param_layout={"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)})
    module = _normal(cfg.build())
    x, scores = torch.randn(2, 4, 8), torch.rand(2, 4, 2)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(8)]).view(2, 4, 2)
    counts = torch.bincount(ids.flatten(), minlength=4)
    if not ep:
        return Site(module, (x, scores, ids, counts), [(R,)] * 4, (R,))
    return Site(module, (x, scores, ids, counts), [(S1,)] * 3 + [_local_counts], (S1,), parallel={"ep": 2})


def _local_counts(ids: DTensor) -> DTensor:
    """Tokens per expert among this rank's tokens: a Partial sum of the global counts (what MoE.forward hands
    RoutedExperts)."""
    local = torch.bincount(ids.to_local().flatten(), minlength=4)
    return DTensor.from_local(local, ids.device_mesh, [Partial()])


def _inner_attention() -> Site:
    """SDPA inner attention with q/k/v heads sharded (Shard(2)), GQA (4 query heads, 2 kv heads), causal."""
    from torchtitan.models.common import decoder_sharding
    from torchtitan.models.common.attention import ScaledDotProductAttention

    cfg = ScaledDotProductAttention.Config()
    decoder_sharding.set_gqa_inner_attention_local_map(cfg)
    q, k, v = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4)
    return Site(cfg.build(), (q, k, v), [(S2,)] * 3, (S2,),
                call=lambda m, *a: m(*a, enable_gqa=True, is_causal=True))


def _tok_embeddings() -> Site:
    """The vocab-parallel embedding: weight Shard(0) on tp closed over (``self.weight.to_local()``), ids
    Replicate, output Partial."""
    from torchtitan.models.common import decoder_sharding
    from torchtitan.models.common.embedding import Embedding

    cfg = Embedding.Config(num_embeddings=16, embedding_dim=8)
    root = types.SimpleNamespace(tok_embeddings=cfg, norm=types.SimpleNamespace(), lm_head=types.SimpleNamespace())
    decoder_sharding.set_decoder_sharding_config(root, enable_sp=False)
    return Site(_normal(cfg.build()), (torch.randint(0, 16, (2, 5)),), [(R,)], (R,))


def _cross_entropy(vocab_sharded: bool) -> Site:
    """cross_entropy_loss on DTensors (its local_map region): batch-sharded logits give a Partial sum;
    vocab-sharded logits run the vocab-parallel loss (all_reduce max / sum over tp) and give Replicate."""
    from torchtitan.components.loss import cross_entropy_loss

    pred, labels = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    placements = [(S2,), (R,)] if vocab_sharded else [(S0,), (S0,)]
    return Site(_Fn(cross_entropy_loss), (pred, labels), placements, (R,))


def _chunked_loss() -> Site:
    """ChunkedLossWrapper on sequence-sharded hidden states: ``_chunk`` (split_with_sizes, contiguous) is a
    local_map region rebuilt on every call, then lm_head and the cross-entropy region per chunk."""
    from torchtitan.components.loss import ChunkedLossWrapper

    weight = torch.randn(10, 8) * 0.3

    def loss(h, labels):
        lm_head = torch.nn.Linear(8, 10, bias=False)
        w = weight.clone() if not isinstance(h, DTensor) else distribute_tensor(weight, h.device_mesh, [R])
        lm_head.weight = torch.nn.Parameter(w)
        wrapper = ChunkedLossWrapper.Config(num_chunks=2).build()
        wrapper.set_lm_head(lm_head)
        return wrapper(h, labels)[0]

    h, labels = torch.randn(2, 8, 8), torch.randint(0, 10, (2, 8))
    return Site(_Fn(loss), (h, labels), [(S1,), (S1,)], (R,))


def _fused_qkv() -> Site:
    """FusedQKVLinear: wqkv column-parallel, then ``_split`` (a local_map region rebuilt per call) cuts q, k, v
    out of the fused heads (heads Shard(2))."""
    from torchtitan.models.common import decoder_sharding
    from torchtitan.models.common.attention import FusedQKVLinear
    from torchtitan.models.common.linear import Linear

    cfg = FusedQKVLinear.Config(head_dim=4, n_heads=4, n_kv_heads=2,
                                wqkv=Linear.Config(in_features=8, out_features=2 * 4 * 4, bias=False))
    cfg.wqkv.sharding_config = decoder_sharding.colwise_config()
    return Site(_normal(cfg.build()), (torch.randn(2, 3, 8),), [(R,)], (R,), call=_qkv_joined)


def _qkv_joined(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """q, k, v as one tensor (gathered when DTensors), so one upstream gradient reaches all three."""
    parts = module(x)
    if isinstance(parts[0], DTensor):
        parts = [p.redistribute(p.device_mesh, [R]) for p in parts]
    return torch.cat([p.flatten(2) for p in parts], -1)


SITES = {
    "routed_experts_ep_off": functools.partial(_routed_experts, False),
    "inner_attention_gqa": _inner_attention,
    "cross_entropy_batch_sharded": functools.partial(_cross_entropy, False),
    "chunked_loss_wrapper": _chunked_loss,
    "fused_qkv_linear": _fused_qkv,
    # these read their rank from a process group: gloo
    "tok_embeddings": _tok_embeddings,
    "cross_entropy_vocab_sharded": functools.partial(_cross_entropy, True),
    "routed_experts_ep_on": functools.partial(_routed_experts, True),
}
GLOO = ("tok_embeddings", "cross_entropy_vocab_sharded", "routed_experts_ep_on")


# ---- running a site --------------------------------------------------------------------------------------------

def measure(site_name: str, impl: str) -> dict[str, float]:
    """Run the site with `impl`'s local_map on this (simulated or gloo) world of 2 ranks and on one device;
    returns each value's and gradient's difference relative to its scale."""
    from torchtitan.distributed.parallel_dims import ParallelDims

    _prepare(impl)
    with on_one_device():
        torch.manual_seed(1)  # the same global tensors on every rank
        site = SITES[site_name]()
        reference = copy.deepcopy(site.module)
        ref_in = [t.clone().requires_grad_(t.is_floating_point()) for t in site.inputs]
        ref_out = site.call(reference, *ref_in)
        upstream = torch.randn(ref_out.shape)
        ref_out.backward(upstream)
    degrees = dict(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, ep=1) | (site.parallel or {})
    dims = ParallelDims(**degrees, world_size=2, spmd_backend="partial_dtensor")
    site.module.parallelize(dims)
    tp = dims.get_optional_mesh("tp")
    dts = _distribute(site, tp)
    out = site.call(site.module, *dts)
    out.backward(distribute(upstream, tp, site.grad_placements))
    diffs = {"out": rel_diff(full(out), ref_out)}
    for k, (d, r) in enumerate(zip(dts, ref_in)):
        if r.grad is not None:
            diffs[f"grad of input {k}"] = rel_diff(full(d.grad), r.grad)
    refs = dict(reference.named_parameters())
    for name, p in site.module.named_parameters():
        diffs[f"grad of {name}"] = rel_diff(full(p.grad), refs[name].grad)
    return diffs


def _distribute(site: Site, mesh: Any) -> list:
    dts = []
    for t, pl in zip(site.inputs, site.placements):
        if callable(pl):  # made from an earlier input's local shard
            dts.append(pl(dts[-1]))
        else:
            dts.append(distribute(t, mesh, pl, requires_grad=t.is_floating_point()))
    return dts


def _gloo_measure(mesh: Any, site_name: str, impl: str) -> dict[str, float]:
    del mesh  # torchtitan's ParallelDims builds its own meshes over the process group
    return measure(site_name, impl)


def _measure_anywhere(site_name: str, impl: str) -> dict[str, float]:
    if site_name in GLOO:
        results = run_gloo(_gloo_measure, 2, args=(site_name, impl), timeout=240)
        return {f"rank {r}: {k}": v for r, res in enumerate(results) for k, v in res.items()}
    with simulated_mesh(2):
        return measure(site_name, impl)


def _assert_one_device(diffs: dict[str, float]) -> None:
    assert len(diffs) >= 2, diffs  # a value and at least one gradient compared
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"differs from one device: {bad}"


def _param(site_name: str) -> Any:
    return pytest.param(site_name, marks=[pytest.mark.slow] if site_name in GLOO else [], id=site_name)


@pytest.mark.parametrize("site_name", [_param(s) for s in SITES])
def test_with_pytorch_local_map_matches_one_device(site_name):
    """The baseline: torchtitan as shipped (PyTorch's local_map) computes what one device does."""
    _assert_one_device(_measure_anywhere(site_name, "torch"))


@pytest.mark.parametrize("site_name", [_param(s) for s in SITES])
def test_with_localmap_and_the_default_check_matches_one_device(site_name):
    """The check must never break a correct program: the same site with localmap's local_map (check on) runs
    and computes what one device does."""
    _assert_one_device(_measure_anywhere(site_name, "localmap"))


@pytest.mark.parametrize("site_name", [_param(s) for s in SITES])
def test_with_localmap_unchecked_matches_one_device(site_name):
    """localmap's regions themselves (check off) are right on every site: a failure with the check on is the
    check's."""
    _assert_one_device(_measure_anywhere(site_name, "localmap-unchecked"))


@pytest.fixture
def _titan_scatter_rule():
    """The one registration docs/check-rules.md shows for torchtitan's custom op deterministic_scatter_add."""
    from localmap.check.rules import RULES
    import torchtitan.ops.scatter_add  # noqa: F401  (registers the op)

    op = torch.ops.torchtitan.deterministic_scatter_add.default
    localmap.register_rule(op, localmap.linear_in(values=("src",), indices=("index",), base="out"))
    localmap.clear_caches()
    yield
    RULES.pop(op)
    localmap.clear_caches()


# Every simulated site is settled without a warning: proven, or tested where the proof stops by design.
# ChunkedLossWrapper's _chunk cuts the sharded sequence by local sizes, so each chunk alone is no shard of the
# one-device chunk; its chunks joined in order are, which the test settles (check.tested: pieces settled as a
# whole). A chunk used alone or out of order is not settled (tests/check/test_check_proofs.py: PIECES).
TESTED = {"chunked_loss_wrapper": "joined in order"}


@pytest.mark.parametrize("site_name", [s for s in SITES if s not in GLOO])
def test_the_default_check_settles_the_site_without_a_warning(site_name, _titan_scatter_rule):
    from localmap.check import function

    localmap.clear_caches()  # each site's own verdicts
    with simulated_mesh(2):
        diffs, said = _measured_with_warnings(site_name)
    _assert_one_device(diffs)
    assert not said, said
    verdicts = [v for _, v in function._cache.values()]
    tested = [v for v in verdicts if v.status == "tested"]
    assert verdicts and all(v.status in ("ok", "tested") for v in verdicts), [v.summary() for v in verdicts]
    if site_name in TESTED:
        assert tested and all(TESTED[site_name] in v.test.where for v in tested), [v.summary() for v in tested]
    else:
        assert not tested, [v.summary() for v in tested]


# Expert parallelism: the proof stops at the stable sort of the expert ids, and the body relies on how the token
# counts (a Partial input) split across ranks (each rank's share must be its own tokens' counts), which no
# proof from the placements can give. On a simulated mesh the test where the proof stops settles it (its
# one-rank run rebinds the dispatcher's ep mesh to one rank); under a real process group it runs on the real ranks.
EP_SITE = "routed_experts_ep_on"


def _measured_with_warnings(site_name: str, impl: str = "localmap") -> tuple[dict[str, float], list[str]]:
    """measure() with the local_map warnings it gave."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        diffs = measure(site_name, impl)
    return diffs, [str(w.message) for w in seen if "local_map" in str(w.message)]


def test_expert_parallelism_is_tested_silently_on_a_simulated_mesh(_titan_scatter_rule):
    from localmap.check import function

    with simulated_mesh(2):
        diffs, said = _measured_with_warnings(EP_SITE)
    _assert_one_device(diffs)
    assert not said, said
    statuses = {v.function: (v.status, v.summary()) for _, v in function._cache.values()}
    status, summary = statuses["forward"]
    assert status == "tested" and "largest difference" in summary, summary


def _gloo_warnings(mesh: Any, site_name: str) -> tuple[dict[str, float], list[str], list[tuple[str, str]]]:
    from localmap.check import function

    del mesh
    diffs, said = _measured_with_warnings(site_name)
    return diffs, said, [(v.status, " ".join(v.unproven)) for _, v in function._cache.values()
                         if v.function == "forward"]


@pytest.mark.slow
def test_expert_parallelism_under_a_real_process_group_is_tested_silently():
    """Under 2 gloo processes the proof stops at aten.sort.stable as on the simulated mesh; the test then runs
    on the real ranks (inputs, outputs and gradients gathered, the one-rank run on each rank over its own
    one-member group): tested, no warning, on both ranks, values equal to one device. Before, it did not run
    under a real process group and warned once, unproven at aten.sort.stable."""
    for diffs, said, verdicts in run_gloo(_gloo_warnings, 2, args=(EP_SITE,), timeout=240, collective_timeout=120):
        _assert_one_device(diffs)
        assert not said, said
        assert [status for status, _ in verdicts] == ["tested"], verdicts
        assert "aten.sort.stable" in verdicts[0][1], verdicts


def _counts_split_otherwise(ids: DTensor) -> DTensor:
    """The same global token counts (a Partial sum) split otherwise across the ranks: one token of expert 1
    moved to expert 0 in rank 0's share and back in rank 1's. Each rank still sends as many rows to each rank,
    but its rows meet the wrong experts: a wrong program with the same placements and global values."""
    local = torch.bincount(ids.to_local().flatten(), minlength=4)
    moved = torch.tensor([1, -1, 0, 0]) * _rank_sign(ids.device_mesh)
    return DTensor.from_local(local + moved, ids.device_mesh, [Partial()])


def _rank_sign(mesh: Any) -> torch.Tensor:
    """+1 on rank 0 and -1 on rank 1 of the simulated mesh."""
    from localmap import collectives as C

    with localmap.use_mesh(mesh):
        return 1 - 2 * C.axis_index(0)


def test_expert_parallelism_with_counts_split_otherwise_is_never_tested(_titan_scatter_rule, monkeypatch):
    """The body relies on how the Partial token counts split across ranks, which the placements do not say:
    the same global counts split otherwise give other numbers than one device, and the test where the proof
    stops sees it (unproven with the numbers, as any body that routes rows between ranks), never tested."""
    site = functools.partial(_routed_experts, True)

    def missplit() -> Site:
        built = site()
        built.placements[3] = _counts_split_otherwise
        return built

    monkeypatch.setitem(SITES, "ep_counts_split_otherwise", missplit)
    with simulated_mesh(2):
        diffs, said = _measured_with_warnings("ep_counts_split_otherwise")
    assert max(diffs.values()) > TOL, "the counts split otherwise still match one device: not a wrong program"
    assert len(said) == 1 and "unproven" in said[0] and "largest difference" in said[0], said


def _gloo_strict_warnings(mesh: Any, site_name: str, impl: str) -> tuple[dict[str, float], list[str]]:
    """measure() on a gloo rank, with the local_map warnings it gave."""
    del mesh
    return _measured_with_warnings(site_name, impl)


# Gloo sites the proof settles: each rank proves its own trace (the vocab offset from dist.get_rank is a literal
# there, check.offsets; the vocab-parallel loss reduces over tp itself). On a simulated mesh these sites are not
# run: the fake group says rank 0 to every rank. (routed_experts_ep_on: still unproven, at its sort.)
PROVEN_ON_GLOO = ("tok_embeddings", "cross_entropy_vocab_sharded")


@pytest.mark.slow
@pytest.mark.parametrize("site_name", PROVEN_ON_GLOO)
def test_the_strict_check_proves_the_gloo_site_without_a_warning(site_name):
    """check="strict" accepts proven claims only (not tested ones): the site runs, matches one device and warns
    on no rank."""
    for rank, (diffs, said) in enumerate(run_gloo(_gloo_strict_warnings, 2, args=(site_name, "localmap-strict"),
                                                  timeout=240)):
        _assert_one_device(diffs)
        assert not said, (rank, said)
