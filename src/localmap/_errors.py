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
