"""The region catalogue's split by what the default check does (README, "Checking placements"): every program of
tests/catalogue.py run eagerly on a simulated mesh, classified as proven, tested, unproven, unchecked, refused by
the proof or refused by the test, per right and wrong program.

    .venv/bin/python scripts/catalogue_split.py [-v]
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "matrix"), str(ROOT / "src")]

import localmap  # noqa: E402
from catalogue import PROGRAMS, Program  # noqa: E402
from localmap import PlacementError  # noqa: E402
from localmap.check import function  # noqa: E402
from matrix_cells import mesh_of  # noqa: E402
from matrix_paths import draw, on_dtensors, recording  # noqa: E402


def outcome(prog: Program) -> str:
    """What the default check did with one program, run eagerly on its simulated mesh."""
    localmap.clear_caches()
    tensors = draw(prog, 1)
    try:
        with mesh_of(prog) as mesh:
            cell = recording(lambda: on_dtensors(prog, tensors, mesh, "single", penalty=False))
    except PlacementError as e:
        return "refused by the test" if "its test refutes" in str(e) else "refused by the proof"
    except Exception as e:  # a wrong program whose output DTensor cannot even use next
        return f"failed after the region ({type(e).__name__})"
    if not cell.said:  # silent: proven, or tested where the proof stopped (the verdict the check kept says)
        statuses = {verdict.status for _, verdict in function._cache.values()}
        return "tested" if "tested" in statuses else "proven"
    return "unproven" if any("unproven" in s for s in cell.said) else "unchecked"


def main() -> None:
    counts: collections.Counter = collections.Counter()
    for prog in PROGRAMS:
        kind = outcome(prog)
        counts[("right" if prog.right else "wrong", kind)] += 1
        if "-v" in sys.argv and kind not in ("proven", "refused by the proof"):
            print(f"  {'right' if prog.right else 'wrong'}  {kind:30}  {prog.id}")
    for (rightness, kind), n in sorted(counts.items()):
        print(f"{rightness:6} {kind:34} {n}")
    by_proof = sum(n for (_, kind), n in counts.items() if kind in ("proven", "refused by the proof"))
    print(f"{len(PROGRAMS)} programs; the proof decides {by_proof} ({by_proof / len(PROGRAMS):.0%})")


if __name__ == "__main__":
    main()
