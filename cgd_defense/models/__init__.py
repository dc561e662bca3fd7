"""Model registry (timm style). Importing this package registers every architecture."""
from . import fastnet, preactresnet, resnet  # noqa: F401  (fills the registry)
from .registry import create_model, is_model, list_models, register_model
from .wrapper import Classifier

__all__ = ["create_model", "is_model", "list_models", "register_model", "Classifier"]
