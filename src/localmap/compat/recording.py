"""A light trace for the placement check: the aten ops a body runs, recorded into an fx graph while the body
runs on meta tensors, without make_fx's proxies and fake tensors (NOTE: the check's light trace;
docs/check-verdicts.md, "Cost and budget").

make_fx pays, per op, for a fake tensor's dispatch (its cache key, its output built from a cache entry) and for
a proxy's bookkeeping (argument trees flattened several times, a snapshot of the fake value, a stack of torch
function modes). The check only reads the graph: each node's target, arguments and output metadata. So the
recorder runs each op on meta tensors, remembers the output metadata of ops whose outputs alias nothing (an
op repeated on the same shapes, as in a layer stack, costs a dictionary lookup and an empty meta tensor), and
appends the node directly. It builds the graph make_fx builds (the same ops in the same order, the same
decompositions, ``lift_fresh`` recorded as ``lift_fresh_copy``, a ``get_attr`` per use of a tensor the body
closes over, one ``getitem`` per element of a multi-output op), and refuses (``NotRecordable``) whatever only
make_fx follows: a value read into Python (``.item()``, ``.tolist()``, ``if x.sum() > 0``), a tensor subclass,
a higher-order op, symbolic sizes, a write into a tensor the body closes over, attention (its composite kernel
picks the fused CPU kernel for make_fx's CPU fakes and the math decomposition for meta tensors), an op without
a meta kernel. The caller then traces with make_fx, so a refusal costs time, never a different graph.
"""

from __future__ import annotations

import operator
import types as _types
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx as fx
from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode, autograd_would_have_decomposed


_CPU_STAND_IN = torch.empty(0)


class NotRecordable(Exception):
    """The body does something the light trace does not follow (the caller traces it with make_fx)."""


_SHAPES_LIMIT = 16384  # output metadata remembered (cleared when full)
# (op, argument metadata) -> output metadata (shape, stride, dtype) or a tuple of them (None for non-tensors)
_shapes: dict = {}
_SIZE_QUERIES = (torch.ops.aten.size.default, torch.ops.aten.stride.default, torch.ops.aten.storage_offset.default)


class _OpFacts(NamedTuple):
    """What the recorder asks of an op's schema, read once per op."""

    fresh: bool  # no argument or result aliases: its outputs are new tensors
    writes: bool  # it writes to an argument (in place, out=)
    takes_device: bool  # a factory: it takes a device argument
    name: str  # its nodes' name before numbering, as make_fx names them
    decomposes: tuple[bool, bool]  # autograd would have decomposed it: without, with a tensor argument


_FACTS_LIMIT = 4096  # ops whose facts are remembered (cleared when full; torch has a few thousand overloads)
_facts: dict[Any, _OpFacts] = {}  # op -> its facts
_NAMING = fx.Graph()  # names nodes as make_fx does (Graph._target_to_str reads no state of its graph)


def clear_shape_cache() -> None:
    _shapes.clear()


def shape_cache_size() -> int:
    return len(_shapes)


def clear_facts_cache() -> None:
    _facts.clear()


def facts_cache_size() -> int:
    return len(_facts)


def _facts_of(op: OpOverload) -> _OpFacts:
    facts = _facts.get(op)
    if facts is None:
        if len(_facts) >= _FACTS_LIMIT:
            _facts.clear()
        schema = op._schema
        # whether autograd would have decomposed it depends on the device of its first tensor: make_fx's fake
        # tensors are on the CPU
        facts = _facts[op] = _OpFacts(
            fresh=not any(a.alias_info is not None for a in (*schema.arguments, *schema.returns)),
            writes=any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments),
            takes_device=any(a.name == "device" for a in schema.arguments),
            name=_NAMING._target_to_str(op.overloadpacket.__name__),
            decomposes=(autograd_would_have_decomposed(op, []),
                        autograd_would_have_decomposed(op, [_CPU_STAND_IN])))
    return facts


def _flat(a: Any) -> list:
    """Arguments with lists and tuples flattened one level (an op's Tensor[] argument)."""
    out: list = []
    for x in a:
        out.extend(x) if isinstance(x, (list, tuple)) else out.append(x)
    return out


def _meta_key(a: Any) -> Any:
    """An argument as part of an output-metadata key: a tensor by its metadata, a list by its items, a plain
    value by type and value (2 and 2.0 promote differently). Raises TypeError for what cannot be a key."""
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.stride(), a.dtype)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, *(_meta_key(x) for x in a))
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise TypeError("symbolic")
    hash(a)
    return (type(a), a)


