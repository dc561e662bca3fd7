"""Attacks: trigger kinds (registered functions), the YAML attack language, and poisoning."""
from . import natural, warp  # noqa: F401  (trigger kinds register on import)
from . import learned  # noqa: F401  (learned trigger kinds with a fit step: attack library II)
from .poison import PoisonedData, TriggeredTest, poison_training_set, trigger_test_set
from .spec import AttackSpec, load_attack_file, parse_attack
from .triggers import TriggerKind, list_trigger_kinds, register_trigger

__all__ = ["PoisonedData", "TriggeredTest", "poison_training_set", "trigger_test_set", "AttackSpec",
           "load_attack_file", "parse_attack", "TriggerKind", "list_trigger_kinds", "register_trigger"]
