"""Errors of localmap, and the one helper that writes their messages.

Every message has the same shape so that users learn to read it once:

    local_map: <where>: <what is wrong> [on mesh dim <i> ('<name>')]
      expected: ...
      given:    ...
      fix:      ...

`where` is an argument path such as ``args[1]['w']`` or ``outputs[0]``, built from the pytree key path of the
offending leaf, so it points at the exact value in the user's call.
"""

from __future__ import annotations

from typing import Any

from localmap.caches import register_cache
from localmap.sites import LIBRARY_FILES_LIMIT, clear_library_files, library_files_cached, site, traceback_site


class LocalMapError(ValueError):
    """Bad input to a localmap API. Carries the pieces of its message as attributes for tools and tests."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        mesh_dim: int | None = None,
        expected: Any = None,
        given: Any = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.mesh_dim = mesh_dim
        self.expected = expected
        self.given = given
        self.fix = fix


def mesh_dim_label(mesh: Any, mesh_dim: int) -> str:
    """``mesh dim 1 ('tp')`` when the mesh names its dims, else ``mesh dim 1``."""
    names = getattr(mesh, "mesh_dim_names", None) if mesh is not None else None
    if names:
        return f"mesh dim {mesh_dim} ({names[mesh_dim]!r})"
    return f"mesh dim {mesh_dim}"


def fail(
    path: str,
    problem: str,
    *,
    expected: Any = None,
    given: Any = None,
    fix: str | None = None,
    mesh: Any = None,
    mesh_dim: int | None = None,
    error: type[LocalMapError] = LocalMapError,
) -> LocalMapError:
    """Build (not raise) a LocalMapError whose message names the path, mesh dim, expected, given and fix."""
    head = f"local_map: {path}: {problem}"
    if mesh_dim is not None:
        head += f" on {mesh_dim_label(mesh, mesh_dim)}"
    lines = [head]
    if expected is not None:
        lines.append(f"  expected: {expected}")
    if given is not None:
        lines.append(f"  given:    {given}")
    if fix:
        lines.append(f"  fix:      {fix}")
    return error(
        "\n".join(lines), path=path, mesh_dim=mesh_dim, expected=expected, given=given, fix=fix
    )


class CollectiveError(LocalMapError):
    """A collective that localmap runs itself (the gather of uneven shard sizes, the ranks' check outcomes)
    failed or timed out: another rank failed, exited, or is in a different call."""


# The fix line of every CollectiveError: what the other ranks did is where to look.
PEER_FIX = ("another rank failed, exited, or called this region with other shapes or placements: see that rank's "
            "error (the wait is bounded by LOCALMAP_COLLECTIVE_TIMEOUT seconds, else the process group's timeout)")


# ---- errors raised inside a region's body -------------------------------------------------------------------------

class BodyError(LocalMapError):
    """An error raised inside a region's body (a shape error in a matmul, say), re-raised naming the region, where
    it is defined and the line of the body that raised. The original exception is ``__cause__`` and
    ``original``; the raised object is also an instance of the original's type where Python allows it, so
    ``except RuntimeError`` still catches a wrapped RuntimeError."""

    original: BaseException | None = None

    def __str__(self) -> str:  # the message as given (KeyError and friends would quote it)
        return str(self.args[0]) if self.args else ""


_body_error_types: dict[type, type] = register_cache("body_error_types", {}, limit=None, eviction="unbounded")
# sites' answer to "is this file library code?" (sites is below every layer that may register)
register_cache("library_files", None, limit=LIBRARY_FILES_LIMIT, eviction="oldest first",
               size=library_files_cached, clear=clear_library_files)


def _body_error_type(original: type) -> type:
    cls = _body_error_types.get(original)
    if cls is None:
        try:
            cls = type(f"BodyError[{original.__name__}]", (BodyError, original), {"__module__": __name__})
        except TypeError:  # incompatible layout (OSError, ...): the plain wrapper
            cls = BodyError
        _body_error_types[original] = cls
    return cls


def region_name(func: Any) -> str:
    """A region's name in every message and report, eager or compiled: its function's ``__name__`` (where it is
    defined is said separately), else the callable's type name."""
    inner = getattr(func, "__wrapped__", func)
    return getattr(inner, "__name__", None) or type(inner).__name__


def region_label(func: Any) -> tuple[str, str]:
    """(name, file:line of its definition) of a region's function."""
    inner = getattr(func, "__wrapped__", func)
    name = region_name(func)
    code = getattr(inner, "__code__", None) or getattr(getattr(inner, "forward", None), "__code__", None)
    return name, (site(code.co_filename, code.co_firstlineno) if code is not None else "<unknown>")


CHAINED = "the original error and its traceback are chained above (raised from it)"


def body_error(func: Any, exc: BaseException, phase: str = "its body", fix: str = CHAINED) -> LocalMapError:
    """The error to raise for `exc` raised inside region `func`: BodyError naming the region and line (a
    LocalMapError passes through unchanged: it names its own path)."""
    if isinstance(exc, LocalMapError):
        return exc
    name, defined = region_label(func)
    return wrapped_error(f"region {name!r} (defined at {defined})", exc, phase, traceback_site(exc.__traceback__),
                         fix=fix)


def wrapped_error(path: str, exc: BaseException, phase: str, at: str | None = None,
                  fix: str = CHAINED) -> LocalMapError:
    """A BodyError at `path` for `exc` (raised while `phase` ran), keeping the original's type where possible."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    err = fail(path, f"{phase} raised {type(exc).__name__}" + (f" at {at}" if at else "") + (f": {first}" if first else ""),
               fix=fix, error=_body_error_type(type(exc)))
    err.original = exc
    return err