def _metadata(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape), out.stride(), out.dtype)
    if isinstance(out, (tuple, list)) and all(o is None or isinstance(o, torch.Tensor) for o in out):
        return (type(out), tuple(None if o is None else _metadata(o) for o in out))
    raise TypeError("not tensors")


def _from_metadata(meta: Any) -> Any:
    if isinstance(meta[0], type):
        return meta[0](None if m is None else _from_metadata(m) for m in meta[1])
    shape, stride, dtype = meta
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def run_on_meta(func: OpOverload, args: tuple, kwargs: dict, facts: _OpFacts | None = None) -> Any:
    """The op on meta tensors; an op whose outputs alias nothing, from remembered metadata when it ran on the
    same metadata before (a layer stack repeats its ops on the same shapes)."""
    if not (facts or _facts_of(func)).fresh:
        return func(*args, **kwargs)
    try:
        key = (func, _meta_key(args), _meta_key(tuple(sorted(kwargs.items()))))
    except TypeError:
        return func(*args, **kwargs)
    meta = _shapes.get(key)
    if meta is not None:
        return _from_metadata(meta)
    out = func(*args, **kwargs)
    try:
        meta = _metadata(out)
    except TypeError:
        return out
    if len(_shapes) >= _SHAPES_LIMIT:
        _shapes.clear()
    _shapes[key] = meta
    return out


def meta_runnable(func: Any) -> bool:
    """Whether the light trace runs `func` on meta tensors for its output metadata: an aten op that neither
    reads a value into Python nor makes a tensor on a device it is given (those only fake tensors follow)."""
    if not isinstance(func, OpOverload) or torch.Tag.data_dependent_output in func.tags:
        return False
    return not _facts_of(func).takes_device


class _Recorder(TorchDispatchMode):
    """Records each aten op the body runs into `graph`. It takes the proxy mode's slot, so PyTorch code that
    asks whether it is being traced (functional collectives wait at once) behaves as under make_fx; its
    ``tracer.graph`` is the graph ``compat.node_sites`` tags."""

    def __init__(self, graph: fx.Graph, decompositions: dict) -> None:
        super().__init__()
        self._mode_key = torch._C._TorchDispatchModeKey.PROXY
        self.tracer = _types.SimpleNamespace(graph=graph)
        self.graph, self.decompositions = graph, decompositions
        # id(tensor) -> (a weak reference to it, node): held weakly, as make_fx holds them, since a factory's
        # result held elsewhere is detached by autograd's wrapping (an extra detach node)
        self.nodes: dict[int, tuple[Any, fx.Node]] = {}
        self.constants: dict[int, tuple[torch.Tensor, str, torch.Tensor]] = {}  # id -> (tensor, attr, meta copy)

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not isinstance(func, OpOverload) or any(t is not torch.Tensor and t is not torch.nn.Parameter
                                                   for t in types):
            raise NotRecordable(f"{func} on {types}")
        if func in self.decompositions:
            with self:
                return self.decompositions[func](*args, **kwargs)
        facts = _facts_of(func)
        takes_tensor = any(isinstance(a, torch.Tensor) for a in _flat((*args, *kwargs.values())))
        if func not in _SIZE_QUERIES and facts.decomposes[takes_tensor]:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if torch.Tag.data_dependent_output in func.tags or func is torch.ops.aten.is_nonzero.default:
            raise NotRecordable(f"{func} reads a value into Python")
        if func is torch.ops.aten.lift_fresh.default:
            func = torch.ops.aten.lift_fresh_copy.default
        node_args, node_kwargs = self._as_nodes(args), self._as_nodes(kwargs)
        if facts.writes and any(isinstance(n, fx.Node) and n.op == "get_attr"
                                 for n in (*_flat(node_args), *_flat(node_kwargs.values()))):
            raise NotRecordable(f"{func} writes to a tensor the body closes over")  # make_fx tracks its value
        out = self._run(func, facts, self._as_meta(args), self._as_meta(kwargs))
        node = append_node(self.graph, func, node_args, node_kwargs, facts.name)
        self._track(out, node)
        return out

    def _as_nodes(self, a: Any) -> Any:
        """An argument with each tensor as its node (a tensor the body closes over: a new get_attr node)."""
        if isinstance(a, torch.Tensor):
            hit = self.nodes.get(id(a))
            return hit[1] if hit is not None and hit[0]() is a else self._constant(a)
        if isinstance(a, (list, tuple)):
            items = [self._as_nodes(x) for x in a]
            return type(a)(*items) if hasattr(type(a), "_fields") else type(a)(items)
        if isinstance(a, dict):
            return {k: self._as_nodes(v) for k, v in a.items()}
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise NotRecordable("a symbolic size")
        return a

    def _constant(self, t: torch.Tensor) -> fx.Node:
        known = self.constants.get(id(t))
        if known is None or known[0] is not t:
            name = f"_tensor_constant{len(self.constants)}"
            known = self.constants[id(t)] = (t, name, torch.empty_strided(
                tuple(t.shape), t.stride(), dtype=t.dtype, device="meta"))
        node = append_node(self.graph, known[1], (), {}, known[1], op="get_attr")
        node.meta["val"] = known[2]
        return node

    def _as_meta(self, a: Any) -> Any:
        """An argument as the op runs it: tensors the body closes over as meta copies."""
        if isinstance(a, torch.Tensor):
            if a.is_meta:
                return a
            return self.constants[id(a)][2]
        if isinstance(a, (list, tuple)) and not hasattr(type(a), "_fields"):
            return type(a)([self._as_meta(x) for x in a])
        if isinstance(a, dict):
            return {k: self._as_meta(v) for k, v in a.items()}
        return a

    def _run(self, func: OpOverload, facts: _OpFacts, args: tuple, kwargs: dict) -> Any:
        if facts.takes_device:  # a factory: made on meta, recorded with the device the body asked for
            kwargs = {**kwargs, "device": torch.device("meta")}
        return run_on_meta(func, args, kwargs, facts)

    def _track(self, out: Any, node: fx.Node) -> None:
        """The op's output(s) mapped to their nodes: one getitem node per element of a multi-output op."""
        node.meta["val"] = _snapshot(out)
        if isinstance(out, torch.Tensor):
            self.nodes[id(out)] = (weakref.ref(out), node)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                item = append_node(self.graph, operator.getitem, (node, i), {}, "getitem")
                if isinstance(o, torch.Tensor):
                    item.meta["val"] = _snapshot(o)
                    self.nodes[id(o)] = (weakref.ref(o), item)
                elif o is not None:
                    raise NotRecordable(f"{node.target} returns {type(o).__name__}")
        elif out is not None:
            raise NotRecordable(f"{node.target} returns {type(out).__name__}")


