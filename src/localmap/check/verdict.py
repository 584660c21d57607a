"""What the placement check says about a region, and what a region does with it.

Four verdicts, honestly (NOTE: four verdicts; docs/check-verdicts.md):

* **ok**: every output's claimed placements are proven by the body's types, and gradient placements inferred;
* **tested**: the proof stopped, and a test settled the claim instead (``localmap.check.tested``): the region run
  on a simulated mesh of the call's shape matched its one-rank run (its global meaning) in values and gradients,
  on the inputs the record names. Never reported as proven: ``check="strict"`` still refuses it;
* **wrong**: the body contradicts a claim (``PlacementError``, with the op and line that made it so), or the test
  found a difference (with the numbers);
* **unproven**: a claim rests on a value the check cannot type (an op with no placement rule, one DTensor's
  propagation cannot place, a scan over a sharded dim, an all_to_all's rows), and no test settled it (over the
  test's budget, a fake process group, random draws, or a body whose meaning changes on one rank). Never
  reported as ok: by default the region runs and localmap warns once, naming the output, the op where the proof
  stopped and how to settle it; ``check="strict"`` makes it an error, ``check="allow_unproven"`` accepts it
  explicitly (and runs no test).

A body the check cannot trace at all, or a failure inside the checker, is **unchecked**: the program runs, with
one warning naming the region, the reason, and the inputs whose gradient placements are then a guess.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from localmap.caches import register_cache
from localmap.errors import LocalMapError, fail, region_name
from localmap.sites import user_stacklevel

CHECK_MODES = (True, False, "warn", "strict", "allow_unproven", "test")


class PlacementError(LocalMapError):
    """A region's body contradicts its placements (or its in_grad_placements)."""


class UnprovenError(LocalMapError):
    """``check="strict"``: a claimed placement the check could neither prove nor refute."""


@dataclass
class TestRecord:
    """What the test of an unproven claim ran and found (``localmap.check.tested``)."""

    inputs: str  # the inputs used: "the call's own inputs: args[0] float32[8, 8] (Shard(dim=1),), ..."
    mesh: str  # "4 ranks (tp=4) against one"
    largest: float = 0.0  # the largest difference over outputs and gradients (absolute)
    where: str = ""  # the output or gradient the largest difference is in
    same: bool = True  # every output and gradient within tolerance of the one-rank run
    dependence: list[str] = field(default_factory=list)  # why the one-rank run may mean another program
    not_run: str | None = None  # why the test did not run (then nothing above is a result)

    def line(self) -> str:
        if self.not_run:
            return f"not tested: {self.not_run}"
        return (f"tested on {self.mesh}, {self.inputs}: largest difference {self.largest:.3g}"
                + (f" ({self.where})" if self.where else ""))


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
    untraceable: str | None = None  # unchecked: why no trace on fake tensors follows the body (compat.untraceable_why)
    # None when every output takes the default; else per tensor output (factor, second order): the factor on
    # the gradient entering it (check.checker: mixed gradients), and the Replicate mesh dims where its
    # gradient's own gradient (a double backward) is Partial (a frozenset or None), or why none is right (a str)
    out_grad_rules: tuple | None = None
    function: str = "region"  # the checked function's name, for messages
    warned: bool = field(default=False, compare=False)  # warnings of this verdict were shown (once each)
    per_call: bool = False  # checked on one call's values (the body branches on them): reuse for no other call
    definition: Any = field(default=None, compare=False)  # the region's code: warnings once per definition
    test: TestRecord | None = None  # unproven: what a test of the claim ran and found (localmap.check.tested)
    draws_random: bool = False  # the traced body draws random numbers (the test then leaves it unproven)
    mesh_reads: list[str] = field(default_factory=list)  # unproven: where the body reads a shard as a unit
    low_precision: bool = False  # unproven: the traced body computes in half precision somewhere (bf16 matmuls)
    # the steps the proof read by their meaning on the call's mesh, which follows its size ("file:line: the op
    # and its meaning"; check.coordinates): an ok verdict resting on them means what the body means on this mesh
    follows_mesh: list[str] = field(default_factory=list, compare=False)

    @property
    def ok(self) -> bool:
        """No proven contradiction (an unproven or unchecked verdict is not "ok": see ``status``)."""
        return not self.problems

    @property
    def status(self) -> str:
        """"wrong", "unchecked", "unproven", "tested" or "ok"."""
        tested = self.test is not None and not self.test.not_run and self.test.same
        if self.problems:
            return "wrong"
        if self.unchecked:
            return "tested" if tested else "unchecked"
        if not self.unproven:
            return "ok"
        return "tested" if tested else "unproven"

    @property
    def settled(self) -> bool:
        """Nothing to raise or warn about: the fast path of a region's call."""
        return self.status == "ok"

    def summary(self) -> str:
        status = self.status
        if status == "unchecked":
            return f"unchecked: {self.unchecked}"
        if status == "unproven":
            return f"unproven: {self.unproven[0]}" + (f"; {self.test.line()}" if self.test is not None else "")
        if status == "tested":
            return f"tested: {self.test.line()}" if self.test is not None else "tested"
        return "ok" if status == "ok" else str(self.problems[0]).splitlines()[0]


def unchecked_verdict(fn: Any, reason: str, guessed: list[str]) -> Verdict:
    return Verdict(grad_placements=None, unchecked=reason, guessed=guessed,
                   function=region_name(fn))


