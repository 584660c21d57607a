"""The fence's torch.compile helpers (compat.compiling): trace-time functions marked as Dynamo's
assume_constant_result marks them, errors that pass through Dynamo as themselves, size hints."""

import torch

from localmap import LocalMapError, PlacementError
from localmap.compat import size_hint, surfacing, trace_time
from localmap.errors import fail


def test_trace_time_marks_as_assume_constant_result_does():
    import torch._dynamo

    def plain():
        return 1

    marked = trace_time(lambda: 1)
    before = set(vars(plain))
    torch._dynamo.assume_constant_result(plain)
    added = {k: v for k, v in vars(plain).items() if k not in before}
    assert added and all(getattr(marked, k, None) == v for k, v in added.items())


def test_trace_time_returns_a_fresh_copy_and_surfaces_errors():
    from torch.distributed.tensor import Shard

    s0 = Shard(0)
    got = trace_time(lambda: ((s0,), 2))()
    assert got == ((Shard(0),), 2) and got[0][0] is not s0
    err = fail("args[0]", "is wrong", fix="do it right", error=PlacementError)

    def raising():
        raise err

    try:
        trace_time(raising)()
    except PlacementError as e:
        assert str(e) == str(err) and e.fix == "do it right" and isinstance(e, AssertionError)
    else:
        raise AssertionError("trace_time swallowed the error")


def test_surfaced_error_keeps_class_name_attributes_and_message():
    err = fail("outputs", "is claimed Replicate", expected="Replicate()", given="Partial(sum)", fix="claim it",
               mesh_dim=0, error=PlacementError)
    out = surfacing(err)
    assert isinstance(out, PlacementError) and isinstance(out, LocalMapError) and isinstance(out, AssertionError)
    assert type(out).__name__ == "PlacementError" and type(out).__module__ == PlacementError.__module__
    assert (out.path, out.mesh_dim, out.expected, out.given, out.fix) == ("outputs", 0, "Replicate()",
                                                                          "Partial(sum)", "claim it")
    out.args = (out.args[0] + "\nfrom user code: ...",)  # what Dynamo does to an error passing through
    assert str(out) == str(err)
    assert type(surfacing(fail("x", "y", fix="z"))) is type(surfacing(fail("a", "b", fix="c")))
    assert surfacing(out) is out


def test_size_hint_passes_plain_values():
    assert size_hint(3) == 3 and size_hint(True) is True and size_hint("a") == "a" and size_hint(None) is None
    assert size_hint(torch.float32) is torch.float32
