"""What a new user meets around the library: output that fits the terminal, failures with context (where and
what to do), `inspect` showing every verdict, and the small things (plurals, one-line errors, hints)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("click")  # the CLI is an optional extra (pip install 'localmap[cli]')
pytest.importorskip("rich")

from click.testing import CliRunner  # noqa: E402

import localmap  # noqa: E402
from localmap import LocalMapError, Replicate, Shard  # noqa: E402
from localmap.cli import app, install_hint  # noqa: E402
from localmap.testing import fake_mesh  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _invoke(*args, env=None):
    return CliRunner(env=env).invoke(app, list(args))


def _lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


# A body whose shapes only fit the local shards: x [4, 8] sharded over columns meets a replicated [4, 4] weight.
# The check cannot prove it (no global view); on whole tensors (verify's reference) the matmul fails.
LOCAL_ONLY = """
    import torch
    from localmap import Replicate, Shard, local_map

    MESH = "tp=2"

    def body(x, w1, w2):
        return torch.relu(x @ w1) @ w2.t()

    def program(mesh):
        f = local_map(body, out_placements=[Shard(1)], in_placements=([Shard(1)], [Replicate()], [Replicate()]),
                      device_mesh=mesh)
        w1, w2 = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
        return (lambda x, w1, w2: f(x, w1, w2).sum()), (torch.randn(4, 8), w1, w2)
"""

# Two regions that claim Replicate for a partial sum (check on, the default): inspect reports both, in full.
TWO_WRONG = """
    import torch
    from localmap import Replicate, Shard, local_map

    MESH = "tp=2"

    def program(mesh):
        first = local_map(lambda x: x.sum(0), [Replicate()], ([Shard(0)],), device_mesh=mesh)
        second = local_map(lambda y: y.sum(1), [Replicate()], ([Shard(1)],), device_mesh=mesh)
        return (lambda x: first(x).sum() + second(x).sum()), (torch.randn(4, 6, requires_grad=True),)
"""


# ---- output that fits -----------------------------------------------------------------------------------------

def test_console_width_follows_columns_then_the_terminal_then_160(monkeypatch):
    from localmap.cli.show import PIPE_WIDTH, console

    monkeypatch.setenv("COLUMNS", "100")
    assert console().width == 100
    monkeypatch.delenv("COLUMNS")
    assert not sys.stdout.isatty() and console().width == PIPE_WIDTH == 160


def test_region_table_at_100_columns_wraps_instead_of_cutting():
    res = subprocess.run([sys.executable, "-m", "localmap", "inspect", "examples/moe.py"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "100"}, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 100 and "…" not in res.stdout
    rows = [ln.split("│") for ln in lines if ln.startswith("│") and "total" not in ln]
    assert rows[0][1].strip() == "moe_expert_parallel.0" and rows[1][1].strip() == "moe.py:66"
    placements, shapes = (" ".join(" ".join(r[i] for r in rows).split()) for i in (2, 3))  # wrapped cells, read back
    assert placements == "S0 R S0 S0 -> S0" and shapes == "8x16 16x8 2x16x32 2x32x16"  # compact, nothing cut


# ---- failures with context ------------------------------------------------------------------------------------

def test_program_error_names_its_file_and_line(tmp_path):
    path = _file(tmp_path, "boom.py", """
        def program(mesh):
            raise RuntimeError("boom in my program")
    """)
    res = _invoke("inspect", path)
    lines = _lines(res.stderr)
    assert res.exit_code == 1 and len(lines) == 1, res.stderr
    assert f"boom.py:program(mesh) raised RuntimeError at {path}:3: boom in my program" in lines[0]
    assert "--debug shows the traceback" in lines[0]
    res = _invoke("inspect", path, "--debug")  # --debug: the user's own exception, traceback kept
    assert isinstance(res.exception.__cause__, RuntimeError) and "boom in my program" in str(res.exception)


def test_body_error_while_capturing_is_one_clean_line(tmp_path):
    """No fake-tensor log, no traceback: one line naming the region, the body's line and what to do."""
    path = _file(tmp_path, "shapes.py", """
        import torch
        from localmap import Replicate, Shard, local_map
        MESH = "tp=2"
        def body(x, w):
            return x @ w.t()
        def program(mesh):
            f = local_map(body, [Shard(0)], ([Shard(0)], [Replicate()]), device_mesh=mesh)
            return (lambda x, w: f(x, w).sum()), (torch.randn(4, 8), torch.randn(4, 6, requires_grad=True))
    """)
    res = subprocess.run([sys.executable, "-m", "localmap", "inspect", path], capture_output=True, text=True,
                         cwd=ROOT, timeout=240)
    lines = _lines(res.stderr)
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "fake_tensor" not in res.stderr and "Traceback" not in res.stderr
    assert f"region 'body' (defined at {path}:5)" in lines[0] and f"raised RuntimeError at {path}:6" in lines[0]
    assert "(fix: fix the line named; --debug shows the traceback)" in lines[0]


