"""Defenses. Each module registers one class with @register_defense; registry.yaml names the
module, so importing this package (or loading the registry) fills the registry deterministically."""
from . import none  # noqa: F401
from . import cgd  # noqa: F401  (CLIP-Guided Defense; its split also feeds clean-data defenses)
from . import fp, nad, anp, ibau  # noqa: F401  (clean-data defenses, fed through clean_source.py)
from . import abl, dbd, asd  # noqa: F401  (poisoned-data baselines: train from scratch on the poisoned set)
from .base import Defense, DefenseContext, Split, get_defense_class, register_defense, registered_defenses

__all__ = ["Defense", "DefenseContext", "Split", "get_defense_class", "register_defense", "registered_defenses"]
