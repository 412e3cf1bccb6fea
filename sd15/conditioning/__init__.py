"""Conditioning: the CLIP tokenizer and prompts -> text states (the first stage of a generation)."""

from .prompts import encode_prompts
from .tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer", "encode_prompts"]
