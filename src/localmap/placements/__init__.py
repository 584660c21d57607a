"""Placements as values: what a spec may be and how it maps onto leaves (``specs``), shard geometry
(``shapes``), the rules every path shares (``algebra``: gradient default, average scaling, extreme Partials)
and the type lattice the checker computes in (``types``). Pure: no communication, no tracing."""
