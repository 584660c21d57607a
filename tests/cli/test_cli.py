"""The main job as a user runs it: `python -m localmap demo` and `python -m localmap inspect` in subprocesses
(simulated and gloo launchers, each example file, each kind of bad input), and the demo's numbers against the
same model trained on one device here."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

pytest.importorskip("click")  # the CLI is an optional extra (pip install 'localmap[cli]')
pytest.importorskip("rich")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def _cmd(*args):
    return [sys.executable, "-m", "localmap", *args]


def _run(*args, env=None, timeout=240):
    return subprocess.run(_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def _steps(stdout):
    """(step, loss on the mesh, loss on one device, max grad diff, match) rows of the demo's step table."""
    num = r"([\d.e+-]+|inf|nan)"
    rows = re.findall(rf"│\s+(\d+) │\s+{num} │\s+{num} │\s+{num} │\s+{num} │ \S+\s+│ (\w+)", stdout)
    return [(int(s), float(a), float(b), float(g), m) for s, a, b, _, g, m in rows]


def _reference_losses(steps, seed=0, mesh_shape=(2, 2), layers=2):
    """The demo's model trained on one device here, independently of the demo's loop: loss per step."""
    from localmap.cli.demo import Config, _batch
    from localmap.models.demo import DemoLlama
    from localmap.cli.show import MeshSpec

    cfg = Config(mesh=MeshSpec(mesh_shape, ("dp", "tp")), layers=layers, steps=steps, seed=seed)
    torch.manual_seed(seed)
    model = DemoLlama(**cfg.model_kwargs(reference=True))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(steps):
        loss = model(*_batch(cfg, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- demo -----------------------------------------------------------------------------------------------------

def test_demo_simulated_mesh_matches_one_device(tmp_path):
    """The demo at 100 columns (COLUMNS=100): every step matches one device, no line is over 100 characters,
    and its picture renders with regions, placements and parameter names readable."""
    svg, js = tmp_path / "prog.svg", tmp_path / "prog.json"
    res = _run("demo", "--steps", "2", "--layers", "1", "--svg", str(svg), "--json", str(js), env={"COLUMNS": "100"})
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert max(len(line) for line in out.splitlines()) <= 100, [ln for ln in out.splitlines() if len(ln) > 100]
    assert "…" not in out  # cells wrap, nothing is cut
    steps = _steps(out)
    assert [s[0] for s in steps] == [1, 2] and all(s[4] == "ok" for s in steps)
    expected = _reference_losses(2, layers=1)
    for (_, mesh_loss, one_device, grad_diff, _), ref in zip(steps, expected):
        assert abs(mesh_loss - ref) < 1e-4 and abs(one_device - ref) < 1e-4
        assert grad_diff < 1e-5
    assert re.search(r"ok: 2 steps on a simulated 2x2 \(dp, tp\) mesh match\s+one\s+device", out)
    # each region's eager verdict, and the captured program's table
    assert re.search(r"layers\.0\.attention\s+│ ok", out) and re.search(r"loss\s+│ ok", out)
    # tokens routed by all_to_all to their experts' ranks and back: proven (issue 20), gradient placements inferred
    assert re.search(r"layers\.0\.moe\s+│ ok", out) and "unproven" not in out
    for name in ("attention_core.0", "moe_expert_parallel.0", "token_loss_sum.0"):
        assert name in out
    lines = out.splitlines()  # compact placement cells (wrapped onto the source line's row where narrow)
    k = next(i for i, ln in enumerate(lines) if re.search(r"│ token_loss_sum\.0\s+│", ln))
    cell = " ".join(" ".join(lines[j].split("│")[2].split()) for j in (k, k + 1)).strip()
    assert cell == "S0,R S0,R -> P,R", cell
    assert "3 regions" in out and "3/3 ok" in out and re.search(r"3 regions,\s+3\s+checked\s+ok", out)
    report = json.loads(js.read_text())
    assert [r["name"] for r in report["regions"]][:2] == ["attention_core.0", "moe_expert_parallel.0"]
    assert report["regions"][0]["local_in_shapes"][0] == [2, 2, 8, 8]  # batch 4 / dp, heads 4 / tp
    texts = [" ".join((el.text or "").split()) for el in ET.parse(svg).iter() if el.tag.endswith("}text")]
    assert {"attention_core.0", "moe_expert_parallel.0", "token_loss_sum.0", "tokens", "targets"} <= set(texts)
    assert "layers.0.router" in texts and "in (S(0),S(1)) (R,R) (R,S(0)) (R,S(0))" in texts


@pytest.mark.slow  # real gloo processes
def test_demo_gloo_processes_match_one_device():
    res = _run("demo", "--launcher", "gloo", "--mesh", "1x2", "--layers", "1", "--steps", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    steps = _steps(res.stdout)
    expected = _reference_losses(2, mesh_shape=(1, 2), layers=1)
    assert len(steps) == 2 and all(s[4] == "ok" for s in steps)
    assert all(abs(s[1] - ref) < 1e-4 for s, ref in zip(steps, expected))
    assert "ok: 2 steps on a 1x2 (dp, tp) mesh of 2 gloo processes match one device" in res.stdout


def test_demo_wrong_gradient_placement_fails(monkeypatch):
    """The router's gradient claimed Replicate (PyTorch's default for a replicated input) instead of a partial
    sum, with the check off (on, it refuses the claim): the demo's comparison with one device catches it, says
    MISMATCH and exits 1 (the command run in this process, so that the model's region can be patched)."""
    from click.testing import CliRunner

    import localmap.models.demo as dm
    from localmap import Partial, Replicate, Shard
    from localmap.cli import app

    real = dm.local_map

    def wrong_router_gradient(fn, *args, **kwargs):
        if fn is dm.moe_expert_parallel:
            S0, S1, R, P = Shard(0), Shard(1), Replicate(), Partial()
            kwargs.update(in_grad_placements=([S0, S1], [R, R], [P, S0], [P, S0], None), check=False)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(dm, "local_map", wrong_router_gradient)
    res = CliRunner().invoke(app, ["demo", "--layers", "1", "--steps", "1"])
    assert res.exit_code == 1, (res.stdout, res.stderr, res.exception)
    steps = _steps(res.stdout)
    assert len(steps) == 1 and steps[0][4] == "MISMATCH" and steps[0][3] > 1e-3
    assert "layers.0.router" in res.stdout  # the parameter whose gradient is wrong
    assert "FAILED" in res.stdout and "do NOT match one device" in res.stdout


# ---- inspect ----------------------------------------------------------------------------------------------------

def test_inspect_attention_with_verify(tmp_path):
    js = tmp_path / "attn.json"
    res = _run("inspect", os.path.join("examples", "attention.py"), "--verify", "--json", str(js))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "on a fake 2x2 (dp, tp) mesh" in res.stdout
    assert re.search(r"attention_core\.0\s+│ S0,S1 S0,S1 S0,S1 -> S0,S1\s+│ 2x2x8x8", res.stdout)
    assert re.search(r"attention\.py:\d+", res.stdout) and "1/1 ok" in res.stdout
    m = re.search(r"loss differs by ([\d.e+-]+), 4 gradients by at most ([\d.e+-]+)", res.stdout)
    assert m and float(m.group(1)) < 1e-5 and float(m.group(2)) < 1e-4
    assert "ok: attention.py:program(mesh): 1 region, 1 checked ok, verify matched one device" in res.stdout
    assert "verify: loss differs by" in res.stdout and "verified" not in res.stdout
    assert json.loads(js.read_text())["regions"][0]["verdict"] == "ok"


def test_inspect_moe_expert_parallel():
    res = _run("inspect", os.path.join("examples", "moe.py"), "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "on a fake 4 (ep) mesh" in res.stdout
    assert re.search(r"moe_expert_parallel\.0\s+│ S0 R S0 S0 -> S0", res.stdout)
    assert re.search(r"8x16 16x8 2x16x32 2x32x16", res.stdout)  # 32 tokens and 8 experts over 4 ranks
    assert "ok: moe.py:program(mesh): 1 region, 1 checked ok, verify matched one device" in res.stdout


def test_inspect_wrong_region_is_flagged_by_check_and_verify():
    res = _run("inspect", os.path.join("examples", "wrong_region.py"), "--verify")
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(r"down\.0 .*PROBLEM", res.stdout) and re.search(r"up\.0 .* ok", res.stdout)
    assert "is a partial sum over the ranks but is claimed Replicate" in res.stdout
    assert "verify failed" in res.stdout and "region down.0" in res.stdout
    assert "FAILED: wrong_region.py:program(mesh): 2 regions, 1 checked ok, failing: down.0, verify failed" \
        in res.stdout
    assert "fix:      all_reduce over 'tp' before returning" in res.stdout  # the verdict in full
    assert "Traceback" not in res.stderr


def test_inspect_named_entry_point(tmp_path):
    src = tmp_path / "prog.py"
    src.write_text(
        "import torch\nfrom localmap import Shard, local_map\nMESH = 'tp=2'\n"
        "def other(mesh):\n"
        "    f = local_map(lambda x: x.sin(), [Shard(0)], ([Shard(0)],), device_mesh=mesh)\n"
        "    return (lambda x: f(x).sum()), (torch.randn(4, 3, requires_grad=True),)\n"
        "def on_meta(mesh):\n"
        "    fn, _ = other(mesh)\n"
        "    return fn, (torch.randn(4, 3, device='meta', requires_grad=True),)\n"
        "def junk(mesh):\n    return 42\n")
    from click.testing import CliRunner

    from localmap.cli import app

    res = CliRunner().invoke(app, ["inspect", f"{src}:other"])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert "on a fake 2 (tp) mesh" in res.stdout and "1/1 ok" in res.stdout
    res = CliRunner().invoke(app, ["inspect", f"{src}:on_meta"])  # meta inputs capture ...
    assert res.exit_code == 0 and "1/1 ok" in res.stdout, (res.stdout, res.stderr, res.exception)
    res = CliRunner().invoke(app, ["inspect", f"{src}:on_meta", "--verify"])  # ... but do not run
    assert res.exit_code == 1 and "--verify runs the program, but prog.py:on_meta(mesh) gave meta tensors" in res.stderr
    res = CliRunner().invoke(app, ["inspect", f"{src}:junk"])
    assert res.exit_code == 1 and "prog.py:junk(mesh) must return (fn, args) or (fn, args, reference)" in res.stderr


def test_inspect_notes_a_region_proven_with_a_meaning_that_follows_the_mesh(tmp_path):
    """An all_reduce of a shard is proven with its meaning on the mesh (the sum of the rows' blocks): ok, and inspect
    says which step the proof read that way and what it means there (docs/check-verdicts.md)."""
    src = tmp_path / "blocks.py"
    src.write_text(
        "import torch\nfrom localmap import Replicate, Shard, local_map\nfrom localmap import collectives as C\n"
        "MESH = 'tp=2'\n"
        "def program(mesh):\n"
        "    f = local_map(lambda x: C.all_reduce(x, 'tp'), [Replicate()], ([Shard(0)],), device_mesh=mesh)\n"
        "    return (lambda x: f(x).sum()), (torch.randn(4, 3, requires_grad=True),)\n")
    from click.testing import CliRunner

    from localmap.cli import app

    res = CliRunner().invoke(app, ["inspect", str(src)])
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert "1/1 ok" in res.stdout and "note" in res.stdout, res.stdout
    said = " ".join(res.stdout.split())
    assert "proven with its meaning on this mesh: " in said and "blocks.py:6: all_reduce (sum) of a shard of dim 0: " \
           "the sum of the global value's 2 blocks along dim 0" in said, res.stdout


# ---- bad input: one line on stderr, exit 1, no traceback unless --debug ---------------------------------------

# One subprocess per kind of bad input the commands promise to answer in one line (run side by side: each pays
# for importing torch); other variants, and --debug, go through the same command objects in this process (click's
# runner).
BAD = {
    "missing file": (("inspect", "examples/nothere.py"), "examples/nothere.py: no such file"),
    "no entry point": (("inspect", "examples/attention.py:nope"), "defines no function nope(mesh)"),
    "mesh does not parse": (("demo", "--mesh", "2by2"), "--mesh '2by2' does not parse"),
    "mesh does not match the placements": (("inspect", "examples/attention.py", "--mesh", "4"),
                                           "has 2 placements for a 1-d mesh"),
    "gloo world too large": (("demo", "--launcher", "gloo", "--mesh", "64x4"), "cannot start 256 processes"),
}

BAD_IN_PROCESS = {
    "demo mesh not 2-D": (("demo", "--mesh", "4"), {}, "2-D (dp, tp) mesh"),
    "mesh does not fit the heads": (("demo", "--mesh", "2x3"), {}, "tp=3 must divide the 4 attention heads"),
    "too many simulated ranks": (("demo", "--mesh", "32x4"), {}, "simulates at most 64 ranks"),
    "experts do not fit": (("demo", "--experts", "3"), {}, "--experts 3 must be at least 2 and a multiple of tp=2"),
    "torchrun world differs": (("demo", "--mesh", "2x2"), {"RANK": "0", "WORLD_SIZE": "2"},
                               "torchrun started 2 processes but --mesh 2x2 (dp, tp) needs 4; run with --mesh 1x2"),
    "inspect mesh does not parse": (("inspect", "examples/moe.py", "--mesh", "ep=x"), {}, "does not parse"),
    "not a python file": (("inspect", "examples"), {}, "not a Python file"),
}


def test_bad_input_one_line_and_nonzero_exit():
    procs = {name: subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=ROOT) for name, (args, _) in BAD.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 1, (name, out, err)
        assert len(lines) == 1 and lines[0].startswith("localmap: error: "), (name, err)
        assert BAD[name][1] in lines[0], (name, lines[0])


@pytest.mark.parametrize("name", list(BAD_IN_PROCESS))
def test_bad_input_variants(name, monkeypatch):
    from click.testing import CliRunner

    from localmap.cli import app

    args, env, expected = BAD_IN_PROCESS[name]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(app, list(args))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1, (res.stdout, res.stderr, res.exception)
    assert len(lines) == 1 and lines[0].startswith("localmap: error: ") and expected in lines[0], res.stderr


def test_debug_lets_the_exception_through():
    from click.testing import CliRunner

    from localmap.cli.show import CliError
    from localmap.cli import app

    res = CliRunner().invoke(app, ["demo", "--mesh", "2by2", "--debug"])
    assert res.exit_code == 1 and isinstance(res.exception, CliError) and "localmap: error" not in res.stderr
    assert "does not parse" in str(res.exception)


def test_usage_error_is_one_line():
    from click.testing import CliRunner

    from localmap.cli import app

    for args in (["demo", "--launcher", "mpi"], ["demo", "--nope"], ["inspect"], ["inspect", "x.py", "--check", "x"]):
        res = CliRunner().invoke(app, args)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("localmap: error: "), (args, res.stderr)
        assert lines[0].endswith("--help)")
    assert "Invalid value for '--launcher'" in CliRunner().invoke(app, ["demo", "--launcher", "mpi"]).stderr
    res = CliRunner().invoke(app, [])  # no command: the help (not an error line), as click shows it
    assert "Commands:" in res.output and "localmap: error" not in res.output
    res = CliRunner().invoke(app, ["inspect", "--help"])
    assert res.exit_code == 0 and "--check [on|warn|strict|allow_unproven|off]" in res.stdout
