"""Which source line is the user's: one rule for every message and record that names a place in user code.

A frame is *library* code when its file is in torch, in contextlib, or in localmap's own machinery; localmap's
models and commands (``localmap/models``, ``localmap/cli``) are user code of the library, so a region defined
in the demo model is named by its line there. A site is ``file:line``, relative to the working directory when
the file is below it.
"""

from __future__ import annotations

import inspect
import os
import re
from types import TracebackType
from typing import Iterable

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_USER_SUBPACKAGES = ("models", "cli")


def is_library(path: str) -> bool:
    """Whether `path` is torch's, contextlib's or localmap's machinery (not code a user wrote)."""
    path = os.path.abspath(path)
    if f"{os.sep}torch{os.sep}" in path or os.path.basename(path) == "contextlib.py":
        return True
    if path.startswith(_PACKAGE_DIR + os.sep):
        return path[len(_PACKAGE_DIR) + 1:].split(os.sep)[0] not in _USER_SUBPACKAGES
    return False


def site(path: str, line: int) -> str:
    """``file:line``, relative to the working directory when the file is below it."""
    rel = os.path.relpath(path)
    return f"{path if rel.startswith('..') else rel}:{line}"


def innermost_user_site(frames: Iterable[tuple[str, int]]) -> str | None:
    """The last (innermost) user frame of `frames`, given outermost first."""
    found = None
    for path, line in frames:
        if not is_library(path):
            found = site(os.path.abspath(path), line)
    return found


def traceback_site(tb: TracebackType | None) -> str | None:
    """The innermost user frame of an exception's traceback (where the user's code raised)."""
    frames = []
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return innermost_user_site(frames)


def stack_trace_site(stack_trace: str) -> str | None:
    """The innermost user frame of a stack trace recorded as text (fx node meta ``stack_trace``)."""
    frames = [(path, int(line)) for path, line in re.findall(r'File "([^"]+)", line (\d+)', stack_trace)]
    return innermost_user_site(frames)


def caller_site() -> str:
    """The innermost caller outside library code: where the user called into localmap."""
    frame = inspect.currentframe()
    while frame is not None:
        if not is_library(frame.f_code.co_filename):
            return site(os.path.abspath(frame.f_code.co_filename), frame.f_lineno)
        frame = frame.f_back
    return "<unknown>"


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel (from the caller of this function) that points at the innermost frame
    outside library code, so a warning names the user's line whichever path led to it."""
    frame, level = inspect.currentframe(), 0
    while frame is not None and is_library(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return max(level, 1)
