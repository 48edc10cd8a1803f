"""The float64 formulas the tests compare against live in :mod:`fastcl.reference` (the loss registry
points at them); the tests keep importing them as ``reference``."""
from fastcl.reference import info_nce, nt_xent, supcon  # noqa: F401
