"""localmap: per-shard code inside global PyTorch programs.

Public surface:
- ``local_map``: run a function on the local shards of DTensors and get DTensors back (drop-in for
  ``torch.distributed.tensor.experimental.local_map``).
- ``LocalMapError``: raised for bad input, naming the argument path, mesh dim, expected, given and fix.
- ``Shard``, ``Replicate``, ``Partial``: PyTorch's own placement types, re-exported.
- ``capture``/``CapturedProgram``/``Region``: a training step as graphs, regions one node each, measured and
  runnable on one device; ``verify`` compares that run with the model; ``use_mesh`` sets a default mesh.
- ``localmap.collectives``: collectives by mesh dim for region bodies (all_reduce, all_gather, reduce_scatter,
  all_to_all(_single), ppermute, shift, pvary, axis_index, axis_size), with the gradients placement types need.
- ``localmap.hop``: the operator (``local_map_hop``, ``defer_inlining``).
- ``localmap.testing``: run code on a simulated mesh or on real gloo processes.
- ``cache_info``/``clear_caches``: localmap's process-wide caches (built regions, check verdicts).
"""

from torch.distributed.tensor import Partial, Replicate, Shard

from localmap import collectives
from localmap.caches import cache_info, clear_caches
from localmap.program.capture import CapturedProgram, Region, capture
from localmap.check.verdict import PlacementError, UnprovenError
from localmap.check.rules import linear_in, register_rule
from localmap.placements.types import VARYING, RuleError
from localmap.context import use_mesh
from localmap.eager.region import local_map
from localmap.errors import BodyError, CollectiveError, LocalMapError
from localmap.program.verify import VerificationError, verify

__version__ = "0.1.0"

__all__ = [
    "local_map", "LocalMapError", "Shard", "Replicate", "Partial", "capture", "CapturedProgram", "Region",
    "verify", "VerificationError", "use_mesh", "collectives", "PlacementError", "UnprovenError", "register_rule", "linear_in", "RuleError",
    "VARYING",
    "BodyError", "CollectiveError", "cache_info", "clear_caches", "__version__",
]
