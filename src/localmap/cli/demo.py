"""``localmap demo``: train a small Llama-style model written with localmap regions on a mesh, step by step
against the same model on one device, and show the captured program.

The model is ``localmap.models.demo.DemoLlama`` (embedding, RMSNorm, attention whose core is a region over heads, a
mixture of experts in an expert-parallel region that dispatches tokens with all_to_all, a loss region). It is
trained with plain SGD on DTensors on a (dp, tp) mesh, three ways:

- ``sim`` (default): every rank simulated in this process (``testing.simulated_mesh``);
- ``gloo``: one process per rank on loopback (``testing.run_gloo``); rank 0 reports each step;
- under ``torchrun``: detected from RANK / WORLD_SIZE; rank 0 prints.

Every step, the loss and every parameter's gradient are compared with a single-device reference model that has
the same initial weights and data. Then the model is captured on a fake mesh of the same shape
(``localmap.capture``) and its region table (placements, local shapes, costs, check verdicts) is shown.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from localmap.cli.show import (CliError, MeshSpec, console, plural, region_table, verdict_counts, verdict_is_problem,
                        verdict_style, write_outputs)

ATOL, RTOL = 1e-5, 1e-4
MAX_SIM_RANKS = 64


@dataclass
class Config:
    mesh: MeshSpec
    launcher: str = "sim"
    layers: int = 2
    dim: int = 32
    heads: int = 4
    experts: int = 4
    hidden: int = 32
    vocab: int = 64
    steps: int = 5
    seed: int = 0
    lr: float = 1.0

    @property
    def dp(self) -> int:
        return self.mesh.shape[0]

    @property
    def tp(self) -> int:
        return self.mesh.shape[1]

    @property
    def batch(self) -> int:
        return 2 * self.dp

    @property
    def seq(self) -> int:
        return 4 * self.tp

    def model_kwargs(self, reference: bool) -> dict:
        return dict(vocab=self.vocab, dim=self.dim, heads=self.heads, experts=self.experts, hidden=self.hidden,
                    layers=self.layers, reference=reference)


@dataclass
class Step:
    step: int
    loss: float
    ref_loss: float
    loss_diff: float
    grad_diff: float
    worst: str  # the parameter with the largest gradient difference
    ok: bool


@dataclass
class TrainResult:
    steps: list[Step] = field(default_factory=list)
    verdicts: dict[str, str] = field(default_factory=dict)  # region function -> verdict of its check


def validate(cfg: Config) -> None:
    """Raise CliError when the sizes cannot be laid out on the mesh or the launcher cannot start it."""
    if len(cfg.mesh.shape) != 2:
        raise CliError(f"--mesh {cfg.mesh}: the demo's model is laid out on a 2-D (dp, tp) mesh; give DPxTP, "
                       "e.g. 2x2")
    tp = cfg.tp
    for what, value in (("--layers", cfg.layers), ("--dim", cfg.dim), ("--experts", cfg.experts),
                        ("--steps", cfg.steps)):
        if value < 1:
            raise CliError(f"{what} must be at least 1 (got {value})")
    if cfg.dim % cfg.heads:
        raise CliError(f"--dim {cfg.dim} must be a multiple of the {cfg.heads} attention heads")
    if cfg.heads % tp:
        raise CliError(f"--mesh {cfg.mesh}: tp={tp} must divide the {cfg.heads} attention heads (they are "
                       "sharded over tp)")
    if cfg.experts % tp or cfg.experts < 2:
        raise CliError(f"--experts {cfg.experts} must be at least 2 and a multiple of tp={tp} (experts are "
                       "sharded over tp)")
    world = cfg.mesh.size
    if under_torchrun():
        started = int(os.environ["WORLD_SIZE"])
        if started != world:
            raise CliError(f"torchrun started {started} processes but --mesh {cfg.mesh} needs {world}; run with "
                           f"--mesh {suggest_mesh(started, cfg)} (DPxTP = {started})")
        return
    if cfg.launcher == "sim" and world > MAX_SIM_RANKS:
        raise CliError(f"--launcher sim simulates at most {MAX_SIM_RANKS} ranks in one process; --mesh "
                       f"{cfg.mesh} has {world}")
    if cfg.launcher == "gloo":
        limit = max(4, 4 * (os.cpu_count() or 1))
        if world > limit:
            raise CliError(f"--launcher gloo cannot start {world} processes here (at most {limit}: 4 per CPU "
                           "core); use a smaller --mesh or --launcher sim")


def suggest_mesh(world: int, cfg: Config) -> str:
    """A DPxTP mesh of `world` ranks the model fits: the same tp when it divides the world, else the largest
    tp that divides the world, the heads and the experts."""
    fits = [tp for tp in range(1, world + 1) if world % tp == 0 and cfg.heads % tp == 0 and cfg.experts % tp == 0
            and cfg.experts >= 2]
    tp = cfg.tp if cfg.tp in fits else max(fits, default=1)
    return f"{world // tp}x{tp}"


# ---- training on a mesh (any launcher) -------------------------------------------------------------------------

def _batch(cfg: Config, step: int) -> tuple:
    import torch

    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=gen)
    return tokens, (tokens * 5 + 3) % cfg.vocab  # a rule the model can learn: the loss falls step by step


def _models(cfg: Config) -> tuple:
    import torch

    from localmap.models.demo import DemoLlama

    torch.manual_seed(cfg.seed)
    reference = DemoLlama(**cfg.model_kwargs(reference=True))
    model = DemoLlama(**cfg.model_kwargs(reference=False))
    model.load_state_dict(reference.state_dict())
    return model, reference


def _region_functions(model: Any) -> dict[str, Any]:
    """The model's local_map wrappers by a readable name (one per layer and kind, and the loss)."""
    found = {}
    for name, module in model.named_modules():
        for attr in ("attention", "moe", "loss"):
            fn = getattr(module, attr, None)
            if callable(fn) and hasattr(fn, "region"):
                found[f"{name}.{attr}" if name else attr] = fn
    return found


