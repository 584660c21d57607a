"""Which source line is the user's: one rule for every message and record that names a place in user code.

A frame is *library* code when its file is in torch, in contextlib, or in localmap's own machinery; localmap's
models and commands (``localmap/models``, ``localmap/cli``) are user code of the library, so a region defined
in the demo model is named by its line there. A site is ``file:line``, relative to the working directory when
the file is below it.
"""

from __future__ import annotations

import functools
import inspect
import os
from types import TracebackType
from typing import Any, Iterable

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


LIBRARY_FILES_LIMIT = 4096  # file paths whose answer is remembered (least recently used dropped first)
# asked for every frame a traced op walks; registered as the cache "library_files" by localmap.errors (this
# module imports nothing of localmap)
_library_file = functools.lru_cache(maxsize=LIBRARY_FILES_LIMIT)(is_library)


def library_files_cached() -> int:
    return _library_file.cache_info().currsize


def clear_library_files() -> None:
    _library_file.cache_clear()


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


_BODIES: set[tuple[str, str]] = set()  # (file, function name) of region bodies the check traced


def register_body(fn: Any) -> None:
    """Name the ops a traced body makes by their lines in `fn` (a region's body; see traced_frame)."""
    code = getattr(getattr(fn, "__wrapped__", fn), "__code__", None)
    if code is not None:
        _BODIES.add((code.co_filename, code.co_name))


def traced_frame() -> tuple[str, int] | None:
    """(file, line) of the op the caller is tracing: the innermost frame outside library code that runs a
    region's body or a module's ``forward`` (an op made in a helper the body calls is named by the body's line
    that calls it). Only the frame is kept; ``frame_site`` names it when a message needs it."""
    frame = inspect.currentframe()
    while frame is not None:
        code = frame.f_code
        if (code.co_name == "forward" or (code.co_filename, code.co_name) in _BODIES) and \
                not _library_file(code.co_filename):
            return code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def frame_site(frame: tuple[str, int] | None) -> str | None:
    """``file:line`` of a frame kept by traced_frame (None stays None)."""
    return None if frame is None else site(os.path.abspath(frame[0]), frame[1])


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
