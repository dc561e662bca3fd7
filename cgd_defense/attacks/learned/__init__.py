"""Attacks whose triggers are learned or optimised (attack library II): each module registers one
trigger kind with a cached `fit` step (see fit.py); importing this package fills the registry."""
from . import inputaware, lc, lf, narcissus, ssba, trojannn  # noqa: F401  (trigger kinds register on import)
