"""Which source line a check message names for an op: the line in the region's body (or in a module's forward
the body calls) where the op was made. The check records these lines while it traces, for every node, and
reads them only when a message needs one."""

import inspect

import pytest
import torch

from helpers import R, S0, randn
from localmap import PlacementError, local_map
from localmap.testing import distribute, simulated_mesh


def _line_of(fn, text: str) -> str:
    """'test_check_sites.py:N' for the line of `fn` holding `text`."""
    lines, first = inspect.getsourcelines(fn)
    return f"test_check_sites.py:{first + next(i for i, line in enumerate(lines) if text in line)}"


def _summed(a):
    return a.sum(0)  # a helper the body calls


class _Summing(torch.nn.Module):
    def forward(self, a):
        return a.sum(0, keepdim=False)  # a module's forward the body calls


def _body_sums(a):
    b = torch.tanh(a)
    return b.sum(0)  # the op that makes a partial sum


def _body_calls_helper(a):
    b = torch.tanh(a)
    return _summed(b)  # the body's line that calls the helper


_module = _Summing()


def _body_calls_module(a):
    return _module(torch.tanh(a))


@pytest.mark.parametrize("body, named", [
    (_body_sums, lambda: _line_of(_body_sums, "the op that makes")),
    (_body_calls_helper, lambda: _line_of(_body_calls_helper, "calls the helper")),
    (_body_calls_module, lambda: _line_of(_Summing.forward, "a module's forward")),
], ids=["body", "helper", "module"])
def test_wrong_claim_names_the_line_that_made_the_value(body, named):
    """A sum over a sharded dim claimed Replicate is refused; the message names the op's line."""
    with simulated_mesh(2) as mesh:
        f = local_map(body, [R], ([S0],), None, mesh)
        with pytest.raises(PlacementError) as caught:
            f(distribute(randn(4, 3), mesh, [S0]))
    assert named() in str(caught.value), str(caught.value)