def test_verify_reference_error_names_the_region(tmp_path):
    path = _file(tmp_path, "local_only.py", LOCAL_ONLY)
    res = _invoke("inspect", path)  # unproven, not verified: never "ok:"
    assert res.exit_code == 0 and "\nok:" not in res.stdout and "unproven: local_only.py:program(mesh)" in res.stdout
    assert "run with --verify to settle them" in res.stdout
    res = _invoke("inspect", path, "--verify")
    assert res.exit_code == 1, (res.stdout, res.stderr)
    out = " ".join(res.stdout.split())
    assert "verify failed:" in out and "region 'body'" in out and "verify's one-device reference" in out
    assert f"at {path}:8: mat1 and mat2 shapes cannot be multiplied" in out
    assert "shapes that only fit the local shards fail here" in out
    assert "FAILED: local_only.py:program(mesh): 1 region, 0 checked ok, 1 unproven, verify failed" in out


def test_verify_reference_error_in_the_api(fake_mesh_2):
    f = localmap.local_map(lambda x, w: x @ w, [Shard(1)], ([Shard(1)], [Replicate()]), device_mesh=fake_mesh_2)
    with pytest.raises(RuntimeError) as info:  # still the original's type
        localmap.verify(lambda x, w: f(x, w).sum(), torch.randn(4, 8), torch.randn(4, 4, requires_grad=True))
    assert isinstance(info.value, localmap.BodyError) and "verify's one-device reference" in str(info.value)
    assert "region '<lambda>'" in str(info.value)


def test_run_with_other_shapes_than_captured(fake_mesh_2):
    f = localmap.local_map(lambda x: x.relu(), [Shard(0)], ([Shard(0)],), device_mesh=fake_mesh_2)
    prog = localmap.capture(lambda x: f(x).sum(), torch.randn(8, 4, requires_grad=True))
    prog.run(torch.randn(8, 4, requires_grad=True))
    with pytest.raises(LocalMapError) as info:
        prog.run(torch.randn(6, 4, requires_grad=True))
    assert "run: args[0]: has another shape or dtype than when the program was captured" in str(info.value)
    assert info.value.expected == "(8, 4) torch.float32" and info.value.given == "(6, 4) torch.float32"
    assert "capture the program again" in info.value.fix


@pytest.fixture
def fake_mesh_2():
    with fake_mesh((2,), ("tp",)) as mesh:
        yield mesh


# ---- inspect shows everything ---------------------------------------------------------------------------------

def test_inspect_reports_every_wrong_region_in_full(tmp_path):
    path = _file(tmp_path, "two_wrong.py", TWO_WRONG)
    res = _invoke("inspect", path)
    assert res.exit_code == 1, (res.stdout, res.stderr)
    out = res.stdout
    assert out.count("is a partial sum over the ranks but is claimed Replicate") == 2  # not stopping at the first
    assert out.count("fix:      all_reduce over 'tp' before returning") == 2
    assert "FAILED: two_wrong.py:program(mesh): 2 regions, 0 checked ok, failing: <lambda>.0, <lambda>.1" in out


# A prefix sum over the sharded dim claimed Shard(1): the proof stops at the scan (inspect's fake mesh runs no
# test where the proof stops), so the claim stays unproven.
SCAN = """
    import torch
    from localmap import Shard, local_map

    MESH = "tp=2"

    def program(mesh):
        scan = local_map(lambda x: x.cumsum(1).abs(), [Shard(1)], ([Shard(1)],), device_mesh=mesh)
        return (lambda x: scan(x).sum()), (torch.randn(4, 6, requires_grad=True),)
"""


