"""localmap.program.cost.reshard_bytes: ring costs per mesh dim of size n on the bytes B rank 0 holds before the
collective: Shard -> Replicate (n - 1) B, Partial -> Replicate 2 (n - 1) / n B, Partial -> Shard (n - 1) / n B,
Shard(a) -> Shard(b) (n - 1) / n B, Replicate -> anything 0."""

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from localmap.program.cost import at_least, reshard_bytes, tensor_bytes

S0, S1, R, P = Shard(0), Shard(1), Replicate(), Partial()

# A float32 (8, 4) tensor on 4 ranks: 128 bytes whole, 32 bytes for a shard of dim 0 (2 rows).
WHOLE, SHARD = 8 * 4 * 4, 2 * 4 * 4


@pytest.mark.parametrize("src,dst,sent", [
    ([S0], [R], 3 * SHARD),  # all-gather: 96
    ([P], [R], 2 * 3 / 4 * WHOLE),  # all-reduce: 192
    ([P], [S0], 3 / 4 * WHOLE),  # reduce-scatter: 96
    ([S0], [S1], 3 / 4 * SHARD),  # all-to-all: 24
    ([R], [S0], 0),  # a local slice
    ([R], [P], 0),  # a local share
    ([S0], [S0], 0),
    ([P], [P], 0),
], ids=["S->R", "P->R", "P->S", "S(0)->S(1)", "R->S", "R->P", "S->S", "P->P"])
def test_reshard_bytes_on_one_mesh_dim(src, dst, sent):
    assert reshard_bytes((8, 4), torch.float32, src, dst, (4,)) == pytest.approx(sent)


def test_reshard_bytes_counts_rank_0s_shard_when_uneven():
    # 10 rows on 4 ranks: rank 0 holds 3 rows, 3 * 4 * 4 = 48 bytes; all-gather sends 3 * 48.
    assert reshard_bytes((10, 4), torch.float32, [S0], [R], (4,)) == 144


def test_reshard_bytes_dtype():
    # bfloat16: 2 bytes an element; a (2, 4) shard is 16 bytes; all-gather over 4 ranks sends 48.
    assert reshard_bytes((8, 4), torch.bfloat16, [S0], [R], (4,)) == 48


def test_reshard_bytes_per_mesh_dim_on_a_2d_mesh():
    # (8, 4) float32 on a 2x4 mesh held as (Shard(0), Partial): rank 0 holds a (4, 4) block, 64 bytes.
    # Mesh dim 0 (2 ranks) all-gathers: 1 * 64; mesh dim 1 (4 ranks) all-reduces: 2 * 3 / 4 * 64 = 96.
    assert reshard_bytes((8, 4), torch.float32, [S0, P], [R, R], (2, 4)) == pytest.approx(64 + 96)
    assert reshard_bytes((8, 4), torch.float32, [S0, P], [S0, R], (2, 4)) == pytest.approx(96)
    assert reshard_bytes((8, 4), torch.float32, [R, R], [S0, S1], (2, 4)) == 0


def test_tensor_bytes_and_at_least():
    assert tensor_bytes((3, 5), torch.float64) == 120
    assert tensor_bytes((), torch.float32) == 4
    assert tensor_bytes((0, 7), torch.float32) == 0
    assert at_least(7) == 7