def _verdict_of(fn: Any) -> str:
    """The placement check's verdict for a region function after it has run (eager path)."""
    region = fn.region
    if region.check is False:
        return "unchecked (check=False: the checker cannot type data-dependent split sizes yet)"
    verdicts = region.verdicts()
    if not verdicts:
        return "unchecked (not called)"
    bad = [v for v in verdicts if v.status != "ok"]
    return (bad[0] if bad else verdicts[0]).summary()


def _global(d: Any) -> Any:
    """The global value of a DTensor as one plain tensor; None when simulated ranks disagree on a value that
    its placements say they share (a wrong placement claim)."""
    from localmap.testing import full

    try:
        return full(d)
    except AssertionError:
        return None


def train(mesh: Any, cfg: Config, on_step: Callable[[Step], None]) -> TrainResult:
    """Train cfg.steps SGD steps on `mesh` (simulated or real) and on one device; compare every step."""
    import logging

    import torch
    from torch.distributed.tensor import Replicate, Shard

    from localmap.testing import distribute, on_one_device

    # DTensor advises flattening (dp, tp) for a gradient reduced over both; not what this demo is about.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    with on_one_device():
        model, reference = _models(cfg)
        ref_params = {n: p.detach().clone().requires_grad_() for n, p in reference.named_parameters()}
    params = {n: distribute(p, mesh, type(model).placements(n), requires_grad=True) for n, p in ref_params.items()}
    data = [Shard(0), Replicate()]
    result = TrainResult()
    for step in range(cfg.steps):
        with on_one_device():
            tokens, targets = _batch(cfg, step)
            ref_loss = torch.func.functional_call(reference, ref_params, (tokens, targets))
            ref_grads = torch.autograd.grad(ref_loss, list(ref_params.values()))
        loss = torch.func.functional_call(model, params, (distribute(tokens, mesh, data),
                                                          distribute(targets, mesh, data)))
        grads = torch.autograd.grad(loss, list(params.values()))
        value = _global(loss)
        worst, grad_diff, ok = "", 0.0, True
        with on_one_device():
            loss_value, ref_value = (value.item() if value is not None else math.nan), ref_loss.item()
            loss_diff = abs(loss_value - ref_value)
            ok = loss_diff <= ATOL + RTOL * abs(ref_value)  # False for nan
        for (name, g), ref_g in zip(zip(params, grads), ref_grads):
            got = _global(g)
            with on_one_device():
                diff = (got - ref_g).abs().max().item() if got is not None else math.inf
                scale = ref_g.abs().max().item()
            if diff > grad_diff or not worst:
                worst, grad_diff = name, diff
            ok = ok and diff <= ATOL + RTOL * scale
        record = Step(step + 1, loss_value, ref_value, loss_diff, grad_diff, worst, bool(ok))
        result.steps.append(record)
        on_step(record)
        with torch.no_grad():
            params = {n: (p.detach() - cfg.lr * g.redistribute(p.device_mesh, p.placements)).requires_grad_()
                      for (n, p), g in zip(params.items(), grads)}
        with on_one_device(), torch.no_grad():
            ref_params = {n: (p.detach() - cfg.lr * g).requires_grad_() for (n, p), g in
                          zip(ref_params.items(), ref_grads)}
    result.verdicts = {name: _verdict_of(fn) for name, fn in _region_functions(model).items()}
    return result


