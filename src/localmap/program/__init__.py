"""Whole programs: ``capture`` (a training step as forward and backward graphs, each region one node), ``cost``
(FLOPs, saved bytes, communication), ``run`` (the program rank by rank on one device), ``split`` (per-rank
pieces by placements and back), ``verify`` (run against one device) and ``draw`` (report and picture)."""
