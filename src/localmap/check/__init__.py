"""The placement check: rules as data (``rules``), DTensor's sharding propagation as the default rule
(``propagation``), typing a body graph and inferring gradient placements (``checker``), tracing and caching a
function's verdict (``function``) and the no-input-mutation rule (``mutation``)."""
