"""localmap.placements.shapes: torch.chunk's layout of shards, uneven detection, local and global shapes, strides.
Expected values are worked out by hand in each test (10 rows on 4 ranks: ceil(10 / 4) = 3 rows per rank until
the rows run out: 3, 3, 3, 1)."""

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from localmap.placements.shapes import (chunk_sizes, dense_stride, even_global_shape, is_uneven, like_stride,
                                        local_shape, shard_dims, view_group)

S0, S1, R, P = Shard(0), Shard(1), Replicate(), Partial()


@pytest.mark.parametrize("total,parts,sizes", [
    (10, 4, [3, 3, 3, 1]),
    (8, 4, [2, 2, 2, 2]),
    (9, 4, [3, 3, 3, 0]),  # the last rank gets nothing: 3 + 3 + 3 = 9
    (3, 4, [1, 1, 1, 0]),
    (1, 4, [1, 0, 0, 0]),
    (0, 4, [0, 0, 0, 0]),
    (5, 2, [3, 2]),
    (7, 1, [7]),
])
def test_chunk_sizes(total, parts, sizes):
    assert chunk_sizes(total, parts) == sizes


def test_shard_dims_lists_mesh_dims_per_tensor_dim_in_mesh_order():
    assert shard_dims([S0, R, S0, S1]) == {0: [0, 2], 1: [3]}
    assert shard_dims([R, P]) == {}


def test_is_uneven_on_one_mesh_dim(fake_mesh_4):
    assert is_uneven((10, 4), [S0], fake_mesh_4)  # 3, 3, 3, 1
    assert not is_uneven((8, 4), [S0], fake_mesh_4)
    assert not is_uneven((0, 4), [S0], fake_mesh_4)  # 0, 0, 0, 0: every shard the same size
    assert not is_uneven((10, 4), [R], fake_mesh_4) and not is_uneven((10, 4), [P], fake_mesh_4)


def test_is_uneven_on_two_mesh_dims(fake_mesh_2x2):
    assert is_uneven((8, 5), [S0, S1], fake_mesh_2x2)  # 5 columns on 2 ranks
    assert is_uneven((6, 4), [S0, S0], fake_mesh_2x2)  # dim 0 nested over both mesh dims: 6 rows on 4 ranks
    assert not is_uneven((6, 4), [S0, R], fake_mesh_2x2)  # 6 rows on 2 ranks
    assert not is_uneven((8, 4), [S0, S0], fake_mesh_2x2)


def test_local_shape_one_mesh_dim():
    assert [local_shape((10, 6), [S0], [4], [c]) for c in range(4)] == [[3, 6], [3, 6], [3, 6], [1, 6]]
    assert local_shape((1, 4), [S0], [4], [2]) == [0, 4]  # an empty shard
    assert local_shape((10, 6), [R], [4], [3]) == [10, 6] and local_shape((10, 6), [P], [4], [3]) == [10, 6]


def test_local_shape_of_a_dim_sharded_on_two_mesh_dims():
    """The earlier mesh dim splits first, the later one splits each block: 10 rows on 2x2 are 5, 5 and then
    3, 2 within each block (not 3, 3, 3, 1 as on a flat 4-rank mesh); 7 rows are 4, 3 and then 2, 2 and 2, 1."""
    assert {c: local_shape((10, 2), [S0, S0], [2, 2], c)[0] for c in ((0, 0), (0, 1), (1, 0), (1, 1))} == \
        {(0, 0): 3, (0, 1): 2, (1, 0): 3, (1, 1): 2}
    assert {c: local_shape((7, 2), [S0, S0], [2, 2], c)[0] for c in ((0, 0), (0, 1), (1, 0), (1, 1))} == \
        {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 1}


def test_local_shape_two_dims_on_two_mesh_dims():
    # dim 1 (5) over mesh dim 0: 3, 2; dim 0 (7) over mesh dim 1: 4, 3.
    assert local_shape((7, 5), [S1, S0], [2, 2], [1, 1]) == [3, 2]
    assert local_shape((7, 5), [S1, S0], [2, 2], [0, 0]) == [4, 3]


def test_even_global_shape():
    assert even_global_shape([2, 3], [S0, S1], [2, 4]) == [4, 12]
    assert even_global_shape([2, 3], [S0, S0], [2, 2]) == [8, 3]
    assert even_global_shape([2, 3], [R, P], [2, 4]) == [2, 3]


def test_dense_stride():
    assert dense_stride((2, 3, 4), (12, 4, 1)) == (12, 4, 1)  # row-major stays row-major
    assert dense_stride((2, 3), (1, 2)) == (1, 2)  # column-major (a transpose) stays column-major
    assert dense_stride((2, 3, 4), (1, 8, 2)) == (1, 8, 2)  # dims ordered 1, 2, 0 from outer to inner
    assert dense_stride((4, 0), (1, 1)) == (1, 1) == torch.empty(4, 0).stride()  # size 0 counts as 1


def test_like_stride():
    assert like_stride((4, 6), (6, 1)) == (6, 1)
    assert like_stride((4, 6), (1, 4)) == (1, 4)
    assert like_stride((1, 6), (0, 1)) == (1, 1)  # a size-1 dim's 0 stride is not a broadcast: dense
    broadcast = like_stride((4, 6), (0, 1))  # an expanded row: the broadcast dim keeps stride 0
    assert broadcast[0] == 0 and broadcast[1] > 0


@pytest.mark.parametrize("src,dst,dim,group", [
    ((2, 3, 4), (6, 4), 1, (0,)),  # flatten(0, 1): dims 0 and 1 become output dim 0
    ((2, 3, 4), (6, 4), 2, (1,)),
    ((2, 6), (2, 2, 3), 1, (1, 2)),  # a heads split: dim 1 becomes output dims 1 and 2
    ((1, 1, 2), (1, 2), 2, (1,)),  # flatten(0, 1) beside sizes of 1: dim 2 is output dim 1, not 0
    ((1, 1, 1), (1, 1), 2, (1,)),  # a size-1 dim left at the end joins the last group
    ((4,), (1, 4), 0, (0, 1)),  # a new dim of 1 before it: the group holds both
    ((3, 1), (3,), 1, (0,)),
    ((2, 3), (3, 2), 0, (0, 1)),  # no finer grouping: the whole shape is one group
    ((2, 3), (5,), 0, ()),  # not a reshape
])
def test_view_group(src, dst, dim, group):
    assert view_group(src, dst, dim) == group
