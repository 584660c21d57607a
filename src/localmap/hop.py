"""The local_map operator, public names (implemented in ``localmap.traced.operator``)."""

from localmap.traced.dynamo_capture import region_operator
from localmap.traced.operator import LocalMapHOP, defer_inlining, is_deferring, local_map_hop

__all__ = ["local_map_hop", "defer_inlining", "is_deferring", "LocalMapHOP", "region_operator"]
