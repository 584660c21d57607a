"""Regions as graph nodes: the operator with one function per dispatch key (``operator``), the traced front end
that turns a function and its specs into a body graph and an operator call (``frontend``), building a region's
forward and backward graphs and their cache (``build``), local <-> global fakes and running graphs
(``graphs``) and the metadata keys planners read (``meta``)."""
