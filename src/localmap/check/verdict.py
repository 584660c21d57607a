"""What the placement check says about a region, and what a region does with it.

Three verdicts, honestly (NOTE: three verdicts):

* **ok**: every output's claimed placements are proven by the body's types, and gradient placements inferred;
* **wrong**: the body contradicts a claim (``PlacementError``, with the op and line that made it so);
* **unproven**: a claim rests on a value the check cannot type (an op with no placement rule, one DTensor's
  propagation cannot place, a scan over a sharded dim, an all_to_all's rows). Never reported as ok: by default
  the region runs and localmap warns once, naming the output, the op where the proof stopped and how to settle
  it; ``check="strict"`` makes it an error, ``check="allow_unproven"`` accepts it explicitly.

A body the check cannot trace at all, or a failure inside the checker, is **unchecked**: the program runs, with
one warning naming the region, the reason, and the inputs whose gradient placements are then a guess.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from localmap.errors import LocalMapError, fail
from localmap.sites import user_stacklevel

CHECK_MODES = (True, False, "warn", "strict", "allow_unproven")


class PlacementError(LocalMapError):
    """A region's body contradicts its placements (or its in_grad_placements)."""


class UnprovenError(LocalMapError):
    """``check="strict"``: a claimed placement the check could neither prove nor refute."""


@dataclass
class Verdict:
    """What checking a region found. Problems are proven contradictions; unproven lists claims resting on
    values the check cannot type (one message each); unchecked says why the body could not be checked."""

    problems: list[PlacementError] = field(default_factory=list)
    unproven: list[str] = field(default_factory=list)  # one line per unproven (output, mesh dim)
    grad_placements: tuple | None = ()  # per input leaf: inferred placements (None entries for non-tensors)
    output_types: list = field(default_factory=list)
    unchecked: str | None = None  # why the body could not be checked (then nothing is inferred)
    guessed: list[str] = field(default_factory=list)  # unchecked: inputs whose gradient placements are a guess
    function: str = "region"  # the checked function's name, for messages
    warned: bool = field(default=False, compare=False)  # warnings of this verdict were shown (once each)
    definition: Any = field(default=None, compare=False)  # the region's code: warnings once per definition

    @property
    def ok(self) -> bool:
        """No proven contradiction (an unproven or unchecked verdict is not "ok": see ``status``)."""
        return not self.problems

    @property
    def status(self) -> str:
        """"wrong", "unchecked", "unproven" or "ok"."""
        if self.problems:
            return "wrong"
        if self.unchecked:
            return "unchecked"
        return "unproven" if self.unproven else "ok"

    @property
    def settled(self) -> bool:
        """Nothing to raise or warn about: the fast path of a region's call."""
        return self.status == "ok"

    def summary(self) -> str:
        status = self.status
        if status == "unchecked":
            return f"unchecked: {self.unchecked}"
        if status == "unproven":
            return f"unproven: {self.unproven[0]}"
        return "ok" if status == "ok" else str(self.problems[0]).splitlines()[0]


def unchecked_verdict(fn: Any, reason: str, guessed: list[str]) -> Verdict:
    return Verdict(grad_placements=None, unchecked=reason, guessed=guessed,
                   function=getattr(fn, "__name__", str(fn)))


def enforce(verdict: Verdict, mode: Any) -> None:
    """Act on a verdict by the region's check mode (see CHECK_MODES): a proven contradiction raises (warns in
    "warn"); unproven and unchecked warn once per verdict, and raise in "strict"; "allow_unproven" accepts an
    unproven claim silently. False does nothing."""
    status = verdict.status
    if mode is False or status == "ok":
        return
    if status == "wrong":
        if mode != "warn":
            raise verdict.problems[0]
        _warn_once(verdict, [str(p) for p in verdict.problems])
    elif status == "unchecked":
        if mode == "strict":
            raise fail(f"region {verdict.function!r}", "could not be checked, which check='strict' "
                       "(spmd_types=True) requires", given=verdict.unchecked,
                       fix="make the body traceable (no Python control flow on tensor values), or pass "
                           "check=True to run it unchecked with a warning")
        _warn_once(verdict, [_unchecked_message(verdict)])
    elif mode == "strict":
        raise fail(f"region {verdict.function!r}", f"claims what the check cannot prove: {verdict.unproven[0]}",
                   fix=_SETTLE, error=UnprovenError)
    elif mode != "allow_unproven":
        _warn_once(verdict, [f"local_map: region {verdict.function!r}: {line}. {_SETTLE}"
                             for line in verdict.unproven[:1]])


_SETTLE = ("To settle it: run localmap.verify on a step that uses the region (it compares with one device), "
           "register a placement rule for that op (localmap.register_rule), or accept the claim explicitly with "
           "local_map(..., check='allow_unproven'); check='strict' makes it an error")


def _unchecked_message(verdict: Verdict) -> str:
    guessed = ""
    if verdict.guessed:
        guessed = (f" The gradient placements of {', '.join(verdict.guessed)} are therefore a guess (Replicate "
                   "where the input is Replicate, which is wrong if it meets sharded data): give "
                   "in_grad_placements= to state them.")
    return (f"local_map: the body of {verdict.function!r} could not be checked ({verdict.unchecked}); it runs "
            f"unchecked.{guessed} Pass check=False to silence this.")


_warned: set = set()  # (region definition, message) already shown: one warning per definition and reason
_WARNED_LIMIT = 4096


def forget_warnings() -> None:
    """Show each warning again (``localmap.clear_caches``: a cold start)."""
    _warned.clear()


def _warn_once(verdict: Verdict, messages: list[str]) -> None:
    """Each message once per verdict, and once per region definition: a body checked again for other input
    shapes or dtypes (ChunkedLossWrapper chunks float states and int labels) stopping at the same op and line
    warns once."""
    if verdict.warned:
        return
    verdict.warned = True
    for message in messages:
        key = (verdict.definition, message) if verdict.definition is not None else None
        if key in _warned:
            continue
        if key is not None:
            if len(_warned) >= _WARNED_LIMIT:
                _warned.clear()
            _warned.add(key)
        warnings.warn(message, stacklevel=user_stacklevel())
