"""The paths a user can take with a region, each run on one catalogue program (tests/catalogue.py) and measured
the same way: the program's outputs, first-order gradients and (with a gradient penalty) second-order gradients,
all as plain global tensors, against the same computation on one device.

A cell's numbers are a dict name -> tensor: ``out.K`` (output leaf K), ``grad.NAME`` (d loss / d input or weight)
and ``grad2.NAME`` (d penalty / d input or weight, penalty = sum of the squared first-order gradients). The loss is
sum_K (out_K ** 2 * upstream_K).sum() (squared, so that the first-order gradients depend on the inputs and the
penalty has second-order gradients even through a linear body), the upstream drawn once per program."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from catalogue import Program, make_input
from helpers import grad_for_output, rel_diff
from localmap import capture, local_map, verify
from localmap.testing import distribute, full, on_one_device

TOL = 1e-4

# ---- output structures: the body's one output returned as one leaf or several, in each container ---------------

STRUCTURES: dict[str, Callable[[Any, Any], Any]] = {
    "single": lambda a, b: a,
    "tuple": lambda a, b: (a, b),
    "list": lambda a, b: [a, b],
    "dict": lambda a, b: {"first": a, "second": b},
    "nested": lambda a, b: {"pair": (a, [b])},
}


def structured(body: Callable, structure: str) -> Callable:
    """The body returning its output in `structure` (a second leaf: the output doubled, same placements)."""
    if structure == "single":
        return body

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        y = body(*args, **kwargs)
        return STRUCTURES[structure](y, y * 2)
    return wrapped


def leaves(value: Any) -> list:
    return torch.utils._pytree.tree_leaves(value)  # tests may read pytree directly; the fence is for src/


# ---- the program's tensors ----------------------------------------------------------------------------------------

@dataclass
class Tensors:
    """A program's global inputs, weights and upstream gradients, drawn once (plain, one device)."""

    inputs: list
    weights: list
    upstream: list = field(default_factory=list)


def draw(prog: Program, n_leaves: int) -> Tensors:
    with on_one_device():
        gen = torch.Generator().manual_seed(7)
        inputs = [make_input(s, gen) for s in prog.inputs]
        weights = [torch.randn(*s, generator=gen) for s, _ in prog.weights]
        tensors = Tensors(inputs, weights)
        out = prog.make_reference(weights)(*inputs, **prog.kwargs)
        tensors.upstream = [torch.randn(out.shape, generator=gen) * (k + 1) for k in range(n_leaves)]
    return tensors


def loss_term(out: Any, upstream: Any) -> Any:
    return (out.pow(2) * upstream).sum()


def measure(outputs: list, upstream: list, wrt: dict[str, torch.Tensor], penalty: bool,
            as_plain: Callable = lambda t: t) -> dict[str, torch.Tensor]:
    """Outputs, gradients of the loss and (penalty) of the gradient penalty with respect to `wrt`, as plain global
    tensors (`as_plain` turns a DTensor into one)."""
    def scalar(t: Any) -> Any:
        return t.full_tensor() if isinstance(t, DTensor) else t

    got = {f"out.{k}": as_plain(o).detach() for k, o in enumerate(outputs)}
    loss = sum(scalar(loss_term(o, u)) for o, u in zip(outputs, upstream))
    names = [n for n, t in wrt.items() if t.requires_grad]
    grads = torch.autograd.grad(loss, [wrt[n] for n in names], create_graph=penalty, allow_unused=True)
    got.update({f"grad.{n}": as_plain(g).detach() for n, g in zip(names, grads) if g is not None})
    if penalty:
        used = [(n, g) for n, g in zip(names, grads) if g is not None]
        pen = sum(scalar(g.pow(2).sum()) for _, g in used)
        second = torch.autograd.grad(pen, [wrt[n] for n in names], allow_unused=True)
        got.update({f"grad2.{n}": as_plain(g).detach() for n, g in zip(names, second) if g is not None})
    return got


def reference(prog: Program, tensors: Tensors, structure: str, penalty: bool) -> dict[str, torch.Tensor]:
    with on_one_device():
        xs = [t.clone().requires_grad_(t.is_floating_point()) for t in tensors.inputs]
        ws = [w.clone().requires_grad_() for w in tensors.weights]
        out = prog.make_reference(ws)(*xs, **prog.kwargs)
        outs = leaves(STRUCTURES[structure](out, out * 2))
        return measure(outs, tensors.upstream, _named(xs, ws), penalty)


