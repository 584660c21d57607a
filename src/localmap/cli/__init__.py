"""The command line, ``localmap demo`` and ``localmap inspect`` (also ``python -m localmap ...``): an optional
extra. ``pip install localmap`` pulls in torch only; ``pip install 'localmap[cli]'`` adds click and rich, which
the commands need (``localmap.cli.commands``), and numpy (torch warns on stderr at import without it). Without
click or rich the script says how to install them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

EXTRA = ("click", "rich")  # what `pip install 'localmap[cli]'` adds


def missing() -> list[str]:
    """The CLI's packages that cannot be imported."""
    absent = []
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(name)
    return absent


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the `localmap` script and `python -m localmap`."""
    absent = missing()
    if absent:
        print(f"localmap: error: the command line needs {' and '.join(absent)}: "
              "pip install 'localmap[cli]'", file=sys.stderr)
        sys.exit(1)
    from localmap.cli.commands import app

    return app.main(args=argv, prog_name="localmap")


def __getattr__(name: str) -> Any:  # `from localmap.cli import app` (needs the extra)
    if name == "app":
        from localmap.cli.commands import app

        return app
    raise AttributeError(name)
