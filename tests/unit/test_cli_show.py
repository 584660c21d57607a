"""localmap.cli.show.parse_mesh: '2x2' (dims named by their count, or as given), 'dp=2,tp=2', and bad strings
refused with CliError. The CLI is an optional extra: skipped without click and rich."""

import pytest

pytest.importorskip("click")
pytest.importorskip("rich")

from localmap.cli.show import CliError, MeshSpec, parse_mesh  # noqa: E402


@pytest.mark.parametrize("text,shape,names", [
    ("2x2", (2, 2), ("dp", "tp")),
    ("4", (4,), ("tp",)),
    ("2x2x2", (2, 2, 2), ("pp", "dp", "tp")),
    ("2x2x2x2", (2, 2, 2, 2), ("d0", "d1", "d2", "d3")),
    (" 2 x 4 ", (2, 4), ("dp", "tp")),
    ("dp=2,tp=4", (2, 4), ("dp", "tp")),
    ("ep=8", (8,), ("ep",)),
    ("dp = 2, cp = 3", (2, 3), ("dp", "cp")),
])
def test_parse_mesh(text, shape, names):
    assert parse_mesh(text) == MeshSpec(shape, names)


def test_parse_mesh_with_names():
    assert parse_mesh("2x4", ("a", "b")) == MeshSpec((2, 4), ("a", "b"))
    assert parse_mesh("2x4", ("a",)) == MeshSpec((2, 4), ("dp", "tp"))  # names of another length: the defaults
    assert parse_mesh("ep=4", ("a",)) == MeshSpec((4,), ("ep",))  # named dims keep their own names


def test_mesh_spec():
    spec = MeshSpec((2, 4), ("dp", "tp"))
    assert spec.size == 8 and str(spec) == "2x4 (dp, tp)"


@pytest.mark.parametrize("text,fragment", [
    ("2by2", "--mesh '2by2' does not parse"),
    ("", "does not parse"),
    ("2x", "does not parse"),
    ("x2", "does not parse"),
    ("dp=x", "does not parse"),
    ("dp=2,tp", "does not parse"),
    ("2x-1", "does not parse"),
    ("dp=2,dp=2", "a mesh dim name appears twice"),
    ("0x2", "every mesh dim needs at least one rank"),
    ("tp=0", "every mesh dim needs at least one rank"),
])
def test_bad_mesh_strings(text, fragment):
    with pytest.raises(CliError) as info:
        parse_mesh(text)
    assert fragment in str(info.value)
