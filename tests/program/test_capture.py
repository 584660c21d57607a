"""capture: whole programs as graphs with regions as nodes, measured, runnable on one device, verified."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import localmap
from localmap import LocalMapError, VerificationError
from localmap.hop import local_map_hop
from localmap.models import Llama, LlamaBlock, MoEBlock
from localmap.testing import fake_mesh
from helpers import P, R, S0, S1


class Loss(nn.Module):
    """A module returning mean(module(x) ** 2): a scalar loss."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).pow(2).mean()


def hop_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is local_map_hop]


def test_llama_block(fake_mesh_2x2):
    torch.manual_seed(0)
    model, x = Loss(LlamaBlock(16, 4, 32, fake_mesh_2x2)), torch.randn(4, 6, 16)
    prog = localmap.capture(model, x)
    assert [r.name for r in prog.regions] == ["attention_core.0", "swiglu_mlp.0"]
    assert len(hop_nodes(prog.forward)) == 2 and len(hop_nodes(prog.backward)) == 2
    attn, mlp = prog.regions
    assert attn.global_in_shapes == [[4, 4, 6, 4]] * 3 and attn.local_in_shapes == [[2, 2, 6, 4]] * 3
    assert mlp.local_in_shapes == [[2, 6, 16], [16, 16], [16, 16], [16, 16]]
    assert mlp.in_grad_placements[1] == (P, S1)
    fw = {n.name: n for n in hop_nodes(prog.forward)}[attn.forward_node]
    assert fw.meta["local_map_kwargs"]["in_placements"][0] == (S0, S1)
    assert tuple(fw.meta["val"][0].shape) == (4, 4, 6, 4)
    bw = {n.name: n for n in hop_nodes(prog.backward)}[attn.backward_node]
    assert bw.meta["local_map_kwargs"]["out_placements"] == ((S0, S1),) * 3
    assert [tuple(g.shape) for g in bw.meta["val"]] == [(4, 4, 6, 4)] * 3  # global-shaped gradients
    assert attn.source.endswith(".py:" + attn.source.split(":")[-1]) and "models/llama.py" in attn.source
    assert attn.flops["forward"] > 0 and attn.flops["backward"] > attn.flops["forward"]
    assert prog.joint is not None and len(hop_nodes(prog.joint)) == 4
    report = localmap.verify(model, x)
    assert report.regions_checked == 2 and report.loss_diff < 1e-5 and len(report.grad_diffs) == 9


def test_moe_block():
    with fake_mesh(4, ("ep",)) as mesh:
        torch.manual_seed(0)
        model, x = Loss(MoEBlock(16, 32, 8, mesh=mesh)), torch.randn(10, 16)
        prog = localmap.capture(model, x)
        (experts,) = prog.regions
        assert experts.local_in_shapes[2] == [2, 16, 32]  # 8 experts over 4 ranks
        result = prog.run(x)
        loss = model(x)  # outside defer_inlining the region is inlined: one device
        assert torch.allclose(result.loss, loss, atol=1e-6)
        localmap.verify(model, x)


def test_region_used_twice_and_nested_modules(fake_mesh_2x2):
    torch.manual_seed(0)
    model = Llama(vocab=32, dim=16, heads=4, hidden=32, layers=2, mesh=fake_mesh_2x2)
    tokens = torch.randint(0, 32, (4, 6))
    prog = localmap.capture(model, tokens)
    assert [r.name for r in prog.regions] == ["attention_core.0", "swiglu_mlp.0", "attention_core.1",
                                              "swiglu_mlp.1"]
    assert len({id(r.forward) for r in prog.regions}) == 2  # identical regions share their graphs
    assert "blocks.0.w_up" in prog.input_names
    localmap.verify(model, tokens)

    block = localmap.local_map(lambda a, w: torch.tanh(a @ w), [S0], ([S0], [R]), ([S0], [P]),
                               tp_submesh(fake_mesh_2x2))

    def twice(x, w):
        return block(block(x, w), w).sum()

    x, w = torch.randn(8, 4), torch.randn(4, 4, requires_grad=True)
    prog = localmap.capture(twice, x, w)
    assert [r.name for r in prog.regions] == ["<lambda>.0", "<lambda>.1"]
    localmap.verify(twice, x, w)


