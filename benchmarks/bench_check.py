"""What the placement check costs, in one run (medians; the machine is shared and noisy):

1. first call: the check's time per region over the project's catalogue (tests/check/test_types_catalogue.py,
   test_catalogue_parallel.py and tests/collective_cases.py, plus test_tested_verdict.py's right programs where the proof stops by design: a
   custom op without a rule, a context-parallel scan with its prefix correction) on a simulated mesh: a fresh region's first call with the check on minus a fresh
   region's first call with check=False (both build their plans), caches cleared before each; median over the
   catalogue, and the worst five by name. Target: median <= 100 ms. Then the same split by the verdict the
   default check gave: proven (ok) regions, tested ones (the proof stopped; the test against the one-rank run
   settled the claim, docs/check-verdicts.md), and the rest (refused, unproven, unchecked). Targets: proven
   <= 10 ms, tested <= 100 ms.
2. steady state: per-call time of one region (an MLP shard: relu(x @ w1) @ w2, 64x64) with the check on versus
   off, on a 1-rank gloo mesh, interleaved rounds. Target: on within 5% of off.
3. torchtitan's pattern: a local_map wrapper rebuilt inside every forward (its cross-entropy loss,
   ``_cross_entropy_via_local_map``), one step (loss and backward) with localmap's local_map swapped in versus
   PyTorch's. Target: <= 1.1x. Skipped when torchtitan is not installed (the test extra installs it).
4. scale: the check's first-call time as the body grows (a chain of 100, 400 and 1,600 elementwise ops and
   matmuls on a 1-rank gloo mesh, check on minus check off), and its cost per body op. Target: <= 0.3 ms per
   op, a 1,600-op body under 0.5 s.

Run: ``.venv/bin/python benchmarks/bench_check.py [--rounds R] [--calls N] [--cpu-time]`` (``--cpu-time``: first
calls timed in this process's CPU time, for a shared machine whose load inflates the wall clock).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import local_map as torch_local_map

import localmap

HERE = os.path.dirname(os.path.abspath(__file__))


_clock = time.perf_counter  # the first calls' clock (parts 1 and 4); --cpu-time: time.process_time


def _timed(fn: Callable[[], Any]) -> float:
    t0 = _clock()
    with contextlib.suppress(Exception):  # wrong programs are refused: the check's time counts all the same
        fn()
    return _clock() - t0


# ---- 1. first-call check time over the catalogue ---------------------------------------------------------------

def _catalogue() -> list[tuple[str, Any]]:
    sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "check")]
    from test_catalogue_parallel import PROGS, Prog
    from test_types_catalogue import CASES

    from collective_cases import CASES as COLLECTIVES
    from test_tested_verdict import RIGHT

    first = [Prog(c.name, c.body, list(c.shapes), c.ins, c.out, "ok", grads=c.grads,
                  mesh="dp_tp" if c.mesh2d else "tp") for c in CASES]
    # Right programs where the proof stops by design (a custom op without a rule, a prefix correction): every
    # catalogue program is now decided by the proof or mesh-size dependent, so these give the "tested" line.
    tested = [Prog(name, body, list(shapes), ins, out, "tested", mesh="cp") for name, body, _, shapes, ins, out in RIGHT]
    # The collectives' cases, those whose meaning follows the mesh's size among them (check.coordinates).
    collective = [Prog(name, functools.partial(_on_tp, body), list(shapes), [(p,) for p in ins], (out,), "ok")
                  for name, body, _, shapes, ins, out in COLLECTIVES]
    return [(p.name, p) for p in first + PROGS + collective + tested]


def _on_tp(body: Any, *local: Any) -> Any:
    return body("tp", *local)


def _first_call_ms(prog: Any, repeats: int) -> tuple[float, str]:
    from test_catalogue_parallel import MESHES, _make, local_map

    from localmap.testing import distribute, on_one_device, simulated_mesh

    shape, names = MESHES[prog.mesh]
    times = []
    with simulated_mesh(shape, names) as mesh:
        with on_one_device():
            gen = torch.Generator().manual_seed(0)
            inputs = [_make(s, gen) for s in prog.inputs]
            weights = [torch.randn(*s, generator=gen) for s, _ in prog.weights]
        dts = [distribute(t, mesh, pl) for t, pl in zip(inputs, prog.ins)]
        wds = [distribute(w, mesh, pl) for w, (_, pl) in zip(weights, prog.weights)]

        statuses = []

        def first(check: Any) -> float:
            localmap.clear_caches()
            body = prog.body(wds) if prog.weights else prog.body
            region = local_map(body, [prog.out], prog.ins, prog.grads, mesh, check=check)
            took = _timed(lambda: region(*dts, **prog.kwargs))
            statuses.extend(v.status for v in region.region.verdicts())
            return took

        for _ in range(repeats):
            times.append(first(True) - first(False))
    return 1e3 * statistics.median(times), statuses[0] if statuses else "?"


def first_call(repeats: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [(name, *_first_call_ms(prog, repeats)) for name, prog in _catalogue()]
    ms = [t for _, t, _ in results]
    print(f"1. first-call check time over {len(results)} catalogue regions: median {statistics.median(ms):.1f} ms "
          f"(target <= 100 ms), mean {statistics.mean(ms):.1f} ms")
    for name, t, status in sorted(results, key=lambda r: -r[1])[:5]:
        print(f"     {t:7.1f} ms  {name} ({status})")
    for label, kinds, target in (("proven (ok)", ("ok",), 10), ("tested", ("tested",), 100),
                                 ("refused, unproven or unchecked", ("wrong", "unproven", "unchecked"), None)):
        part = [t for _, t, status in results if status in kinds]
        if part:
            print(f"   {label}: {len(part)} regions, median {statistics.median(part):.1f} ms"
                  + (f" (target <= {target} ms)" if target else ""))


# ---- 2. steady state, check on versus off; 3. the rebuilt wrapper -------------------------------------------------

def _medians(variants: dict[str, Callable[[], Any]], calls: int, rounds: int) -> dict[str, float]:
    """Per-call median of each variant over interleaved rounds (after one warm-up call each)."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def _mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2


