"""One registry of process-wide caches (issue 19, item 1): every cache registers itself with its name, limit and
eviction; ``cache_info()`` and ``clear_caches()`` walk the registry. A program that fills every cache, then
``clear_caches()`` empties them all; and no module-level cache in the package is left unregistered."""

from __future__ import annotations

import ast
import os
import warnings

import pytest
import torch
import torch.nn as nn

import localmap
from localmap import LocalMapError, local_map
from localmap.caches import EVICTIONS, cache_limits, registered
from localmap.hop import region_operator
from localmap.testing import distribute, fake_mesh, on_one_device, planner_capture, simulated_mesh
from helpers import R, S0, randn

PACKAGE_DIR = os.path.dirname(localmap.__file__)
# Module-level dicts that are tables of facts, not caches (nothing in them is derived and re-derivable), and the
# registry itself.
REGISTRIES = {"RULES", "COLLECTIVES", "_caches", "_counters"}


def _mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2


class Block(nn.Module):
    def __init__(self, mesh) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 16) / 4)
        self.w2 = nn.Parameter(torch.randn(16, 8) / 4)
        self.mlp = local_map(_mlp, out_placements=(S0,), in_placements=((S0,), (R,), (R,)), device_mesh=mesh)

    def forward(self, x):
        return self.mlp(x, self.w1, self.w2).sum()


def _fill_eager_caches() -> None:
    """A region call with gradients on a simulated mesh, an uneven input, a body that raises."""
    with simulated_mesh(2) as mesh:
        region = local_map(_mlp, (S0,), ((S0,), (R,), (R,)), None, mesh)
        x, w1, w2 = (distribute(randn(*s), mesh, p, requires_grad=True)
                     for s, p in (((4, 8), (S0,)), ((8, 16), (R,)), ((16, 8), (R,))))
        region(x, w1, w2).sum().backward()  # verdicts, plans, grad specs, placement memos, evenness
        region(distribute(randn(5, 8), mesh, (S0,)), w1, w2)  # an uneven input
        # a factory (zeros_like takes a device): DTensor's output-metadata probe on fake tensors (probe_modes)
        local_map(lambda a: a + torch.zeros_like(a), (S0,), ((S0,),), None, mesh)(distribute(randn(4, 2), mesh, (S0,)))
        avg = localmap.Partial("avg")
        local_map(lambda a: a, (avg,), ((avg,),), None, mesh)(distribute(randn(4, 2), mesh, (avg,)))
        with warnings.catch_warnings():  # a wrong claim under check="warn": the warning is remembered as shown
            warnings.simplefilter("ignore")
            local_map(lambda a: a.sum(0, keepdim=True), (S0,), ((S0,),), None, mesh, check="warn")(
                distribute(randn(4, 2), mesh, (S0,)))
        with pytest.raises(LocalMapError):  # a scan over the sharded dim: the proof stops, the test refutes it
            local_map(lambda a: a.cumsum(0), (S0,), ((S0,),), None, mesh)(distribute(randn(4, 2), mesh, (S0,)))
        broken = local_map(lambda a: a.reshape(3, -1), (S0,), ((S0,),), None, mesh, check=False)
        with pytest.raises(LocalMapError):
            broken(distribute(randn(4, 2), mesh, (S0,)))  # the body raises: a BodyError type is made


def _fill_traced_caches() -> None:
    """capture (region graphs, fake outputs, flops), a planner's capture (capture plans), a compiled call whose
    check fails at trace time (surfacing types)."""
    with fake_mesh(4, ("tp",)) as mesh:
        with on_one_device():
            model = Block(mesh)
        localmap.capture(model, torch.randn(8, 8)).regions[0].flops  # noqa: B018
        with warnings.catch_warnings(), region_operator("localmap"):
            warnings.simplefilter("ignore")
            planner_capture(Block(mesh), torch.randn(8, 8))
    with simulated_mesh(2) as mesh:
        wrong = local_map(lambda a: a.sum(0, keepdim=True), (S0,), ((S0,),), None, mesh)
        with pytest.raises(LocalMapError):
            torch.compile(lambda a: wrong(a), backend="eager")(distribute(randn(4, 2), mesh, (S0,)))


def _fill_real_group_caches() -> None:
    """A one-process gloo group: the test where the proof stops runs on its real rank (its own group made)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        local_map(lambda a: a.cumsum(0), (S0,), ((S0,),), None, mesh)(distribute(randn(4, 2), mesh, (S0,)))
    finally:
        dist.destroy_process_group()


def test_clear_caches_empties_every_registered_cache():
    _fill_eager_caches()
    _fill_traced_caches()
    _fill_real_group_caches()
    info = localmap.cache_info()
    empty = [n for n in registered() if info[f"{n}_cached"] == 0]
    assert not empty, f"the program left these caches empty, so the test proves nothing for them: {empty}"
    counters = {k: v for k, v in info.items() if not k.endswith("_cached")}
    localmap.clear_caches()
    after = localmap.cache_info()
    assert {n: after[f"{n}_cached"] for n in registered()} == {n: 0 for n in registered()}
    assert {k: after[k] for k in counters} == counters  # the counters keep counting


def test_each_cache_states_its_limit_and_eviction():
    limits = cache_limits()
    assert len(limits) >= 14, sorted(limits)
    for name, (limit, eviction) in limits.items():
        assert eviction in EVICTIONS, name
        assert (limit is None) == (eviction in ("weak keys", "unbounded")), name
    assert {"regions", "verdicts", "shared_regions", "region_plans", "capture_plans"} <= set(limits)


def _module_level_caches() -> list[str]:
    """Module-level assignments of a dict, a WeakKeyDictionary or a WeakSet not passed to register_cache."""
    found = []
    for folder, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            with open(path) as fh:
                tree = ast.parse(fh.read(), path)
            for node in tree.body:
                if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
                    continue
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                name = getattr(target, "id", "")
                if name in REGISTRIES or name == "__all__":
                    continue
                value = node.value
                if isinstance(value, ast.Call) and isinstance(value.func, ast.Call):  # lru_cache(maxsize=n)(f)
                    value = value.func
                store = isinstance(value, ast.Dict) or (
                    isinstance(value, ast.Call) and getattr(value.func, "attr", getattr(value.func, "id", ""))
                    in ("dict", "WeakKeyDictionary", "WeakValueDictionary", "WeakSet", "OrderedDict", "lru_cache",
                        "cache"))
                if store and not (isinstance(value, ast.Dict) and value.keys):  # a literal table is no cache
                    found.append(f"{os.path.relpath(path, PACKAGE_DIR)}: {name}")
    return found


def test_no_module_level_cache_is_left_out_of_the_registry():
    """Every process-wide cache goes through register_cache (so clear_caches reaches it); a module-level empty
    dict, weak map or lru_cache that does not is one clear_caches would miss. compat and sites hold five they cannot
    register themselves (they import nothing of localmap): the compiled path, the check and errors register them."""
    registered_elsewhere = {"compat/compiling.py: _SURFACING", "compat/dtensor.py: _propagated",
                            "compat/recording.py: _shapes", "compat/recording.py: _facts",
                            "sites.py: _library_file"}
    unregistered = [c for c in _module_level_caches() if c not in registered_elsewhere]
    assert not unregistered, unregistered