def _named(inputs: list, weights: list) -> dict[str, torch.Tensor]:
    named = {f"args[{k}]": t for k, t in enumerate(inputs)}
    named.update({f"w{k}": w for k, w in enumerate(weights)})
    return named


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative difference per name; a name on one side only is infinitely different."""
    return {n: rel_diff(got[n], want[n]) if n in got and n in want else float("inf") for n in {*got, *want}}


def matches(diffs: dict[str, float]) -> bool:
    return all(v <= TOL for v in diffs.values())


# ---- the program as a module: its weights as parameters, buffers or plain attributes -----------------------------

class ProgramModule(nn.Module):
    """The region of `prog` as a module; `weights` held as `form` ("parameter", "buffer" or "attribute")."""

    def __init__(self, prog: Program, mesh: Any, weights: list, form: str, structure: str, check: Any) -> None:
        super().__init__()
        self.n_weights, self.kwargs = len(weights), prog.kwargs
        for k, w in enumerate(weights):
            if form == "parameter":
                self.register_parameter(f"w{k}", nn.Parameter(w))
            elif form == "buffer":
                self.register_buffer(f"w{k}", w)
            else:
                object.__setattr__(self, f"w{k}", w)
        out = STRUCTURES[structure](prog.out, prog.out)
        # The body reads its weights from the module when it runs (ws[k] is self.wk), as torchtitan's bodies read
        # self.w1: capture's and verify's stand-ins are what it reads, and the check finds them on the module.
        body = structured(prog.make_body(self), structure)
        self.region = local_map(body, out, list(prog.ins), prog.grads, mesh, check=check)

    def __getitem__(self, k: int) -> Any:
        return getattr(self, f"w{k}")

    def __len__(self) -> int:
        return self.n_weights

    def forward(self, *xs: Any) -> Any:
        return self.region(*xs, **self.kwargs)


class Loss(nn.Module):
    """The matrix's loss of the program module: a scalar loss for capture and verify."""

    def __init__(self, inner: ProgramModule, upstream: list) -> None:
        super().__init__()
        self.inner, self.upstream = inner, upstream

    def forward(self, *xs: Any) -> Any:
        return sum(loss_term(o, u) for o, u in zip(leaves(self.inner(*xs)), self.upstream))


def dtensor_weights(prog: Program, tensors: Tensors, mesh: Any, form: str) -> list:
    return [distribute(w, mesh, pl, requires_grad=form != "buffer") for w, (_, pl) in zip(tensors.weights,
                                                                                         prog.weights)]


# ---- the paths -------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    """One (program, path) run: what it computed (plain global tensors) and the local_map warnings it gave."""

    got: dict[str, torch.Tensor]
    said: list[str]


def recording(fn: Callable[[], dict]) -> Cell:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fn()
    return Cell(got, [str(w.message) for w in caught if str(w.message).startswith("local_map:")])


def on_dtensors(prog: Program, tensors: Tensors, mesh: Any, structure: str, penalty: bool, form: str = "parameter",
                check: Any = True, wrap: Callable[[Callable], Callable] = lambda f: f) -> dict[str, torch.Tensor]:
    """Eager (and, with `wrap`, compiled): the region on DTensors of the simulated mesh."""
    dts = [distribute(t, mesh, pl, requires_grad=t.is_floating_point()) for t, pl in zip(tensors.inputs, prog.ins)]
    dws = dtensor_weights(prog, tensors, mesh, form)
    module = ProgramModule(prog, mesh, dws, form, structure, check)
    outs = leaves(wrap(module)(*dts))
    ups = [distribute(u, mesh, grad_for_output(prog.out)) for u in tensors.upstream]
    wrt = _named(dts, [getattr(module, f"w{k}") for k in range(len(dws))])
    return measure(outs, ups, wrt, penalty, as_plain=full)


def compiled(backend: str = "aot_eager") -> Callable[[Callable], Callable]:
    def wrap(module: Callable) -> Callable:
        torch.compiler.reset()
        return torch.compile(module, backend=backend, fullgraph=True)
    return wrap


def captured(prog: Program, tensors: Tensors, mesh: Any, structure: str, form: str = "parameter",
             check: Any = True) -> dict[str, torch.Tensor]:
    """capture(...).run: the program captured on global tensors, run as the mesh would."""
    model, xs = _loss_module(prog, tensors, mesh, structure, form, check), _differentiable(tensors.inputs)
    result = capture(model, *xs).run(*xs)
    got = {"loss": result.loss}
    got.update({f"grad.{_grad_name(n)}": g for n, g in result.grads.items()})
    return got