@pytest.mark.parametrize("check,code,summary", [
    ("strict", 1, "FAILED: scan.py:program(mesh): 1 region, 0 checked ok, 1 unproven, failing: <lambda>.0"),
    ("allow_unproven", 0, "ok: scan.py:program(mesh): 1 region, 0 checked ok, 1 unproven"),
    ("on", 0, "unproven: scan.py:program(mesh): 1 region, 0 checked ok, 1 unproven"),
    ("off", 0, "ok: scan.py:program(mesh): 1 region, 0 checked ok, 1 unchecked"),
])
def test_inspect_check_option(tmp_path, check, code, summary):
    res = _invoke("inspect", _file(tmp_path, "scan.py", SCAN), "--check", check)
    assert res.exit_code == code, (res.stdout, res.stderr)
    assert summary in " ".join(res.stdout.split())
    if check != "off":  # the unproven claim in full, with its fix line
        assert "the proof stopped at aten.cumsum.default" in " ".join(res.stdout.split()) and "fix:" in res.stdout


@pytest.mark.parametrize("check", ["strict", "on"])
def test_inspect_proves_the_expert_parallel_example(check):
    """examples/moe.py (tokens dispatched to their experts' ranks by all_to_all, split sizes from .tolist()) is
    proven in the captured program, where the trace has no values: strict accepts it."""
    res = _invoke("inspect", os.path.join(ROOT, "examples", "moe.py"), "--check", check)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert "ok: moe.py:program(mesh): 1 region, 1 checked ok" in " ".join(res.stdout.split())


def test_inspect_check_warn_still_fails_a_wrong_region():
    res = _invoke("inspect", os.path.join(ROOT, "examples", "wrong_region.py"), "--check", "warn")
    assert res.exit_code == 1 and "failing: down.0" in res.stdout


# ---- the small ones -------------------------------------------------------------------------------------------

def test_torchrun_world_mismatch_printed_by_rank_0_alone(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = _invoke("demo", "--mesh", "2x2")
    assert res.exit_code == 1 and res.stderr.strip() == ""
    monkeypatch.setenv("RANK", "0")
    res = _invoke("demo", "--mesh", "2x2")
    assert res.exit_code == 1 and len(_lines(res.stderr)) == 1 and "run with --mesh 1x2" in res.stderr
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert "run with --mesh 4x2" in _invoke("demo", "--mesh", "2x2").stderr


def test_json_dash_writes_the_report_to_stdout():
    res = _invoke("inspect", os.path.join(ROOT, "examples", "attention.py"), "--json", "-")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    report = json.loads(res.stdout)  # stdout is the report alone; the table went to stderr
    assert report["regions"][0]["name"] == "attention_core.0" and "attention_core.0" in res.stderr
    assert not os.path.exists(os.path.join(ROOT, "-"))


def test_no_regions_is_a_warning_with_a_hint(tmp_path):
    path = _file(tmp_path, "plain.py", """
        import torch
        def program(mesh):
            return (lambda x: (x * 2).sum()), (torch.randn(4, requires_grad=True),)
    """)
    res = _invoke("inspect", path)
    assert res.exit_code == 0 and "warning" in res.stdout and "no regions" in res.stdout
    assert "Hint: build the regions with localmap.local_map" in " ".join(res.stdout.split())


def test_install_hint_in_a_checkout_and_installed(tmp_path):
    assert "make demo" in install_hint() and "pip install -e '.[cli]'" in install_hint()  # this checkout
    package = tmp_path / "site-packages" / "localmap"
    package.mkdir(parents=True)
    assert install_hint(str(package)) == "pip install 'localmap[cli]'"


def test_make_bench_installs_the_bench_extra_not_the_test_extra():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert not any("torchtitan" in dep for dep in extras["bench"])
    with open(os.path.join(ROOT, "Makefile")) as f:
        bench = next(line for line in f if line.startswith("bench:"))
    assert ".installed-bench" in bench and "installed-test" not in bench


def test_region_name_is_the_same_eagerly_and_traced(fake_mesh_2):
    def make_chunk_local():
        def _chunk_local(x):
            return x @ torch.ones(3, 3)  # a shape error on the [4, 4] shard

        return _chunk_local

    f = localmap.local_map(make_chunk_local(), [Shard(0)], ([Shard(0)],), device_mesh=fake_mesh_2)
    with pytest.raises(LocalMapError) as traced:
        localmap.capture(lambda x: f(x).sum(), torch.randn(8, 4, requires_grad=True))
    assert "region '_chunk_local'" in str(traced.value) and "<locals>" not in str(traced.value)
    from localmap.errors import region_label

    assert region_label(make_chunk_local())[0] == "_chunk_local"