def _snapshot(out: Any) -> Any:
    """A node's value as make_fx keeps it: another tensor object of the same metadata (the output itself stays
    referenced only by the body)."""
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(_snapshot(o) for o in out)
    return out


class _DeviceChoices(torch.overrides.TorchFunctionMode):
    """Refuses the functions whose composite kernel picks its ops by the device (attention picks the fused CPU
    kernel for make_fx's CPU fakes, the math decomposition for meta tensors): make_fx traces those."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _BY_DEVICE:
            raise NotRecordable(f"{getattr(func, '__name__', func)} picks its kernel by the device")
        return func(*args, **(kwargs or {}))


_BY_DEVICE = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
def append_node(graph: fx.Graph, target: Any, args: tuple, kwargs: dict, candidate: str,
                op: str = "call_function") -> fx.Node:
    """A node appended to `graph` as Graph.create_node appends it, without its per-node walk of the arguments
    for symbolic values (the recorder refuses those itself)."""
    name = graph._graph_namespace.create_name(candidate, None)
    node = fx.Node(graph, name, op, target, args, kwargs)
    graph._graph_namespace.associate_name_with_obj(name, node)
    graph._insert(node)
    graph._find_nodes_lookup_table.insert(node)
    graph._len += 1
    return node


def record(fn: Callable, inputs: Sequence[torch.Tensor], decompositions: dict) -> fx.GraphModule:
    """`fn`'s graph, recorded while it runs on meta tensors shaped as `inputs` (placeholders, in order); its
    tensor outputs (a flat tuple) become the output node. Raises NotRecordable for what only make_fx follows."""
    from torch.fx._lazy_graph_module import _make_graph_module

    graph = fx.Graph()
    recorder = _Recorder(graph, decompositions)
    metas = []
    for i, t in enumerate(inputs):
        meta = torch.empty_strided(tuple(int(s) for s in t.shape), t.stride(), dtype=t.dtype, device="meta")
        node = append_node(graph, f"arg{i}_1", (), {}, f"arg{i}_1", op="placeholder")
        node.meta["val"] = meta
        recorder.nodes[id(meta)] = (weakref.ref(meta), node)
        metas.append(meta)
    with _DeviceChoices(), recorder:
        outs = fn(*metas)
    graph.output(tuple(recorder._as_nodes(o) for o in outs))
    root = torch.nn.Module()
    for t, name, _ in recorder.constants.values():
        setattr(root, name, t)
    return _make_graph_module(root, graph)
