"""The fence: every PyTorch-private API localmap uses is reached through this package and nowhere else.

A new PyTorch release should need changes here only (``tests/unit/test_layout.py`` walks the package's imports
and fails on a private ``torch`` name used outside it). One module per topic:

- ``dtensor``: DTensor specs, its C++ constructor, local tensors, redistribution, sharding propagation, the
  gradient-placement default;
- ``simulation``: LocalTensorMode and the fake process group (the simulated mesh);
- ``collectives``: the functional collectives and their graph ops;
- ``compiling``: localmap's own checks run at Dynamo trace time (torch.compile), their errors unwrapped;
- ``tracing``: the operator machinery, fake modes, make_fx isolation, partitioners, checkpointing, flop formulas;
- ``recording``: the placement check's light trace (a body's aten ops recorded on meta tensors);
- ``dynamo``: Dynamo and the planner's capture pipeline (PyTorch's local_map operator under Dynamo, its wrapping
  and deferral switches, trace-time calls);
- ``versions``: the running release and every behaviour that differs by release.

Names are re-exported here, so callers write ``compat.make_spec(...)``.
"""

from torch.utils import _pytree as pytree

from localmap.compat.collectives import (
    FUNCTIONAL_OPS, AsyncCollectiveTensor, all_gather_stack, group_size, is_functional_collective, wait, wait_local,
)
from localmap.compat.compiling import (
    compiler_collectives_on, optimization_hint, size_hint, surfacing, surfacing_types, trace_time, traced_local,
)
from localmap.compat.dynamo import at_trace_time, dynamo_graph_mark, factory_calls_since
from localmap.compat.dtensor import (
    DTensorSpec, TensorMeta, global_shape_and_stride, grad_placements_default, is_strided_shard, sharded_dim, view_rule_hangs,
    clear_propagation_cache, drop_probe_mode, probe_modes_held, propagation_cache_size, strided_shard,
    local_tensor_of, make_dtensor, make_spec, propagate_sharding, quiet_fake_tensor_errors, redistribute_local, spec_of,
    to_local_of_real_refused,
    to_local_substituted,
)
from localmap.compat.simulation import (
    compiling_simulated, fake_process_group, forget_ended_world, is_simulated, local_tensor_mode, mesh_ranks,
    outside_simulation, reconcile, simulation_off_the_stack,
    simulated_local, simulated_rank_map, simulated_value, simulation_active, simulation_mode_type, simulation_set_aside, value_on_rank,
)
from localmap.compat.tracing import (
    DispatchKey, FakeTensorMode, HigherOrderOperator, OpOverload, ProxyTorchDispatchMode, below_autograd,
    check_decompositions, copy_forward_meta_to_backward, current_trace_graph, detect_fake_mode, fast_apply,
    call_argument, draws_random, has_free_unbacked_symbols, has_random_ops, ignore_fresh_unbacked, known_equal, in_backward, is_data_dependent_error, untraceable_why, compiling_one_graph, is_fake, is_random_op, isolated_tracing, joint_partition, lazy_graph_modules, make_fx, make_fx_on_values,
    new_fake_mode, node_sites, op_schema, own_node_meta, partitioner, plain_signature, register_cpu_attention_flops,
    reparametrized, sac_active, version_counter,
    sac_modes, storage_key, trace_lock, track_tensor_tree, without_saved_tensor_hooks,
)
from localmap.compat.recording import (
    NotRecordable, clear_facts_cache, clear_shape_cache, facts_cache_size, record, shape_cache_size,
)
from localmap.compat.versions import TORCH_AT_LEAST_2_14, TORCH_RELEASE

__all__ = [
    "NotRecordable", "clear_facts_cache", "clear_shape_cache", "facts_cache_size", "record", "shape_cache_size",
    "pytree", "FUNCTIONAL_OPS", "AsyncCollectiveTensor", "all_gather_stack", "group_size", "is_functional_collective",
    "wait", "wait_local", "DTensorSpec", "TensorMeta", "global_shape_and_stride", "grad_placements_default",
    "view_rule_hangs", "local_tensor_of", "make_dtensor", "make_spec", "propagate_sharding",
    "quiet_fake_tensor_errors", "redistribute_local", "spec_of", "is_strided_shard", "sharded_dim", "clear_propagation_cache", "drop_probe_mode", "probe_modes_held", "propagation_cache_size", "strided_shard", "to_local_substituted", "to_local_of_real_refused", "compiling_simulated", "fake_process_group", "is_simulated",
    "forget_ended_world", "local_tensor_mode", "mesh_ranks", "outside_simulation", "reconcile", "simulated_local", "simulated_rank_map",
    "simulated_value", "simulation_active", "simulation_mode_type", "simulation_off_the_stack", "simulation_set_aside", "value_on_rank", "DispatchKey", "FakeTensorMode", "HigherOrderOperator",
    "OpOverload", "ProxyTorchDispatchMode", "below_autograd", "check_decompositions",
    "copy_forward_meta_to_backward", "current_trace_graph", "detect_fake_mode", "fast_apply",
    "call_argument", "draws_random", "has_free_unbacked_symbols", "known_equal", "has_random_ops", "ignore_fresh_unbacked", "in_backward", "is_data_dependent_error", "untraceable_why", "compiling_one_graph", "is_fake", "is_random_op", "isolated_tracing", "joint_partition", "lazy_graph_modules", "make_fx",
    "make_fx_on_values", "new_fake_mode", "node_sites", "op_schema", "own_node_meta", "partitioner", "plain_signature", "register_cpu_attention_flops",
    "reparametrized", "sac_active", "sac_modes", "storage_key", "trace_lock", "track_tensor_tree",
    "without_saved_tensor_hooks", "version_counter", "TORCH_AT_LEAST_2_14", "TORCH_RELEASE", "optimization_hint", "size_hint", "surfacing", "surfacing_types", "trace_time",
    "traced_local", "at_trace_time", "dynamo_graph_mark", "factory_calls_since", "compiler_collectives_on",
]
