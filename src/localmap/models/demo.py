"""The demo's model: a small Llama-style language model written with localmap regions.

    tokens [batch, seq] --embedding--> x [batch, seq, dim]
    per layer:
      x = x + attention(rms_norm(x))       q/k/v/o projections in DTensor; the core (causal SDPA) is a region
                                           sharded over batch ('dp') and heads ('tp')
      x = x + moe(rms_norm(x))             router and experts in one expert-parallel region over 'tp': tokens
                                           are dispatched to the rank holding their experts with
                                           collectives.all_to_all_single (split sizes from the routing, read
                                           with .tolist()), run through that rank's expert MLPs, and combined
    loss = cross_entropy(rms_norm(x) @ head, targets)    the per-token loss sum is a region (Partial over 'dp')

The same module runs three ways: on DTensors (each region on every rank's shard), on plain global tensors under
``localmap.capture`` (regions become graph nodes) and, with ``reference=True``, on one device (regions run on the
whole tensors; the expert-parallel region, whose body talks to other ranks, is replaced by the same mixture of
experts computed densely). Parameters are created on one device; ``placements()`` says how each is laid out on a
(dp, tp) mesh.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import Partial, Replicate, Shard

from localmap import collectives as C
from localmap import local_map
from localmap.models.llama import project_heads, rms_norm

S0, S1, S2, R, P = Shard(0), Shard(1), Shard(2), Replicate(), Partial()
EP = "tp"  # the mesh dim experts are spread over


# ---- regions' bodies (local code) ---------------------------------------------------------------------------

def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, head_dim] -> same; this rank's batch rows and heads."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their softmax weights: ids [tokens, k], gates [tokens, k]."""
    top, ids = (x @ router).topk(top_k, dim=-1)
    return ids, F.softmax(top, dim=-1)