def tp_submesh(mesh):
    return mesh["tp"]


def test_non_tensor_argument(fake_mesh_4):
    scale = localmap.local_map(lambda a, k, name: a * k if name == "mul" else a + k, [S0], ([S0], None, None),
                               device_mesh=fake_mesh_4)

    def f(x, w):
        return scale(x @ w, 3, "mul").pow(2).sum()

    x, w = torch.randn(8, 4), torch.randn(4, 3, requires_grad=True)
    prog = localmap.capture(f, x, w)
    assert len(prog.regions[0].in_placements) == 1  # only the tensor is an operator input
    localmap.verify(f, x, w)


def test_wrong_out_placements_is_named_by_check_and_verify(fake_mesh_2x2):
    """Claiming Replicate on 'tp' for the MLP's partial sum: the check refuses it at capture; with the check
    off the run shows a wrong number and verify names the region."""
    from localmap import PlacementError

    torch.manual_seed(0)
    block = LlamaBlock(16, 4, 32, fake_mesh_2x2)
    x = torch.randn(4, 6, 16)

    def claim_replicate(check):
        block.mlp = localmap.local_map(
            block.mlp.region.func, out_placements=[S0, R], in_placements=([S0, R], [R, S1], [R, S1], [R, S0]),
            in_grad_placements=([S0, P], [P, S1], [P, S1], [P, S0]), device_mesh=fake_mesh_2x2, check=check)
        return Loss(block)

    with pytest.raises(PlacementError, match=r"outputs: is a partial sum over the ranks but is claimed Replicate"
                                             r".*aten.mm.*models/llama.py:\d+.*'tp'"):
        localmap.capture(claim_replicate(True), x)
    model = claim_replicate(False)
    got = localmap.capture(model, x).run(x)
    assert not torch.allclose(got.loss, model(x), atol=1e-4)  # a wrong placement shows as a wrong number
    with pytest.raises(VerificationError, match=r"region swiglu_mlp\.0 .*models/llama\.py:\d+.* output 0 differs"):
        localmap.verify(model, x)


def test_wrong_gradient_placements_are_named_by_verify(fake_mesh_4):
    mm = localmap.local_map(lambda a, w: a @ w, [S0], ([S0], [R]), ([S0], [R]), fake_mesh_4, check=False)

    def f(x, w):
        return mm(x, w).pow(2).sum()

    x, w = torch.randn(8, 4), torch.randn(4, 3, requires_grad=True)
    with pytest.raises(VerificationError, match=r"region <lambda>\.0 .* gradient of input 1 differs"):
        localmap.verify(f, x, w)
    inferred = localmap.local_map(lambda a, w: a @ w, [S0], ([S0], [R]), device_mesh=fake_mesh_4)
    localmap.verify(lambda x, w: inferred(x, w).pow(2).sum(), x, w)  # inferred: Partial, right


def test_costs(fake_mesh_4):
    up = localmap.local_map(lambda a, w: a @ w, [S1], ([R], [S1]), ([P], [S1]), device_mesh=fake_mesh_4)
    down = localmap.local_map(lambda h: h * 2, [R], ([R],), device_mesh=fake_mesh_4)  # needs an all-gather of h

    def f(x, w):
        return down(up(x, w)).sum()

    x, w = torch.randn(8, 16), torch.randn(16, 32, requires_grad=True)
    prog = localmap.capture(f, x, w)
    first, second = prog.regions
    assert first.flops == {"forward": 2 * 8 * 16 * 8, "backward": 2 * 8 * 16 * 8}  # only w needs a gradient
    assert second.comm_detail["inputs"] == 3 * (8 * 8 * 4)  # all-gather: (n - 1) x local bytes
    assert second.comm_bytes == 3 * 8 * 8 * 4 and first.comm_bytes == 0
    assert first.activation_bytes == 8 * 16 * 4  # x saved for w's gradient


