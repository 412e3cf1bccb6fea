"""Prompts -> text states for the UNet's cross-attention: the conditioning stage's model work.

    states = encode_prompts(tokenizer, text_encoder, ["a cat", "a cat", "a dog"])   # [3, 77, 768]

Each distinct text is encoded once (a batch of 64 copies of one prompt is one CLIP pass, as diffusers
encodes a prompt once and repeats it per image). Plain text: CLIP reads BOS + 75 tokens + EOS; the rest
is cut, and the log says which words were dropped.

Below this module, what a prompt language with long prompts needs is in place: the text encoder takes
`clip_skip` and replacement token embeddings (one 77-token chunk per call; long prompts are chunks
concatenated along the sequence axis), and the guidance wrapper accepts prompt and negative states of
different lengths.
"""

import logging
from collections.abc import Sequence

import torch

from ..models.text_encoder import TextEncoder
from .tokenizer import CLIPTokenizer

log = logging.getLogger("sd15")


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: TextEncoder, prompts: Sequence[str]) -> torch.Tensor:
    """Text states [len(prompts), 77, width] on the text encoder's device; prompts past 75 tokens are cut."""
    unique = list(dict.fromkeys(prompts))          # first-occurrence order
    for prompt in unique:
        cut = tokenizer.truncation(prompt)
        if cut:
            log.warning("prompt is longer than CLIP's 75 tokens; this part was ignored: %r", cut)
    device = next(text_encoder.parameters()).device
    with torch.inference_mode():
        states = text_encoder(tokenizer(unique).to(device))
        if len(unique) == len(prompts):
            return states
        index = torch.tensor([unique.index(p) for p in prompts], device=device)
        return states.index_select(0, index)
