"""Hand-written CLIP tokenizer for Stable Diffusion 1.x (byte-level BPE, OpenAI's bundled merges)."""

from .clip_tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer"]
