"""Conditioning: prompts -> the UNet's text states, in A1111's prompt language.

emphasis (weights), editing (prompt editing and alternation), chunks (75-token chunks, BREAK, embeddings
in the token stream), embeddings (textual-inversion files), prompts (AND, extra-network tags, CLIP with
clip skip and emphasis: the conditioning of a generation), tokenizer (CLIP's BPE).
"""

from .embeddings import Embedding, Embeddings, read_embedding
from .prompts import Conditioning, PromptEncoder, encode_conditioning
from .tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer", "Conditioning", "Embedding", "Embeddings", "PromptEncoder", "encode_conditioning",
           "read_embedding"]
