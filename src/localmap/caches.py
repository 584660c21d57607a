"""localmap's process-wide caches, read and cleared through one documented place (tests, benchmarks, users
who want a cold start). Each region's own caches are ``fn.region.cache_info()``."""

from __future__ import annotations

from localmap.check import function as check_function
from localmap.check import verdict
from localmap.eager import autograd, region
from localmap.traced import build


def cache_info() -> dict[str, int]:
    """``regions_built``/``regions_cached``: region graphs built (not served from the cache) since the process
    started, and held now; ``bodies_checked``/``verdicts_cached``: region bodies traced for the placement check,
    and verdicts held now."""
    return {**build.cache_info(), **check_function.cache_info()}


def clear_caches() -> None:
    """Forget built regions, check verdicts (and which of their warnings were shown), shared regions of rebuilt
    wrappers and remembered gradient specs (the counters keep counting)."""
    build.clear_cache()
    region.clear_shared_regions()
    check_function.clear_cache()
    verdict.forget_warnings()
    autograd.clear_cache()
