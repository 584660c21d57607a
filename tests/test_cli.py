"""The main job as a user runs it: `python -m localmap demo` in a subprocess."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "localmap", *args], capture_output=True, text=True, timeout=120)


def test_demo_matches_single_device():
    res = _run("demo")
    assert res.returncode == 0, res.stderr
    assert "rows per rank [3, 3, 3, 1]" in res.stdout
    assert "grad g   (Partial(sum),)" in res.stdout
    assert "all values and gradients match one device" in res.stdout
    assert "MISMATCH" not in res.stdout


def test_demo_other_mesh_size():
    res = _run("demo", "--ranks", "2", "--hidden", "8", "--tokens", "5")
    assert res.returncode == 0, res.stderr
    assert "rows per rank [3, 2]" in res.stdout


def test_demo_bad_arguments_exit_nonzero():
    res = _run("demo", "--ranks", "3", "--hidden", "32")
    assert res.returncode == 2 and "must be a multiple of --ranks" in res.stderr


def test_demo_reports_a_wrong_gradient_placement(monkeypatch, capsys):
    """Claiming the gradient of the replicated weight g as Replicate (PyTorch's default) with the check off
    makes it wrong; the demo says MISMATCH and fails."""
    import localmap.demo as demo
    from localmap import Partial, Replicate

    real = demo.local_map

    def replicate_grads(f, out, ins, grads=None):
        grads = tuple([Replicate() if isinstance(p, Partial) else p for p in g] for g in grads)
        return real(f, out, ins, grads, check=False)

    monkeypatch.setattr(demo, "local_map", replicate_grads)
    assert demo.run_demo() is False
    out = capsys.readouterr().out
    assert "grad g   (Replicate(),)" in out and "MISMATCH" in out


def test_demo_gradient_placements_inferred(monkeypatch, capsys):
    """Leaving in_grad_placements out, localmap infers them from the bodies: the demo still matches."""
    import localmap.demo as demo

    real = demo.local_map
    monkeypatch.setattr(demo, "local_map", lambda f, out, ins, grads=None: real(f, out, ins))
    assert demo.run_demo() is True
    assert "grad g   (Partial(sum),)" in capsys.readouterr().out
