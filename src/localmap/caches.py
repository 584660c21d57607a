"""localmap's process-wide caches, in one registry: each cache registers itself where it is defined (its name,
limit and eviction), and ``cache_info()``/``clear_caches()`` walk the registry, so none is missed.

A leaf module (it imports nothing of localmap): every layer may register. Counters (``regions_built``,
``bodies_checked``) register the same way; they keep counting across ``clear_caches()``.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

# How an entry leaves a cache: the whole cache is dropped when it reaches its limit; new entries are not kept
# once it is full; the oldest entry goes first; an entry goes with its key object (weak keys); no limit (one
# entry per exception type or placement tuple: a program has few).
EVICTIONS = ("clear when full", "keep first", "oldest first", "weak keys", "unbounded")

Store = TypeVar("Store")


@dataclass(frozen=True)
class Cache:
    """One registered cache: how to count and clear it, its limit and eviction (EVICTIONS)."""

    name: str
    limit: int | None
    eviction: str
    size: Callable[[], int]
    clear: Callable[[], None]


_caches: dict[str, Cache] = {}
_counters: dict[str, Callable[[], int]] = {}
_lock = threading.Lock()


def register_cache(name: str, store: Store, *, limit: int | None, eviction: str, lock: Any = None,
                   size: Callable[[], int] | None = None, clear: Callable[[], None] | None = None) -> Store:
    """Register `store` (a dict, a WeakKeyDictionary, a WeakSet, ...) as cache `name`; returns it. `size` and
    `clear` default to ``len(store)`` and ``store.clear()`` (under `lock` when given)."""
    if eviction not in EVICTIONS:
        raise ValueError(f"eviction {eviction!r} is not one of {EVICTIONS}")
    guard = lock if lock is not None else contextlib.nullcontext()

    def default_size() -> int:
        with guard:
            return len(store)  # type: ignore[arg-type]

    def default_clear() -> None:
        with guard:
            store.clear()  # type: ignore[attr-defined]

    with _lock:
        _caches[name] = Cache(name, limit, eviction, size or default_size, clear or default_clear)
    return store


def register_counter(name: str, read: Callable[[], int]) -> None:
    """A count since the process started (``regions_built``), reported by ``cache_info()``."""
    with _lock:
        _counters[name] = read


def registered() -> dict[str, Cache]:
    """The registered caches by name (for tests and reports)."""
    with _lock:
        return dict(_caches)


def cache_info() -> dict[str, int]:
    """Every registered cache's size now as ``<name>_cached`` (``regions_cached``: region graphs held;
    ``verdicts_cached``: check verdicts held; ...) and the counters (``regions_built``, ``bodies_checked``:
    regions built and bodies checked since the process started, not served from a cache)."""
    caches, counters = registered(), dict(_counters)
    return {**{n: read() for n, read in counters.items()}, **{f"{n}_cached": c.size() for n, c in caches.items()}}


def cache_limits() -> dict[str, tuple[int | None, str]]:
    """(limit, eviction) per registered cache."""
    return {n: (c.limit, c.eviction) for n, c in registered().items()}


def clear_caches() -> None:
    """Empty every registered cache (a cold start; the counters keep counting). Not while a program is being
    captured or compiled: a capture finds its regions' plans in them."""
    for cache in registered().values():
        cache.clear()


def instances(name: str, limit: int | None, eviction: str, size: Callable[[Any], int],
              clear: Callable[[Any], None]) -> "weakref.WeakSet[Any]":
    """A registered cache spread over live objects (each region's plans and verdicts): a WeakSet the objects add
    themselves to; its size and clearing walk them."""
    live: weakref.WeakSet[Any] = weakref.WeakSet()

    def clear_all() -> None:
        for obj in list(live):
            clear(obj)

    register_cache(name, live, limit=limit, eviction=eviction, size=lambda: sum(size(o) for o in list(live)),
                   clear=clear_all)
    return live
