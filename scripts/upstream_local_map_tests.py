"""Run PyTorch's own local_map test files twice: as they are (PyTorch's local_map), then with only the import of
local_map swapped to localmap's; print each test's outcome side by side and the counts.

Fetches nothing: give the test files' paths (read from PyTorch's repository; never commit them here).

    python scripts/upstream_local_map_tests.py /tmp/upstream_tests/*.py

Run it with the Python whose torch you want to test; it runs pytest with that same interpreter. PyTorch's test
helpers need `expecttest` importable (e.g. `pip install --target DIR expecttest`, then `--extra-path DIR`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# The import lines of local_map in PyTorch's test files (its eager tests and its operator tests).
IMPORTS = re.compile(r"from torch\.distributed\.(?:_tensor|tensor)\.experimental import local_map\b")
OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)|^(PASSED|FAILED|SKIPPED|ERROR) (\S+::\S+)")


def swapped_copy(path: Path, folder: Path) -> Path:
    """The test file with only its local_map import replaced by localmap's."""
    text = path.read_text()
    new, count = IMPORTS.subn("from localmap import local_map", text)
    if count == 0:
        raise SystemExit(f"{path}: no import of PyTorch's local_map found to swap")
    target = folder / path.name
    target.write_text(new)
    return target


def outcomes(path: Path, extra_path: list[str], timeout: int) -> dict[str, str]:
    """Each test's outcome (pytest -rA) of one file, run in its own process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(extra_path + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", str(path)],
                         env=env, cwd=path.parent, capture_output=True, text=True, timeout=timeout)
    found: dict[str, str] = {}
    for line in run.stdout.splitlines():
        m = OUTCOME.match(line)
        if m:
            name, status = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            found[name.split("::", 1)[1].split(" ")[0]] = status
    if not found:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--extra-path", action="append", default=[], help="also on PYTHONPATH (e.g. expecttest)")
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.files:
            path = path.resolve()
            theirs = outcomes(path, args.extra_path, args.timeout)
            ours = outcomes(swapped_copy(path, Path(tmp)), [str(SRC)] + args.extra_path, args.timeout)
            print(f"\n{path.name}")
            for name in sorted(set(theirs) | set(ours)):
                print(f"  {name:<60} torch {theirs.get(name, '-'):<8} localmap {ours.get(name, '-')}")
            ran = [n for n in theirs if theirs[n] != "SKIPPED"]
            both = [n for n in ran if theirs[n] == "PASSED" and ours.get(n) == "PASSED"]
            print(f"  ran here {len(ran)}, pass with torch {sum(theirs[n] == 'PASSED' for n in ran)}, "
                  f"pass with localmap {sum(ours.get(n) == 'PASSED' for n in ran)}, pass with both {len(both)}, "
                  f"skipped {len(theirs) - len(ran)}")


if __name__ == "__main__":
    main()
