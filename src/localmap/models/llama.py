"""Small models written with localmap regions, shared by the demo, the tests and the benchmarks.

- ``LlamaBlock``: RMSNorm, attention whose core is a region sharded over heads ('tp') and batch ('dp'), an MLP
  region (column- then row-parallel over 'tp', tokens over 'dp'), residuals.
- ``MoEBlock``: a router and experts sharded over 'ep'; each rank runs its experts on the tokens routed to them
  in a region whose output is a partial sum over 'ep'.
- ``GroupedExperts``: torchtitan's grouped experts, whose region reads its DTensor weights from the module.
- ``Llama``: embedding, N blocks, norm, head; a scalar loss. ``Llama.seven_b(mesh)`` has the shapes of a
  7B-parameter Llama (32 layers, d=4096, 32 heads, hidden 11008, vocab 32000).
All take global-shaped plain tensors; regions use the mesh given (or localmap.use_mesh's).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from localmap import local_map

S0, S1, R, P = Shard(0), Shard(1), Replicate(), Partial()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def project_heads(h: torch.Tensor, weights: tuple, heads: int) -> tuple:
    """[batch, seq, dim] times each weight, split into [batch, heads, seq, head_dim]."""
    b, t, d = h.shape
    return tuple((h @ w).view(b, t, heads, d // heads).transpose(1, 2) for w in weights)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def _param(*shape: int, scale: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * scale)


class LlamaBlock(nn.Module):
    """x [batch, seq, dim] -> same. Regions: attention core over (dp: batch, tp: heads), MLP over
    (dp: batch, tp: hidden), on a 2-D mesh (dp, tp)."""

    def __init__(self, dim: int, heads: int, hidden: int, mesh: DeviceMesh | None = None) -> None:
        super().__init__()
        self.heads = heads
        s = 1 / math.sqrt(dim)
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.wq, self.wk, self.wv, self.wo = (_param(dim, dim, scale=s) for _ in range(4))
        self.mlp_norm = nn.Parameter(torch.ones(dim))
        self.w_gate, self.w_up = _param(dim, hidden, scale=s), _param(dim, hidden, scale=s)
        self.w_down = _param(hidden, dim, scale=1 / math.sqrt(hidden))
        heads_spec = [S0, S1]  # [batch, heads, seq, head_dim]: batch over dp, heads over tp
        self.attention = local_map(attention_core, out_placements=heads_spec,
                                   in_placements=(heads_spec, heads_spec, heads_spec), device_mesh=mesh)
        # MLP: activations [batch, seq, dim] over dp; weights column/row-parallel over tp. A replicated weight
        # meeting sharded data has a partial-sum gradient on that mesh dim.
        self.mlp = local_map(swiglu_mlp, out_placements=[S0, P],
                             in_placements=([S0, R], [R, S1], [R, S1], [R, S0]),
                             in_grad_placements=([S0, P], [P, S1], [P, S1], [P, S0]), device_mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = project_heads(rms_norm(x, self.attn_norm), (self.wq, self.wk, self.wv), self.heads)
        o = self.attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + o @ self.wo
        return x + self.mlp(rms_norm(x, self.mlp_norm), self.w_gate, self.w_up, self.w_down)


def experts_forward(x: torch.Tensor, scores: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    first_expert: torch.Tensor) -> torch.Tensor:
    """This rank's experts on the tokens routed to them, weighted by router scores; zero elsewhere.
    x [tokens, dim] (all tokens), scores [tokens, experts] (all experts), w1 [local_experts, dim, hidden],
    w2 [local_experts, hidden, dim], first_expert: index of this rank's first expert (0-d)."""
    local = w1.shape[0]
    mine = scores.narrow(1, 0, scores.shape[1]).index_select(
        1, first_expert.reshape(1) + torch.arange(local, device=x.device))  # [tokens, local]
    hidden = F.gelu(torch.einsum("td,edh->eth", x, w1))
    out = torch.einsum("eth,ehd->etd", hidden, w2)  # [local, tokens, dim]
    return torch.einsum("te,etd->td", mine, out)