def _expert_mlps(x: torch.Tensor, expert: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Row i of x through expert expert[i]'s MLP (experts indexed into w1 [E, dim, hidden], w2 [E, hidden, dim])."""
    y = F.gelu(x.unsqueeze(0) @ w1) @ w2  # [E, rows, dim]: every row through every expert (small E, traceable)
    return y[expert, torch.arange(x.shape[0], device=x.device)]


def moe_expert_parallel(x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                        top_k: int) -> torch.Tensor:
    """x [batch, seq, dim] (this rank's tokens), router [dim, E] (all), w1/w2 this rank's experts.
    Dispatch each (token, choice) to the rank holding its expert, run the experts, send back, combine."""
    ranks = C.axis_size(EP)
    local_experts = w1.shape[0]
    tokens = x.reshape(-1, x.shape[-1])
    ids, gates = _route(tokens, router, top_k)
    flat_ids = ids.reshape(-1)                                      # [tokens * k], choice j of token t at t*k+j
    order = flat_ids.argsort(stable=True)                           # grouped by expert, so by destination rank
    sent = tokens.repeat_interleave(top_k, dim=0)[order]
    counts = torch.bincount(flat_ids, minlength=ranks * local_experts)           # rows per expert
    got = C.all_to_all_single(counts, EP)                           # rows for my experts, per source rank
    send_splits = counts.view(ranks, local_experts).sum(1).tolist()
    recv_splits = got.view(ranks, local_experts).sum(1).tolist()
    received = C.all_to_all_single(sent, EP, recv_splits, send_splits)
    local_ids = torch.repeat_interleave(torch.arange(local_experts, device=x.device).repeat(ranks),
                                        got.reshape(-1), output_size=received.shape[0])
    out = _expert_mlps(received, local_ids, w1, w2)
    back = C.all_to_all_single(out, EP, send_splits, recv_splits)
    unsorted = back.index_select(0, order.argsort())                 # back in token order (rows known from order)
    combined = (unsorted.view(-1, top_k, tokens.shape[-1]) * gates.unsqueeze(-1)).sum(1)
    return combined.view(x.shape)


def moe_dense(x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              top_k: int) -> torch.Tensor:
    """The same mixture of experts on one device, every expert on the whole tensor (the reference)."""
    tokens = x.reshape(-1, x.shape[-1])
    ids, gates = _route(tokens, router, top_k)
    out = sum(gates[:, j:j + 1] * _expert_mlps(tokens, ids[:, j], w1, w2) for j in range(top_k))
    return out.view(x.shape)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, count: int) -> torch.Tensor:
    """This rank's share of the mean cross entropy: sum over its tokens / all tokens (a partial sum)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum") / count


# ---- the model ------------------------------------------------------------------------------------------------

HEADS = [S0, S1]  # [batch, heads, seq, head_dim]: batch over dp, heads over tp


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, experts: int, hidden: int, top_k: int, reference: bool) -> None:
        super().__init__()
        s = 1 / math.sqrt(dim)
        self.heads, self.top_k, self.reference = heads, top_k, reference
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.randn(dim, dim) * s) for _ in range(4))
        self.moe_norm = nn.Parameter(torch.ones(dim))
        self.router = nn.Parameter(torch.randn(dim, experts) * s)
        self.w1 = nn.Parameter(torch.randn(experts, dim, hidden) * s)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, dim) / math.sqrt(hidden))
        self.attention = local_map(attention_core, out_placements=HEADS, in_placements=(HEADS, HEADS, HEADS),
                                   in_grad_placements=(HEADS, HEADS, HEADS))
        # Tokens: batch over dp, sequence over tp (each tp rank routes its own tokens); experts over tp. The
        # gradient placements are inferred by the check: the replicated router meets per-rank tokens on both mesh
        # dims (a partial sum over both); the experts are replicated over dp and meet per-rank tokens there.
        # The check proves the claim: tokens sorted by expert, dispatched by all_to_all to the rank holding their
        # expert, run through it, combined by the inverse all_to_all and un-permuted (docs/check-rules.md).
        self.moe = local_map(moe_expert_parallel, out_placements=[S0, S1],
                             in_placements=([S0, S1], [R, R], [R, S0], [R, S0], None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = project_heads(rms_norm(x, self.attn_norm), (self.wq, self.wk, self.wv), self.heads)
        o = self.attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + _replicate_tp(o @ self.wo)
        h = _to_tokens(rms_norm(x, self.moe_norm))
        moe = moe_dense if self.reference else self.moe
        return x + _replicate_tp(moe(h, self.router, self.w1, self.w2, self.top_k))


class DemoLlama(nn.Module):
    """(tokens, targets) [batch, seq] -> mean next-token cross entropy."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, experts: int = 4, hidden: int = 32,
                 layers: int = 2, top_k: int = 2, reference: bool = False) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(vocab, dim) * 0.5)
        self.layers = nn.ModuleList(Layer(dim, heads, experts, hidden, top_k, reference) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(dim))
        self.head = nn.Parameter(torch.randn(dim, vocab) / math.sqrt(dim))
        self.loss = local_map(token_loss_sum, out_placements=[P, R], in_placements=([S0, R], [S0, R], None),
                              in_grad_placements=([S0, R], [S0, R], None))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.embed)
        for layer in self.layers:
            x = layer(x)
        logits = rms_norm(x, self.norm) @ self.head
        return self.loss(logits, targets, targets.numel())

    @staticmethod
    def placements(name: str) -> list:
        """How parameter `name` is laid out on a (dp, tp) mesh: q/k/v column-parallel and o row-parallel over
        tp (so heads split over tp), experts over tp, everything else replicated."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("wq", "wk", "wv"):
            return [R, S1]
        if leaf == "wo" or leaf in ("w1", "w2"):
            return [R, S0]
        return [R, R]


def _is_dtensor(x: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _replicate_tp(x: torch.Tensor) -> torch.Tensor:
    """On DTensors: bring a value to (Shard(0), Replicate()) (an all-reduce of a partial sum, or an all-gather
    of a sequence shard, over tp). Plain tensors are already whole."""
    return x.redistribute(x.device_mesh, [S0, R]) if _is_dtensor(x) else x


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """On DTensors: split the sequence over tp (no communication: each rank keeps its slice)."""
    return x.redistribute(x.device_mesh, [S0, S1]) if _is_dtensor(x) else x