def steady_state(mesh: Any, calls: int, rounds: int) -> None:
    torch.manual_seed(0)
    args = [distribute_tensor(torch.randn(64, 64), mesh, [Replicate()]).requires_grad_() for _ in range(3)]
    on = localmap.local_map(_mlp, [Replicate()], [[Replicate()]] * 3, None, mesh)
    off = localmap.local_map(_mlp, [Replicate()], [[Replicate()]] * 3, None, mesh, check=False)
    m = _medians({"on": lambda: on(*args), "off": lambda: off(*args)}, calls, rounds)
    print(f"2. steady state per call: check on {1e6 * m['on']:.1f} us, off {1e6 * m['off']:.1f} us, "
          f"on/off {m['on'] / m['off']:.3f} (target <= 1.05)")


def rebuilt_wrapper(mesh: Any, calls: int, rounds: int) -> None:
    try:
        from torchtitan.components import loss as titan_loss
    except ImportError:
        print("3. torchtitan's rebuilt wrapper: skipped (torchtitan not installed: pip install -e '.[test]')")
        return
    torch.manual_seed(0)
    pred = distribute_tensor(torch.randn(4, 128, 512), mesh, [Shard(0)]).requires_grad_()
    labels = distribute_tensor(torch.randint(0, 512, (4, 128)), mesh, [Shard(0)])

    def step(impl: Callable) -> Callable[[], None]:
        def run() -> None:
            titan_loss.local_map = impl
            titan_loss._cross_entropy_via_local_map(pred, labels).backward()
        return run

    try:
        m = _medians({"pytorch": step(torch_local_map), "localmap": step(localmap.local_map)}, calls, rounds)
    finally:
        titan_loss.local_map = torch_local_map
    print(f"3. torchtitan's cross-entropy (local_map rebuilt each forward), one step: localmap "
          f"{1e3 * m['localmap']:.2f} ms, PyTorch {1e3 * m['pytorch']:.2f} ms, ratio "
          f"{m['localmap'] / m['pytorch']:.2f}x (target <= 1.1x)")


def _chain(ops: int) -> Callable:
    """A body of about `ops` traced ops: a chain of matmuls and elementwise ops, each op one graph node."""
    def body(x, w):
        for k in range(ops // 4):
            x = torch.tanh(x @ w) * 0.5 + x
        return x
    return body


def scale(mesh: Any, repeats: int) -> None:
    x = distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)]).requires_grad_()
    w = distribute_tensor(torch.randn(8, 8), mesh, [Replicate()]).requires_grad_()
    line = []
    for ops in (100, 400, 1600):
        def first(check: Any) -> float:
            localmap.clear_caches()
            region = localmap.local_map(_chain(ops), [Shard(0)], [[Shard(0)], [Replicate()]], None, mesh,
                                        check=check)
            return _timed(lambda: region(x, w))

        cost = statistics.median(first(True) - first(False) for _ in range(repeats))
        line.append(f"{ops} ops {1e3 * cost:.0f} ms ({1e3 * cost / ops:.2f} ms/op)")
    print("4. check cost as the body grows, first call: " + ", ".join(line) +
          " (target <= 0.3 ms/op, 1,600 ops < 0.5 s)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500, help="timed calls per variant per round (part 2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round (part 3)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="first calls per region (parts 1 and 4)")
    parser.add_argument("--only-scale", action="store_true", help="run part 4 alone")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time first calls (parts 1 and 4) in this process's CPU time instead of wall-clock "
                             "time: on a shared, loaded machine the wall clock counts other processes' time")
    args = parser.parse_args()
    global _clock
    _clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; first calls timed in {'CPU' if args.cpu_time else 'wall-clock'} time")
    if not args.only_scale:
        first_call(args.repeats)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        if not args.only_scale:
            steady_state(mesh, args.calls, args.rounds)
            rebuilt_wrapper(mesh, args.steps, args.rounds)
        scale(mesh, args.repeats)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
