"""The front door stays true: README.md opens with what localmap is, the set-up commands and a quick start that
runs (executed here, its output compared with the one shown), and every `file.py:N` reference in README.md and
docs/ points at the line it names."""

import glob
import os
import re
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")

# What each line reference in README.md and docs/ names: a fragment of that line. A reference to a file of this
# repository that is not here fails the test: add it (with what it names), or drop the line number.
EXPECTED = {
    "src/localmap/models/llama.py:44": "x @ w_gate",  # the matmul a PlacementError names
    "src/localmap/models/llama.py:78": "self.mlp(",  # swiglu_mlp.0's call site, in verify's message
    "tests/eager/test_collectives.py:40": "C.all_reduce(",  # a collective's result meeting per-rank data
    "src/localmap/models/demo.py:124": "self.attention(",  # the demo's region call sites
    "src/localmap/models/demo.py:128": "moe(",
    "src/localmap/models/demo.py:149": "self.loss(",
    "quick.py:17": "mlp(x, w)",  # the quick start's region call, in its report
}
# Bare file names in transcripts (a call site's basename) and the file they are.
ALIASES = {"demo.py": "src/localmap/models/demo.py", "quick.py": "quick.py"}


def _read(path):
    with open(path) as f:
        return f.read()


def _quick_start() -> tuple[str, str]:
    """(the quick start's code, the output shown under it) from README.md."""
    text = _read(README)
    section = text[text.index("## Quick start"):text.index("## Usage")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"```\n\$ python quick\.py\n(.*?)```", section, re.S).group(1)
    return code, shown


def test_readme_opens_with_what_it_is_then_set_up_then_quick_start():
    text = _read(README)
    lines = text.splitlines()
    assert lines[0] == "# localmap" and lines[1] == "" and not lines[2].startswith((" ", "`", "#"))
    heads = [ln for ln in lines if ln.startswith("## ")]
    assert heads[:3] == ["## Set up", "## Quick start", "## Usage"]
    setup = text[text.index("## Set up"):text.index("## Quick start")]
    for command in ("make demo", "make test ", "make test-quick"):
        assert command in setup
    code, _ = _quick_start()
    assert 12 <= len(code.splitlines()) <= 20  # about 15 lines
    for moved in ("docs/demo.md", "docs/speed.md", "docs/design.md"):
        assert moved in text and os.path.exists(os.path.join(ROOT, moved))
    assert os.path.exists(os.path.join(ROOT, "docs", "demo.png"))


def test_quick_start_runs_and_prints_what_the_readme_shows(tmp_path, capsys, monkeypatch):
    code, shown = _quick_start()
    (tmp_path / "quick.py").write_text(code)
    monkeypatch.chdir(tmp_path)  # as `python quick.py` runs it: call sites read quick.py:N
    runpy.run_path("quick.py", run_name="__main__")
    got = capsys.readouterr().out.splitlines()
    expected = shown.splitlines()
    assert got[:-1] == expected[:-1]  # the eager placements and the report, exactly
    pattern = r"verified: loss differs by \S+, 1 gradient by at most \S+ \(\S+ of their scale\), 1 region"
    assert re.fullmatch(pattern, got[-1]) and re.fullmatch(pattern, expected[-1]), (got[-1], expected[-1])


def _references():
    """(document, 'file.py:N') for every line reference in README.md and docs/*.md."""
    for doc in [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        for ref in re.findall(r"[\w./-]+\.py:\d+", _read(doc)):
            yield os.path.relpath(doc, ROOT), ref


def _resolve(ref: str) -> str | None:
    """The repository path a reference names ('quick.py' for the README's quick start), or None when it names
    a file outside the repository (a user's script in a transcript)."""
    path, line = ref.rsplit(":", 1)
    if path in ALIASES:
        return f"{ALIASES[path]}:{line}"
    if os.path.isabs(path) and not path.startswith(ROOT):  # a user's script in a transcript (/tmp/...)
        return None
    if os.path.isfile(os.path.join(ROOT, path)):
        return ref
    named = [p for p in glob.glob(os.path.join(ROOT, "**", os.path.basename(path)), recursive=True)
             if ".venv" not in p]
    assert not named or path.startswith("/"), f"{ref}: a bare name of a repository file; give its path"
    return None


def _line(path: str, number: int) -> str:
    if path == "quick.py":
        return _quick_start()[0].splitlines()[number - 1]
    return _read(os.path.join(ROOT, path)).splitlines()[number - 1]


def test_line_references_point_at_what_they_name():
    seen = set()
    for doc, ref in _references():
        target = _resolve(ref)
        if target is None:
            continue
        seen.add(target)
        assert target in EXPECTED, f"{doc}: {ref} is not checked: add it to EXPECTED, or drop the line number"
        path, number = target.rsplit(":", 1)
        assert EXPECTED[target] in _line(path, int(number)), (doc, ref, _line(path, int(number)))
    assert seen == set(EXPECTED), set(EXPECTED) - seen  # no stale entries here either
