"""localmap.placements.specs: leaf specs, flat versus prefix form for inputs and outputs (lists, tuples, dicts,
nested), the spec argument's own checks, and Shard dims normalized (negative) or refused (out of range)."""

import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from helpers import expect_error
from localmap.placements.specs import (is_leaf_spec, normalize_shard_dims, resolve_input_specs,
                                       resolve_output_specs, validate_spec_argument)

S0, S1, R, P = Shard(0), Shard(1), Replicate(), Partial()
T = torch.zeros(2)  # any tensor: resolution looks at structure only


def test_is_leaf_spec():
    assert is_leaf_spec(None) and is_leaf_spec([S0]) and is_leaf_spec((R, P))
    assert not is_leaf_spec([]) and not is_leaf_spec([[S0]]) and not is_leaf_spec(S0) and not is_leaf_spec([S0, 1])


# ---- inputs -----------------------------------------------------------------------------------------------------

def test_flat_form_one_spec_per_leaf():
    # One list argument with two leaves, two leaf specs: the flat form (PyTorch's), one per leaf.
    assert resolve_input_specs(([S0], [R]), ([T, T],), 2) == ((S0,), (R,))
    assert resolve_input_specs(([S0], None), (T, 3), 2) == ((S0,), None)


def test_prefix_form_one_spec_for_a_whole_list():
    # Two arguments (a list of two tensors, a tensor), two specs for three leaves: a prefix of the arguments.
    assert resolve_input_specs(([S0], [R]), ([T, T], T), 3) == ((S0,), (S0,), (R,))


def test_prefix_form_nested_list():
    assert resolve_input_specs(([[S0], [[R], [P]]],), ([T, [T, T]],), 3) == ((S0,), (R,), (P,))


def test_prefix_form_dict_follows_the_arguments_order():
    value = {"b": T, "a": T}
    assert resolve_input_specs(({"a": [S0], "b": [R]},), (value,), 2) == ((R,), (S0,))
    assert resolve_input_specs(([S1],), ({"a": T, "b": T},), 2) == ((S1,), (S1,))  # one spec for the dict


def test_input_spec_count_differs():
    err = expect_error(lambda: resolve_input_specs(([S0],), (T, T), 2), "in_placements",
                       ("has 1 entries for a call with 2 positional arguments", "expected:", "given:"))
    assert err.given == 1


def test_prefix_structure_mismatches():
    expect_error(lambda: resolve_input_specs(([[S0], [S0], [S0]],), ([T, T],), 2), "in_placements for args[0]",
                 ("has 3 entries but args[0] has 2",))
    expect_error(lambda: resolve_input_specs(({"a": [S0], "c": [R]},), ({"a": T, "b": T},), 2),
                 "in_placements for args[0]", ("keys that differ",))
    expect_error(lambda: resolve_input_specs(([[S0], [R]],), ({"a": T, "b": T},), 2), "in_placements for args[0]",
                 ("does not match the structure",))
    expect_error(lambda: resolve_input_specs(([[S0], [R]],), (T, T), 2, name="in_grad_placements"),
                 "in_grad_placements")  # the name given is the one reported


# ---- outputs ----------------------------------------------------------------------------------------------------

def test_output_specs():
    assert resolve_output_specs([S0], (T, T), 2) == ((S0,), (S0,))  # one spec for every output
    assert resolve_output_specs(None, (T, 3), 2) == (None, None)
    assert resolve_output_specs(([S0], None), (T, 3), 2) == ((S0,), None)  # flat
    assert resolve_output_specs(([S0], [R]), (T, (T, T)), 3) == ((S0,), (R,), (R,))  # prefix of a tuple
    assert resolve_output_specs({"y": [R], "x": [S0]}, {"x": T, "y": T}, 2) == ((S0,), (R,))  # dict, in order


def test_output_spec_count_differs():
    err = expect_error(lambda: resolve_output_specs([[S0], [S0]], (T, T, T), 3), "outputs",
                       ("returned 3 output leaves but out_placements has 2 specs",))
    assert (err.expected, err.given) == (3, 2)


# ---- the spec argument itself -----------------------------------------------------------------------------------

def test_validate_spec_argument_accepts():
    validate_spec_argument(None, "in_placements")
    validate_spec_argument(([S0], None, {"w": [R]}, [[S0], [R]]), "in_placements")
    validate_spec_argument({"x": [S0]}, "out_placements")  # a dict of output specs is fine
    validate_spec_argument([S0], "out_placements")


def test_validate_spec_argument_refuses():
    expect_error(lambda: validate_spec_argument(S0, "in_placements"), "in_placements",
                 ("a bare Placement is not a spec", "write [Shard(dim=0)]"))
    expect_error(lambda: validate_spec_argument({"a": [S0]}, "in_placements"), "in_placements",
                 ("must be a list or tuple", "dict"))
    expect_error(lambda: validate_spec_argument(([R], [R, "x"]), "in_placements"), "in_placements[1]",
                 ("mixes Placements",))
    expect_error(lambda: validate_spec_argument(([S0], R), "in_grad_placements"), "in_grad_placements",
                 ("mixes Placements",))  # a Placement next to specs: the list itself is named
    expect_error(lambda: validate_spec_argument(({"w": R},), "in_grad_placements"), "in_grad_placements[0]['w']",
                 ("a bare Placement is not a spec", "write [Replicate()]"))
    expect_error(lambda: validate_spec_argument(({"w": 3},), "in_placements"), "in_placements[0]['w']",
                 ("is not a placement spec", "int: 3"))


# ---- Shard dims ------------------------------------------------------------------------------------------------

def test_normalize_shard_dims_negative(fake_mesh_2x2):
    assert normalize_shard_dims((Shard(-1), R), 2, "args[0]", "in_placements", fake_mesh_2x2) == (S1, R)
    assert normalize_shard_dims((Shard(-2), Shard(-1)), 2, "args[0]", "in_placements", fake_mesh_2x2) == (S0, S1)
    assert normalize_shard_dims((P, Shard(1)), 3, "args[0]", "in_placements", fake_mesh_2x2) == (P, S1)


def test_normalize_shard_dims_out_of_range(fake_mesh_2x2):
    err = expect_error(lambda: normalize_shard_dims((R, Shard(2)), 2, "args[0]", "in_placements", fake_mesh_2x2),
                       "in_placements for args[0]",
                       ("Shard(2) is out of range for a 2-d tensor on mesh dim 1 ('tp')", "-2 <= d < 2"))
    assert err.mesh_dim == 1
    expect_error(lambda: normalize_shard_dims((Shard(-3), R), 2, "outputs", "out_placements", fake_mesh_2x2),
                 "out_placements for outputs", ("Shard(-3) is out of range", "mesh dim 0 ('dp')"))
    expect_error(lambda: normalize_shard_dims((S0, R), 0, "args[1]", "in_placements", fake_mesh_2x2),
                 "in_placements for args[1]", ("for a 0-d tensor", "no Shard for a 0-d tensor"))


def test_specs_shorter_than_the_mesh_are_padded_with_replicate(fake_mesh_2x2):
    from localmap.placements.specs import fit_spec_to_mesh

    assert fit_spec_to_mesh((S0,), fake_mesh_2x2, "args[0]", "in_placements") == (S0, R)
    assert fit_spec_to_mesh((S0, S1), fake_mesh_2x2, "args[0]", "in_placements") == (S0, S1)
    expect_error(lambda: fit_spec_to_mesh((S0, R, R), fake_mesh_2x2, "args[0]", "in_placements"),
                 "in_placements for args[0]", ("3 placements for a 2-d mesh", "('dp', 'tp')"))
