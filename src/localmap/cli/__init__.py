"""The command line, ``localmap demo`` and ``localmap inspect`` (also ``python -m localmap ...``): an optional
extra. ``pip install localmap`` pulls in torch only; ``pip install 'localmap[cli]'`` adds click and rich, which
the commands need (``localmap.cli.commands``), and numpy (torch warns on stderr at import without it). Without
click or rich the script says how to install them.
"""

from __future__ import annotations

import importlib
import os
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


def source_checkout(package_dir: str | None = None) -> str | None:
    """The checkout's root when localmap runs from a source tree (src/localmap next to a pyproject.toml), else
    None (an installed wheel)."""
    here = package_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../src/localmap
    root = os.path.dirname(os.path.dirname(here))
    if os.path.basename(os.path.dirname(here)) == "src" and os.path.isfile(os.path.join(root, "pyproject.toml")):
        return root
    return None


def install_hint(package_dir: str | None = None) -> str:
    """How to get the CLI's packages: from a checkout, its editable install (or `make demo`); else the extra."""
    root = source_checkout(package_dir)
    if root is not None:
        return (f"in the checkout, run `make demo` (it creates .venv with them), or `pip install -e '.[cli]'` "
                f"from {root}")
    return "pip install 'localmap[cli]'"


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the `localmap` script and `python -m localmap`."""
    absent = missing()
    if absent:
        print(f"localmap: error: the command line needs {' and '.join(absent)}: {install_hint()}", file=sys.stderr)
        sys.exit(1)
    from localmap.cli.commands import app

    return app.main(args=argv, prog_name="localmap")


def __getattr__(name: str) -> Any:  # `from localmap.cli import app` (needs the extra)
    if name == "app":
        from localmap.cli.commands import app

        return app
    raise AttributeError(name)
