"""LGD: Language-Guided Distillation of a frozen CLIP teacher into lightweight students."""
__version__ = "0.1.0"
