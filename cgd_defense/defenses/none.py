"""`none`: the undefended model, the reference point of every DER."""
from __future__ import annotations

from .base import Defense, register_defense


@register_defense("none")
class NoDefense(Defense):
    threat_model = "model-only"

    def fit(self, model, train_set, *, val_set=None, clean_subset=None, context=None):
        self.params  # validates (no parameters)
        self.model_ = model
        return self