def verified(prog: Program, tensors: Tensors, mesh: Any, structure: str, form: str = "parameter",
             check: Any = True) -> Any:
    model = _loss_module(prog, tensors, mesh, structure, form, check)
    if not prog.own_reference:  # verify's default reference: each body inlined on one rank (collectives identity)
        return verify(model, *_differentiable(tensors.inputs))
    ref = prog.make_reference(tensors.weights)

    def reference_loss_fn(*xs: Any) -> Any:
        out = ref(*xs, **prog.kwargs)
        return sum(loss_term(o, u) for o, u in zip(leaves(STRUCTURES[structure](out, out * 2)), tensors.upstream))
    return verify(model, *_differentiable(tensors.inputs), reference=reference_loss_fn)


def _differentiable(inputs: list) -> list:
    """Global inputs that want gradients (the float ones), as capture and verify take them."""
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]


def _loss_module(prog: Program, tensors: Tensors, mesh: Any, structure: str, form: str, check: Any) -> Loss:
    dws = dtensor_weights(prog, tensors, mesh, form)
    return Loss(ProgramModule(prog, mesh, dws, form, structure, check), tensors.upstream)


def _grad_name(name: str) -> str:
    return name.removeprefix("inner.")


def captured_reference(want: dict[str, torch.Tensor], tensors: Tensors) -> dict[str, torch.Tensor]:
    """The one-device numbers as capture's run gives them: the loss and the first-order gradients."""
    with on_one_device():
        loss = sum(loss_term(want[f"out.{k}"], u) for k, u in enumerate(tensors.upstream))
    return {"loss": loss, **{k: v for k, v in want.items() if k.startswith("grad.")}}


# ---- a planner's capture and defer_inlining + make_fx: the graphs a path records, run per rank ----------------

class PlannerModule(nn.Module):
    """The program as a planner's model holds it (meta-pytorch/autoparallel's models: plain global tensors): its
    weights plain parameters passed to the region as arguments, their placements after the inputs'; the upstream
    gradients buffers; the matrix's loss computed in the model."""

    def __init__(self, prog: Program, mesh: Any, tensors: Tensors, structure: str = "single") -> None:
        super().__init__()
        self.n_inputs, self.n_weights, self.kwargs = len(prog.inputs), len(prog.weights), prog.kwargs
        for k, w in enumerate(tensors.weights):
            self.register_parameter(f"w{k}", nn.Parameter(w.clone()))
        for k, u in enumerate(tensors.upstream):
            self.register_buffer(f"u{k}", u.clone())

        def body(*args: Any, **kwargs: Any) -> Any:
            return prog.make_body(list(args[self.n_inputs:]))(*args[:self.n_inputs], **kwargs)

        out = STRUCTURES[structure](prog.out, prog.out)
        ins = [*prog.ins, *(pl for _, pl in prog.weights)]
        grads = None if prog.grads is None else [*prog.grads, *(None for _ in prog.weights)]
        self.region = local_map(structured(body, structure), out, ins, grads, mesh)

    def outputs(self, *xs: Any) -> list:
        return leaves(self.region(*xs, *(getattr(self, f"w{k}") for k in range(self.n_weights)), **self.kwargs))

    def forward(self, *xs: Any) -> Any:
        return sum(loss_term(o, u) for o, u in zip(self.outputs(*xs), self.buffers()))

    def arg_name(self, k: int) -> str:
        """The matrix's name of the region's argument k (an input, then the weights)."""
        return f"args[{k}]" if k < self.n_inputs else f"w{k - self.n_inputs}"


