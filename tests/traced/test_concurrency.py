"""Two threads tracing at once: defer_inlining is per thread, and the shared caches (placement verdicts, built
region graphs, a region's input plans) give each thread the graphs of its own shapes. Each captured program
is run and compared with the same computation on one device."""

import threading

import torch

from helpers import P, R, S0, S1
from localmap import capture, local_map
from localmap.hop import defer_inlining, is_deferring
from localmap.testing import fake_mesh


def _body(x, w):
    return torch.tanh(x @ w)


def test_two_threads_capture_the_same_region_at_once():
    with fake_mesh((2, 2), ("dp", "tp")) as mesh:
        # One region object shared by both threads: its plans and the check/build caches are shared too.
        region = local_map(_body, [S0, S1], ([S0, R], [R, S1]), None, mesh)
        shapes = {"a": ((8, 4), (4, 6)), "b": ((4, 6), (6, 2))}  # different shapes per thread
        barrier = threading.Barrier(2, timeout=60)
        results, errors, seen = {}, {}, {}

        def work(name):
            try:
                torch.manual_seed(0 if name == "a" else 1)
                xs, ws = shapes[name]
                x, w = torch.randn(*xs), torch.randn(*ws)
                barrier.wait()
                for _ in range(3):
                    with defer_inlining():
                        seen[name, "inside"] = is_deferring()
                        barrier.wait()  # both threads are inside defer_inlining now
                    seen[name, "after"] = is_deferring()
                    prog = capture(lambda a, b: region(a, b).sum(), x.clone().requires_grad_(),
                                   w.clone().requires_grad_())
                    got = prog.run(x, w)
                    results[name] = (got, x, w, len(prog.regions), prog.regions[0].local_in_shapes)
            except BaseException as e:  # reported by the main thread
                errors[name] = e
                barrier.abort()

        threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert not errors, errors
    assert all(seen[n, "inside"] for n in ("a", "b")) and not any(seen[n, "after"] for n in ("a", "b"))
    assert not is_deferring()
    for name, (got, x, w, n_regions, local_shapes) in results.items():
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        _body(xr, wr).sum().backward()
        assert n_regions == 1
        (m, k), (_, n) = shapes[name]
        assert local_shapes == [[m // 2, k], [k, n // 2]]  # this thread's shapes, not the other's
        assert torch.allclose(got.loss, _body(x, w).sum(), atol=1e-5)
        assert torch.allclose(got.grads["args[0]"], xr.grad, atol=1e-5)
        assert torch.allclose(got.grads["args[1]"], wr.grad, atol=1e-5)


def test_defer_inlining_is_per_thread_while_another_thread_traces():
    inside = threading.Event()
    release = threading.Event()
    seen = []

    def tracer():
        with defer_inlining("default"):
            inside.set()
            release.wait(30)

    t = threading.Thread(target=tracer)
    t.start()
    assert inside.wait(30)
    seen.append(is_deferring())  # this thread is not deferring though the other one is
    with defer_inlining():
        seen.append(is_deferring())
    seen.append(is_deferring())
    release.set()
    t.join(30)
    assert seen == [False, True, False] and not t.is_alive()


del P  # imported with the others for symmetry
