"""The names the eval command line offers, in a module that imports nothing heavy, so that
``python -m nearid_core.eval`` parses and checks its arguments before torch, transformers or any model code loads."""

from __future__ import annotations

from ..names import DTYPE_NAMES as DTYPE_NAMES  # re-exported: the eval CLI offers the library's dtype names

__all__ = ["BASELINE_NAMES", "DTYPE_NAMES", "INDEXING_MODES", "MASK_MODES", "RATING_NAME_PATTERN", "SIM_RANGE"]

#: Registry names of :data:`nearid_core.eval.baselines.BASELINES`, in registry order (a test keeps them equal).
BASELINE_NAMES: tuple[str, ...] = ("nearid", "siglip2-map", "siglip2-mean", "clip-vit-l14", "dinov2-l", "dino-vits8",
                                   "clip-vit-b32")

#: ``full`` raw images (Table 1) or ``fg`` foreground masks applied.
MASK_MODES: tuple[str, ...] = ("full", "fg")

#: ``aligned`` slot-aligned cross terms, or ``compact`` (the reference ``sim_test.py`` numbering).
INDEXING_MODES: tuple[str, ...] = ("aligned", "compact")

#: Declared scale of the similarity cells of ``--sims`` tables: cosines (``--sim-range`` declares another).
SIM_RANGE: tuple[float, float] = (-1.0, 1.0)

#: A scorer name of ``data_<name>_rating/`` (``dreambench-score --name``).
RATING_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