# ---- launchers -------------------------------------------------------------------------------------------------

def _train_simulated(cfg: Config, on_step: Callable[[Step], None]) -> TrainResult:
    import torch

    from localmap.testing import simulated_mesh

    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add overhead (and spin on a busy machine)

    with simulated_mesh(cfg.mesh.shape, cfg.mesh.names) as mesh:
        return train(mesh, cfg, on_step)


def _gloo_rank(mesh: Any, cfg: Config, queue: Any) -> dict | None:
    """One gloo rank: train; rank 0 reports each step on `queue` and returns the verdicts."""
    import torch.distributed as dist

    rank = dist.get_rank()
    result = train(mesh, cfg, lambda s: queue.put(asdict(s)) if rank == 0 else None)
    return result.verdicts if rank == 0 else None


def _train_gloo(cfg: Config, on_step: Callable[[Step], None]) -> TrainResult:
    import multiprocessing as mp
    import queue as queue_mod
    import threading

    from localmap.testing import GlooError, run_gloo

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    out: dict[str, Any] = {}

    def launch() -> None:
        try:
            out["results"] = run_gloo(_gloo_rank, cfg.mesh.size, cfg.mesh.shape, cfg.mesh.names, args=(cfg, q),
                                      timeout=300)
        except BaseException as exc:  # reported by the main thread
            out["error"] = exc

    thread = threading.Thread(target=launch, daemon=True)
    thread.start()
    result = TrainResult()
    while thread.is_alive() or not q.empty():
        try:
            step = Step(**q.get(timeout=0.2))
        except queue_mod.Empty:
            continue
        result.steps.append(step)
        on_step(step)
    thread.join()
    if "error" in out:
        err = out["error"]
        if isinstance(err, GlooError):
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            raise CliError(f"gloo launcher: {lines[-1].strip() if lines else err}") from err
        raise err
    result.verdicts = out["results"][0]
    return result


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _train_torchrun(cfg: Config, on_step: Callable[[Step], None]) -> TrainResult:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", cfg.mesh.shape, mesh_dim_names=cfg.mesh.names)
        rank = dist.get_rank()
        return train(mesh, cfg, on_step if rank == 0 else (lambda s: None))
    finally:
        dist.destroy_process_group()


# ---- capture ---------------------------------------------------------------------------------------------------

def capture_model(cfg: Config) -> Any:
    """The model captured on a fake mesh of the same shape: forward and backward graphs, one node per region."""
    import torch

    import localmap

    from localmap.models.demo import DemoLlama
    from localmap.testing import fake_mesh

    with fake_mesh(cfg.mesh.shape, cfg.mesh.names) as mesh, localmap.use_mesh(mesh):
        with torch.device("meta"):
            model = DemoLlama(**cfg.model_kwargs(reference=False))
        tokens, targets = _batch(cfg, 0)
        return localmap.capture(model, tokens.to("meta"), targets.to("meta"))


class _Background:
    """fn(*args) in a thread (the gloo launcher's parent process waits on its ranks meanwhile)."""

    def __init__(self, fn: Callable, *args: Any) -> None:
        import threading

        self._out: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._out["value"] = fn(*args)
        except BaseException as exc:  # re-raised in result()
            self._out["error"] = exc

    def result(self) -> Any:
        self._thread.join()
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]


# ---- the command -----------------------------------------------------------------------------------------------

