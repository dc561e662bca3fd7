"""CLIP: real open_clip models and the project's stand-in CLIPs behind one factory, and fast,
cached zero-shot scoring."""
from .factory import ClipModel, ClipSpec, load_clip, parse_clip_spec
from .zeroshot import image_features, prompts_for, text_classifier, zero_shot_logits

__all__ = ["ClipModel", "ClipSpec", "load_clip", "parse_clip_spec", "image_features", "prompts_for",
           "text_classifier", "zero_shot_logits"]
