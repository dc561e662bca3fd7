"""Defenses. Each module registers one class with @register_defense; registry.yaml names the
module, so importing this package (or loading the registry) fills the registry deterministically."""
from . import none  # noqa: F401
from .base import Defense, DefenseContext, Split, get_defense_class, register_defense, registered_defenses

__all__ = ["Defense", "DefenseContext", "Split", "get_defense_class", "register_defense", "registered_defenses"]