def _steps_table(cfg: Config, steps: list[Step], where: str) -> Table:
    table = Table(title=f"training {cfg.steps} steps (SGD, lr {cfg.lr}) {where}, against one device",
                  title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("loss (mesh)", justify="right")
    table.add_column("loss (one device)", justify="right")
    table.add_column("|loss diff|", justify="right")
    table.add_column("max |grad diff|", justify="right")
    table.add_column("worst parameter", overflow="fold")
    table.add_column("match")
    for s in steps:
        table.add_row(str(s.step), f"{s.loss:.6f}", f"{s.ref_loss:.6f}", f"{s.loss_diff:.1e}", f"{s.grad_diff:.1e}",
                      s.worst, "[green]ok[/]" if s.ok else "[bold red]MISMATCH[/]")
    return table


def run_demo(cfg: Config, out: Console | None = None, svg: str | None = None, json_path: str | None = None,
             svg_level: str = "regions") -> bool:
    """Run the demo and print it; True when every step matches one device and no region check failed."""
    out = out or console(stderr=json_path == "-")
    validate(cfg)
    torchrun = under_torchrun()
    launcher, where, quiet = _launcher(cfg, torchrun)
    if quiet:
        out = Console(quiet=True)
    start = time.monotonic()
    out.print(f"[bold]localmap demo[/]: a {cfg.layers}-layer Llama-style model (dim {cfg.dim}, {cfg.heads} heads, "
              f"{cfg.experts} experts, vocab {cfg.vocab}; batch {cfg.batch} x seq {cfg.seq}) written with "
              f"localmap regions, trained {where}")
    out.print("  regions: attention core (batch over dp, heads over tp); mixture of experts (experts over tp, tokens "
              "dispatched to their experts' ranks with all_to_all_single, split sizes from the routing); loss "
              "(a partial sum over dp)", highlight=False)
    background = _Background(capture_model, cfg) if launcher is _train_gloo else None  # this process idles
    result = _train_live(cfg, out, launcher, where)
    verdicts = Table(title="placement check of each region (on the mesh, eager)", title_justify="left")
    verdicts.add_column("region")
    verdicts.add_column("verdict")
    for name, v in result.verdicts.items():
        verdicts.add_row(name, f"[{verdict_style(v)}]{v}[/]")
    out.print(verdicts)
    prog = None
    if not (torchrun and quiet):
        with out.status("capturing the training step (forward and backward) on a fake mesh"):
            prog = background.result() if background is not None else capture_model(cfg)
        out.print(region_table(prog, f"captured program on a fake {cfg.mesh} mesh: one row per region call"))
        write_outputs(prog, svg, json_path, out, svg_level)
    return _summary(cfg, out, result, prog, where, time.monotonic() - start)


def _launcher(cfg: Config, torchrun: bool) -> tuple[Callable, str, bool]:
    """(train function, where it trains, whether this process stays quiet: a torchrun rank other than 0)."""
    if torchrun:
        return _train_torchrun, f"on a {cfg.mesh} mesh under torchrun", os.environ.get("RANK") != "0"
    if cfg.launcher == "gloo":
        return _train_gloo, f"on a {cfg.mesh} mesh of {cfg.mesh.size} gloo processes", False
    return _train_simulated, f"on a simulated {cfg.mesh} mesh", False


def _train_live(cfg: Config, out: Console, launcher: Callable, where: str) -> Any:
    """Train with a live table of the steps and a progress bar."""
    steps: list[Step] = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[status]}"), console=out)
    task = progress.add_task("training", total=cfg.steps, status="starting")

    def on_step(s: Step) -> None:
        steps.append(s)
        progress.update(task, advance=1, status=f"loss {s.loss:.4f} (one device {s.ref_loss:.4f})")
        live.update(Group(_steps_table(cfg, steps, where), progress))

    with Live(Group(_steps_table(cfg, steps, where), progress), console=out, refresh_per_second=8) as live:
        result = launcher(cfg, on_step)
        live.update(Group(_steps_table(cfg, steps, where), progress))
    if not out.is_terminal:
        out.line()  # Live's last render ends without a newline when not drawing on a terminal
    return result


def _summary(cfg: Config, out: Console, result: Any, prog: Any, where: str, seconds: float) -> bool:
    """The last line: whether every step matched one device and every region checked ok."""
    matched = all(s.ok for s in result.steps) and len(result.steps) == cfg.steps
    problems = [n for n, v in result.verdicts.items() if verdict_is_problem(v)]
    if prog is not None:
        problems += [r.name for r in prog.regions if verdict_is_problem(r.verdict)]
    ok = matched and not problems
    max_loss = max((s.loss_diff for s in result.steps), default=0.0)
    max_grad = max((s.grad_diff for s in result.steps), default=0.0)
    n_regions = len(prog.regions) if prog is not None else len(result.verdicts)
    counts = verdict_counts([r.verdict for r in prog.regions] if prog is not None else
                            list(result.verdicts.values()))
    last = result.steps[-1] if result.steps else None
    head = "[bold green]ok[/]" if ok else "[bold red]FAILED[/]"
    what = "match one device" if matched else "do NOT match one device"
    out.print(f"{head}: {len(result.steps)} steps {where} {what} (loss {result.steps[0].loss:.4f} -> "
              f"{last.loss:.4f}; max |loss diff| {max_loss:.1e}, max |grad diff| {max_grad:.1e}); "
              f"{plural(n_regions, 'region')}, {counts}"
              + (f", check problems in {', '.join(problems)}" if problems else "")
              + f"; {seconds:.1f}s")
    return ok
