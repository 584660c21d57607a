"""localmap.errors.fail: the one shape of every LocalMapError message,

    local_map: <path>: <problem> [on mesh dim <i> ('<name>')]
      expected: ...
      given:    ...
      fix:      ...

and the pieces kept as attributes on the (built, not raised) error."""

from localmap import LocalMapError, PlacementError
from localmap.errors import fail, mesh_dim_label
from localmap.testing import fake_mesh


def test_full_message_and_attributes(fake_mesh_2x2):
    err = fail("args[1]['w']", "placements differ from in_placements", expected="(Shard(dim=0), Replicate())",
               given="(Replicate(), Replicate())", fix="pass redistribute_inputs=True", mesh=fake_mesh_2x2,
               mesh_dim=0)
    assert isinstance(err, LocalMapError) and isinstance(err, ValueError)
    assert str(err) == (
        "local_map: args[1]['w']: placements differ from in_placements on mesh dim 0 ('dp')\n"
        "  expected: (Shard(dim=0), Replicate())\n"
        "  given:    (Replicate(), Replicate())\n"
        "  fix:      pass redistribute_inputs=True")
    assert (err.path, err.mesh_dim, err.expected, err.given, err.fix) == (
        "args[1]['w']", 0, "(Shard(dim=0), Replicate())", "(Replicate(), Replicate())",
        "pass redistribute_inputs=True")


def test_only_the_given_lines():
    assert str(fail("device_mesh", "is not a DeviceMesh")) == "local_map: device_mesh: is not a DeviceMesh"
    err = fail("outputs", "has 3 output leaves", expected=0, given=None, fix="")
    assert str(err) == "local_map: outputs: has 3 output leaves\n  expected: 0"  # 0 is shown, None and "" not
    assert err.mesh_dim is None and err.fix == "" and err.given is None
    assert str(fail("run", "bad", fix="do this")) == "local_map: run: bad\n  fix:      do this"


def test_mesh_dim_label():
    assert str(fail("outputs", "bad", mesh_dim=2)) == "local_map: outputs: bad on mesh dim 2"  # no mesh: no name
    with fake_mesh((2, 2), ("dp", "tp")) as named:
        assert mesh_dim_label(named, 1) == "mesh dim 1 ('tp')"
    with fake_mesh((2, 2)) as unnamed:
        assert mesh_dim_label(unnamed, 1) == "mesh dim 1"
        assert str(fail("args[0]", "bad", mesh=unnamed, mesh_dim=1)) == "local_map: args[0]: bad on mesh dim 1"


def test_error_class():
    err = fail("outputs", "is a partial sum", fix="claim Partial()", error=PlacementError)
    assert type(err) is PlacementError and isinstance(err, LocalMapError) and err.fix == "claim Partial()"