class MoEBlock(nn.Module):
    """x [tokens, dim] -> same. Top-k router (global), experts sharded over 'ep' in a region whose output
    is a partial sum over 'ep' (each rank adds its experts' share)."""

    def __init__(self, dim: int, hidden: int, experts: int, top_k: int = 2, mesh: DeviceMesh | None = None) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = _param(dim, experts, scale=1 / math.sqrt(dim))
        self.w1 = _param(experts, dim, hidden, scale=1 / math.sqrt(dim))
        self.w2 = _param(experts, hidden, dim, scale=1 / math.sqrt(hidden))
        self.register_buffer("expert_ids", torch.arange(experts))
        # first_expert: the ids buffer sharded over ep, so each rank sees its own first id.
        self.experts = local_map(_experts_region, out_placements=[P],
                                 in_placements=([R], [R], [S0], [S0], [S0]),
                                 in_grad_placements=([P], [P], [S0], [S0], [S0]), device_mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.router
        top, idx = logits.topk(self.top_k, dim=-1)
        scores = torch.zeros_like(logits).scatter(-1, idx, F.softmax(top, dim=-1))
        return x + self.experts(x, scores, self.w1, self.w2, self.expert_ids)


def _experts_region(x: torch.Tensor, scores: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    return experts_forward(x, scores, w1, w2, ids[0])


class Llama(nn.Module):
    """tokens [batch, seq] -> scalar loss (next-token cross entropy)."""

    def __init__(self, vocab: int, dim: int, heads: int, hidden: int, layers: int,
                 mesh: DeviceMesh | None = None) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(vocab, dim) * 0.02)
        self.blocks = nn.ModuleList(LlamaBlock(dim, heads, hidden, mesh) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(dim))
        self.head = nn.Parameter(torch.randn(dim, vocab) / math.sqrt(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.embed)
        for block in self.blocks:
            x = block(x)
        logits = rms_norm(x, self.norm) @ self.head
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    @staticmethod
    def seven_b(mesh: DeviceMesh | None = None) -> "Llama":
        """The shapes of a 7B-parameter Llama; build it under torch.device('meta') to allocate nothing."""
        return Llama(vocab=32000, dim=4096, heads=32, hidden=11008, layers=32, mesh=mesh)


class GroupedExperts(nn.Module):
    """torchtitan's grouped experts: x [experts, tokens per expert, dim] -> same, a SwiGLU MLP per expert with
    w1, w3 [experts, dim, hidden] and w2 [experts, hidden, dim]. As in torchtitan the region's body reads the
    weights from the module (``self.w1.to_local()``), not as arguments: shard them as DTensors (``shard``),
    experts over 'ep' and, on a mesh with 'tp', the hidden dim over 'tp' (the output is then a partial sum)."""

    def __init__(self, dim: int, hidden: int, experts: int, mesh: DeviceMesh) -> None:
        super().__init__()
        self.w1 = _param(experts, dim, hidden, scale=1 / math.sqrt(dim))
        self.w2 = _param(experts, hidden, dim, scale=1 / math.sqrt(hidden))
        self.w3 = _param(experts, dim, hidden, scale=1 / math.sqrt(dim))
        self.mesh = mesh
        tp = "tp" in (mesh.mesh_dim_names or ())
        self.experts = local_map(self._grouped_mm, out_placements=[S0, P] if tp else [S0],
                                 in_placements=([S0, R] if tp else [S0],), device_mesh=mesh)

    def placements(self, name: str) -> list:
        """How weight `name` is laid out: experts over 'ep', the hidden dim over 'tp' (if the mesh has it)."""
        hidden_dim = {"w1": 2, "w3": 2, "w2": 1}[name]
        return [S0, Shard(hidden_dim)] if "tp" in (self.mesh.mesh_dim_names or ()) else [S0]

    def shard(self, distribute: Any) -> "GroupedExperts":
        """Make the weights DTensors with `distribute(tensor, mesh, placements)` (e.g. localmap.testing's)."""
        for name in ("w1", "w2", "w3"):
            w = getattr(self, name)
            setattr(self, name, nn.Parameter(distribute(w.detach(), self.mesh, self.placements(name))))
        return self

    def _grouped_mm(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))
        return torch.bmm(F.silu(torch.bmm(x, w1)) * torch.bmm(x, w3), w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x)