def refuse_divided_gradients(verdict: Verdict, path: str) -> None:
    """A path that cannot divide a Replicate output's gradient (check.checker._settle_mixed: a Replicate input
    that meets per-rank data and is also returned) refuses the region by name instead of miscounting it."""
    if verdict.out_grad_rules is None or all(factor == 1 for factor, _ in verdict.out_grad_rules):
        return
    raise fail(f"region {verdict.function!r}", f"returns a Replicate value of an input that also meets per-rank "
               f"data; its gradient is exact eagerly, but {path} cannot divide that output's gradient yet",
               given="a Replicate input whose gradient is part partial sum, part whole",
               fix="pass that input through localmap.collectives.pvary(x, mesh_dim) where it meets the per-rank "
                   "data (its gradient is then summed there, and Replicate), or call the region eagerly")


def enforce(verdict: Verdict, mode: Any, *, refuse_guess: bool = True) -> None:
    """Act on a verdict by the region's check mode (see CHECK_MODES): a proven contradiction raises (warns in
    "warn"); unproven and unchecked warn once per verdict, and raise in "strict"; "allow_unproven" accepts an
    unproven claim silently; a tested claim is accepted silently, except by "strict", which accepts proven
    claims only (a test holds for the inputs it ran); an unchecked body whose gradient placements would be a guess
    is refused (``refuse_guessed``; with `refuse_guess` False the caller refuses it after running the body, so
    that the body's own error comes first). False does nothing."""
    status = verdict.status
    if mode is False or status == "ok" or (status == "tested" and mode != "strict"):
        return
    if status == "wrong":
        if mode != "warn":
            raise verdict.problems[0]
        _warn_once(verdict, [str(p) for p in verdict.problems])
    elif verdict.unchecked:  # unchecked, or (only strict gets here) tested where no trace followed the body
        if mode == "strict":
            raise fail(f"region {verdict.function!r}", "could not be checked, which check='strict' "
                       "(spmd_types=True) requires", given=verdict.unchecked,
                       fix="make the body traceable (no Python control flow on tensor values), or pass "
                           "check=True to run it unchecked with a warning")
        if not guess_refused(verdict, mode):
            _warn_once(verdict, [_unchecked_message(verdict)])
        elif refuse_guess:
            refuse_guessed(verdict, mode)
    elif mode == "strict":
        tested = f" ({verdict.test.line()}; strict accepts proven claims only)" if verdict.test is not None else ""
        raise fail(f"region {verdict.function!r}",
                   f"claims what the check cannot prove: {verdict.unproven[0]}{tested}", fix=_SETTLE,
                   error=UnprovenError)
    elif mode != "allow_unproven":
        test = f" ({verdict.test.line()})" if verdict.test is not None else ""
        _warn_once(verdict, [f"local_map: region {verdict.function!r}: {line}{test}. {_SETTLE}"
                             for line in verdict.unproven[:1]], reasons=verdict.unproven[:1])


def guess_refused(verdict: Verdict, mode: Any) -> bool:
    """Whether an unchecked verdict is refused: some input's gradient placements would be a guess, gradients
    are recorded, and the mode refuses ("warn" only warns, False skips the check)."""
    return bool(verdict.guessed) and mode not in (False, "warn") and torch.is_grad_enabled()


def refuse_guessed(verdict: Verdict, mode: Any) -> None:
    """Raise for an unchecked verdict whose gradient placements would be a guess (guess_refused)."""
    if guess_refused(verdict, mode):
        raise fail(f"region {verdict.function!r}", "could not be checked, so the gradient placements of "
                   f"{', '.join(verdict.guessed)} would be a guess (Replicate, wrong where such an input meets "
                   "sharded data)", given=verdict.unchecked,
                   fix="state them: local_map(..., in_grad_placements=...) with Partial() where a Replicate "
                       "input meets sharded data and its own placements where it does not; or make the body "
                       "traceable; check=False runs it unchecked with the guess")


_SETTLE = ("To settle it: run localmap.verify on a step that uses the region (it compares with one device), "
           "test it against its one-rank run on a simulated mesh (check='test'), "
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


_WARNED_LIMIT = 4096
# (region definition, message) already shown: one warning per definition and reason
_warned: set = register_cache("warnings_shown", set(), limit=_WARNED_LIMIT, eviction="clear when full")


def _warn_once(verdict: Verdict, messages: list[str], reasons: list[str] | None = None) -> None:
    """Each message once per verdict, and once per region definition and reason (`reasons`, one per message;
    the message itself by default): a body checked again for other input shapes or dtypes (ChunkedLossWrapper
    chunks float states and int labels) stopping at the same op and line warns once, whatever its test found."""
    if verdict.warned:
        return
    verdict.warned = True
    for message, reason in zip(messages, reasons or messages, strict=True):
        key = (verdict.definition, reason) if verdict.definition is not None else None
        if key in _warned:
            continue
        if key is not None:
            if len(_warned) >= _WARNED_LIMIT:
                _warned.clear()
            _warned.add(key)
        warnings.warn(message, stacklevel=user_stacklevel())


def describe(verdict: Verdict | None) -> str:
    """A verdict in full, for reports (localmap inspect): every problem with its expected/given/fix lines, every
    unproven claim with how to settle it, or why the body is unchecked."""
    if verdict is None:
        return "unchecked: the check is off (check=False)"
    status = verdict.status
    if status == "wrong":
        return "\n".join(str(p) for p in verdict.problems)
    if status == "unchecked":
        guessed = f" (the gradient placements of {', '.join(verdict.guessed)} are a guess)" if verdict.guessed else ""
        return (f"unchecked: {verdict.unchecked}{guessed}\n  fix:      make the body traceable (no Python control "
                "flow on tensor values), or give in_grad_placements= to state its gradient placements")
    if status == "unproven":
        settle = _SETTLE.removeprefix("To settle it: ")
        return "\n".join(f"unproven: {line}" for line in verdict.unproven) + f"\n  fix:      {settle}"
    return "\n".join([status, *(f"  note:     proven with its meaning on this mesh: {step}"
                                for step in verdict.follows_mesh)])