def test_report_json_dot_svg(fake_mesh_2x2, tmp_path):
    torch.manual_seed(0)
    prog = localmap.capture(Loss(LlamaBlock(16, 4, 32, fake_mesh_2x2)), torch.randn(4, 6, 16))
    text = prog.report()
    assert "attention_core.0" in text and "swiglu_mlp.0" in text and "total" in text and "2/2 ok" in text
    data = json.loads(prog.to_json())
    assert [r["name"] for r in data["regions"]] == ["attention_core.0", "swiglu_mlp.0"]
    assert data["regions"][1]["out_placements"] == [["Shard(dim=0)", "Partial(sum)"]]
    assert data["totals"]["regions"] == 2 and data["totals"]["flops_forward"] > 0
    assert [r["verdict"] for r in data["regions"]] == ["ok", "ok"]
    dot = prog.to_dot()
    assert dot.startswith("digraph") and "attention_core.0" in dot and "shape=box" in dot
    if shutil.which("dot"):
        path = prog.save_svg(str(tmp_path / "program.svg"))
        assert "<svg" in open(path).read()
    else:
        with pytest.raises(LocalMapError, match="apt-get install graphviz"):
            prog.save_svg(str(tmp_path / "program.svg"))


def test_forward_only_and_errors(fake_mesh_4):
    region = localmap.local_map(lambda a: a.relu(), [S0], ([S0],), device_mesh=fake_mesh_4)
    prog = localmap.capture(lambda x: region(x) * 2, torch.randn(8, 4), backward=False)
    assert prog.backward is None and prog.regions[0].backward is None
    assert torch.allclose(prog.run(torch.ones(8, 4)).loss[0], torch.full((8, 4), 2.0))
    with pytest.raises(LocalMapError, match="scalar loss"):
        localmap.capture(lambda x: region(x), torch.randn(8, 4, requires_grad=True))


def test_use_mesh_sets_the_default(fake_mesh_4):
    region = localmap.local_map(lambda a: a * 2, [S0], ([S0],))
    with localmap.use_mesh(fake_mesh_4):
        prog = localmap.capture(lambda x: region(x).sum(), torch.randn(8, 4, requires_grad=True))
    assert prog.regions[0].mesh is fake_mesh_4 and prog.regions[0].local_in_shapes == [[2, 4]]
    with pytest.raises(LocalMapError, match="use_mesh"):
        localmap.capture(lambda x: region(x).sum(), torch.randn(8, 4, requires_grad=True))


SEVEN_B = """
import resource, sys, torch
import localmap
from localmap.models import Llama
from localmap.testing import fake_mesh
with fake_mesh((8, 8), ("dp", "tp")) as mesh:
    with torch.device("meta"):
        model = Llama.seven_b(mesh)
    params = sum(p.numel() for p in model.parameters())
    prog = localmap.capture(model, torch.zeros(8, 2048, dtype=torch.long, device="meta"))
    print(params, len(prog.regions), len(prog.backward.graph.nodes) > 0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_seven_b_capture_on_meta_within_memory():
    """The shapes of a 7B Llama (32 layers, d=4096) captured without allocating: peak RSS under 2 GiB."""
    out = subprocess.run([sys.executable, "-c", SEVEN_B], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    params, regions, has_backward, peak_mib = out.stdout.split()
    assert 6.5e9 < int(params) < 7.0e9 and int(regions) == 64 and has_backward == "True"
    assert int(peak_mib) < 2048, f"peak RSS {peak_mib} MiB"
