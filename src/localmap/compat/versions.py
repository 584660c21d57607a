"""The PyTorch version localmap runs on, and every behaviour that differs by version, named here.

localmap is tested on the releases listed in the README. A difference between releases is written once below as
a named fact (``TORCH_AT_LEAST_2_14``, ...) and read by the fence's other modules, never by version numbers
scattered through the code.
"""

from __future__ import annotations

import re

import torch


def _release(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()  # type: ignore[union-attr]
    return int(major), int(minor)


TORCH_RELEASE = _release(torch.__version__)  # (major, minor), e.g. (2, 13)
TORCH_AT_LEAST_2_14 = TORCH_RELEASE >= (2, 14)