def planner_captured(prog: Program, tensors: Tensors, mesh: Any, operator: str,
                     structure: str = "single") -> tuple[dict[str, torch.Tensor], list[str]]:
    """A planner's capture (``localmap.testing.planner_capture`` under ``region_operator(operator)``) of the
    program, its joint graph run as a planner honouring each region node's placements runs it
    (``run_joint``: region nodes per rank on the simulated mesh, pieces split and joined by the node's
    placements) on the program's inputs: the loss, the forward region node's outputs as joined, the gradients of
    the inputs and weights; and the names of the arguments whose gradient placement the capture warned that the
    operator cannot carry."""
    from localmap.hop import region_operator
    from localmap.testing import planner_capture, region_nodes, run_joint

    with on_one_device():
        model, xs = PlannerModule(prog, mesh, tensors, structure), _differentiable(tensors.inputs)
    with region_operator(operator), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        joint = planner_capture(model, *xs)[1]
    said = [str(w.message) for w in caught]
    uncarried = [model.arg_name(int(m.group(1))) for m in map(_UNCARRIED.search, said) if m]
    uncarried += [f"outputs[{m.group(1)}]" for m in map(_TANGENT.search, said) if m]
    for message in said:  # the others (the check's) for the cell to read
        if not (_UNCARRIED.search(message) or _TANGENT.search(message)):
            warnings.warn(message)
    primals = [*(p.detach() for p in model.parameters()), *model.buffers(), *(x.detach() for x in xs)]
    ((loss,), grads), record = run_joint(joint, [*primals, torch.ones(())])  # (outputs, input gradients)
    names = [*(f"w{k}" for k in range(model.n_weights)), *(None for _ in model.buffers()),
             *(f"args[{k}]" for k in range(len(xs)))]
    got = {"loss": loss}
    got.update({f"out.{k}": o for k, o in enumerate(record.region_outputs[region_nodes(joint)[0].name])})
    got.update({f"grad.{n}": g for n, g in zip(names, grads, strict=True) if n is not None and g is not None})
    return got, uncarried


# The capture's warnings under region_operator("torch"), where PyTorch's backward node states a placement the
# body's gradients do not have: an argument's gradient (PyTorch states the argument's own placement), a Partial
# output's tangent (PyTorch states it Partial; the body's backward takes the whole gradient).
_UNCARRIED = re.compile(r": args\[(\d+)\] has placements .* carries no gradient placements")
_TANGENT = re.compile(r": outputs\[(\d+)\] has placements .* the backward's tangent")


def deferred_traced(prog: Program, tensors: Tensors, mesh: Any, structure: str = "single",
                    penalty: bool = False) -> dict[str, torch.Tensor]:
    """defer_inlining + make_fx: the program's outputs and gradients (with `penalty`, the gradient penalty's
    too) traced on fake tensors with the region deferred, then that graph run per rank on the program's inputs
    (``run_joint``: each region node's graph once per rank of the simulated mesh, split and joined by its
    placements). Asserts one forward region node per call (and a backward one), so the path is not inlined."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from localmap.hop import defer_inlining, local_map_hop
    from localmap.testing import run_joint

    with on_one_device():
        model = PlannerModule(prog, mesh, tensors, structure)
        weights = [p.detach().requires_grad_() for p in model.parameters()]
        xs, ups = _differentiable(tensors.inputs), list(model.buffers())
    names = [*(f"w{k}" for k in range(len(weights))), *(f"args[{k}]" for k in range(len(xs)))]
    wanted = [n for n, v in zip(names, [*weights, *xs]) if v.requires_grad]

    def step(*values: Any) -> tuple:
        ws, inputs, upstream = values[:len(weights)], values[len(weights):-len(ups)], values[-len(ups):]
        wrt = [v for v in (*ws, *inputs) if v.requires_grad]
        outs = leaves(model.region(*inputs, *ws, **model.kwargs))
        return (*outs, *measured_grads(outs, upstream, wrt, penalty))

    with on_one_device(), defer_inlining():
        gm = make_fx(step, tracing_mode="fake")(*weights, *xs, *ups)
    regions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is local_map_hop]
    assert len(regions) == (2 if wanted else 1), f"not one region node per call: {gm.code}"
    values, _ = run_joint(gm, [*(w.detach() for w in weights), *(x.detach() for x in xs), *ups])
    n_out = len(tensors.upstream)
    got = {f"out.{k}": o for k, o in enumerate(values[:n_out])}
    got.update({f"grad.{n}": g for n, g in zip(wanted, values[n_out:n_out + len(wanted)])})
    if penalty:
        got.update({f"grad2.{n}": g for n, g in zip(wanted, values[n_out + len(wanted):]) if g is not None})
    return got


def measured_grads(outs: list, upstream: Any, wrt: list, penalty: bool) -> list:
    """d loss / d wrt and, with `penalty`, d penalty / d wrt (the matrix's loss and penalty, see `measure`)."""
    loss = sum(loss_term(o, u) for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(loss, wrt, create_graph=penalty)
    if not penalty:
        return list(grads)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), wrt, allow_unused=True)
    return [*grads, *second]
