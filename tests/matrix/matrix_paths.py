"""The paths a user can take with a region, each run on one catalogue program (tests/catalogue.py) and measured
the same way: the program's outputs, first-order gradients and (with a gradient penalty) second-order gradients,
all as plain global tensors, against the same computation on one device.

A cell's numbers are a dict name -> tensor: ``out.K`` (output leaf K), ``grad.NAME`` (d loss / d input or weight)
and ``grad2.NAME`` (d penalty / d input or weight, penalty = sum of the squared first-order gradients). The loss is
sum_K (out_K ** 2 * upstream_K).sum() (squared, so that the first-order gradients depend on the inputs and the
penalty has second-order gradients even through a linear body), the upstream drawn once per program."""

from __future__ import annotations

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
