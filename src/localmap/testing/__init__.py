"""Run code on a mesh for tests, examples and the demo: simulated in one process, or real gloo processes.

- ``simulated_mesh(shape, names)``: a context manager giving a DeviceMesh whose ranks are simulated in this
  process (PyTorch's LocalTensorMode over the fake process group). Every tensor op runs once per rank.
- ``fake_mesh(shape, names)``: a mesh of any size over the fake process group, for tracing (no values).
- ``run_gloo(fn, world_size, ...)``: spawns one process per rank over loopback, runs ``fn(mesh, *args)`` on
  each, and returns the per-rank results. Bounded by a timeout; process groups are always destroyed.
- ``distribute(t, mesh, placements)``: a DTensor of a global tensor, including Partial placements (split into
  unequal pieces that reduce to the value, so a mistaken reduction shows).
- ``full(x)``: the global value of a DTensor (or a simulated tensor) as one plain tensor.
- ``planner_capture(model, *args)``: a planner's capture (meta-pytorch/autoparallel's pipeline, without
  autoparallel): Dynamo export with PyTorch's local_map wrapping on, then the joint forward+backward export with
  PyTorch's operator deferred; returns (Dynamo's graph, the joint graph). ``region_nodes(joint)``: its region
  nodes, forward then backward. ``run_joint(joint, inputs)``: that joint graph run on one device as a planner
  honouring each region node's placements runs it (region graphs per rank, split and joined by placements).
- ``on_one_device()``: inside a simulated mesh, run plain single-device code (a reference computation, or
  making global inputs: under the simulation ``torch.randn`` draws different values on each rank).
"""

from localmap.testing.gloo import GlooError, run_gloo
from localmap.testing.planner import planner_capture, region_nodes, run_joint
from localmap.testing.simulation import distribute, fake_mesh, full, on_one_device, simulated_mesh

__all__ = ["simulated_mesh", "fake_mesh", "run_gloo", "distribute", "full", "on_one_device", "GlooError", "planner_capture",
           "region_nodes", "run_joint"]
