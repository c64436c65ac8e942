"""OpenAI's module path of the BPE tokenizer: ``from clip.simple_tokenizer import SimpleTokenizer`` keeps working."""
from .tokenizer import SimpleTokenizer

__all__ = ["SimpleTokenizer"]
