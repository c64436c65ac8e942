"""Our CLIP: the OpenAI API (``available_models``, ``load``, ``tokenize``) over our own modules."""
from .clip import CLIPLoadError, available_models, load
from .model import CLIP, build_model, convert_weights
from .tokenizer import SimpleTokenizer, TextTooLongError, tokenize
from .zeroshot import get_classnames_and_templates

__all__ = [
    "CLIP",
    "CLIPLoadError",
    "SimpleTokenizer",
    "TextTooLongError",
    "available_models",
    "build_model",
    "convert_weights",
    "get_classnames_and_templates",
    "load",
    "tokenize",
]
