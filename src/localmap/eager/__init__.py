"""The eager front end: ``local_map`` on DTensors (``region``: ``RegionCallable``, one per wrapped function),
its cached plans (``plans``), its two batched autograd nodes (``autograd``), uneven shards (``uneven``) and
the path ``torch.compile`` traces (``compiled``)."""
