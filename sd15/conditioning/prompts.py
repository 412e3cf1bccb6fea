"""Prompts -> text states for the UNet's cross-attention: the conditioning stage's model work.

    cond = encode_conditioning(encoder, prompts, negatives, steps=25, clip_skip=1)
    cond.at(step)          # per image: [(AND weight, states [77·k, width]), ...] and the negative's states

What A1111 does with a prompt, in its order (docs/architecture.md, "Prompts"):
  1. extra-network tags `<name:args>` leave the positive prompt (they are returned for adapters to use);
  2. `AND` splits the positive prompt into parts, each with an optional trailing `:weight`;
  3. prompt editing gives each part (and the negative prompt) its texts step by step (`editing`);
  4. each text becomes 77-token chunks with weights and embeddings (`chunks`);
  5. CLIP runs on every chunk (clip skip, embedding vectors in place of their placeholders), the chunks'
     outputs are concatenated, and emphasis is applied: states times weights, then rescaled so the
     mean over the whole batch-chunk tensor is what it was (A1111's "Original" emphasis).
The texts of one prompt (its schedule's variants) go through CLIP together, padded to the same number of
chunks with empty chunks, and share the emphasis mean, as in A1111. Each distinct text is encoded once.

`emphasis="none"` is A1111's emphasis mode "None": brackets and BREAK are text, the rest still applies.
`syntax="plain"` also skips 1-3: the prompt is text as written (long prompts are still chunked, and
embeddings still found).
"""

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.text_encoder import TextEncoder
from .chunks import Chunk, Tokenized, empty_chunk, tokenize
from .editing import entry_at, prompt_schedule
from .embeddings import Embedding, Embeddings, EmbeddingTable
from .tokenizer import CLIPTokenizer

log = logging.getLogger("sd15")

SYNTAXES = ("a1111", "plain")
EMPHASES = ("original", "none")           # A1111's "Original" and "None" emphasis modes
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")                     # A1111's re_extra_net
AND = re.compile(r"\bAND\b")
WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")   # "text :0.7"


@dataclass(frozen=True)
class Tag:
    """An extra-network tag, e.g. <lora:add_detail:0.8> -> Tag("lora", ("add_detail", "0.8"))."""
    kind: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"<{self.kind}:{':'.join(self.args)}>"


def split_tags(prompt: str) -> tuple[str, list[Tag]]:
    """The prompt without its `<name:args>` tags (A1111 removes every one, known or not), and the tags."""
    tags = [Tag(m[1], tuple(m[2].split(":"))) for m in EXTRA_NETWORK.finditer(prompt)]
    return EXTRA_NETWORK.sub("", prompt), tags


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable diffusion: "a cat AND a dog :0.7" -> [("a cat", 1.0), (" a dog", 0.7)]."""
    parts = []
    for part in AND.split(prompt):
        m = WEIGHT.search(part)
        text, weight = (m[1], m[2]) if m else (part, None)
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


class PromptEncoder:
    """Texts -> states, with the tokenizer, the text encoder and the known embeddings of one pipeline
    (the embeddings as they are when the encoder is made: one generation sees one set)."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: TextEncoder,
                 embeddings: Embeddings | EmbeddingTable | None = None):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.embeddings = embeddings.table() if isinstance(embeddings, Embeddings) else embeddings

    def tokenize(self, text: str, emphasis: bool = True) -> Tokenized:
        return tokenize(text, self.tokenizer, self.embeddings, emphasis=emphasis)

    @torch.inference_mode()
    def encode_together(self, texts: Sequence[str], *, clip_skip: int = 1,
                        emphasis: bool = True) -> tuple[torch.Tensor, list[Embedding]]:
        """States [len(texts), 77·k, width] of texts encoded as one batch (A1111's unit: padded to the
        batch's chunk count, emphasis mean shared), and the embeddings they used."""
        tokenized = [self.tokenize(t, emphasis) for t in texts]
        count = max(len(t.chunks) for t in tokenized)
        used = {e.name: e for t in tokenized for e in t.embeddings}
        outputs = []
        for i in range(count):
            batch = [t.chunks[i] if i < len(t.chunks) else empty_chunk(self.tokenizer) for t in tokenized]
            outputs.append(self._encode_chunks(batch, clip_skip))
        return torch.cat(outputs, dim=1), list(used.values())

    def _encode_chunks(self, chunks: list[Chunk], clip_skip: int) -> torch.Tensor:
        te = self.text_encoder
        weight = next(te.parameters())
        ids = torch.tensor([c.tokens for c in chunks], device=weight.device)
        token_embeds = None
        if any(c.inserts for c in chunks):
            token_embeds = te.token_embedding(ids)
            for row, chunk in enumerate(chunks):
                for pos, embedding in chunk.inserts:
                    fit = min(len(embedding.vectors), ids.shape[1] - pos)     # up to the chunk's last position
                    vectors = embedding.vectors[:fit].to(token_embeds.device, token_embeds.dtype)
                    token_embeds[row, pos:pos + fit] = vectors
        z = te(ids, clip_skip=clip_skip, token_embeds=token_embeds)
        if all(w == 1.0 for c in chunks for w in c.weights):
            return z                                      # all weights 1: exactly the plain encoding
        # in float32 (A1111's weights are a float32 tensor, so its products are too), cast back once
        weights = torch.tensor([c.weights for c in chunks], device=z.device, dtype=torch.float32)
        wide = z.to(torch.promote_types(z.dtype, torch.float32))
        original = wide.mean()                            # one scalar over the whole batch-chunk tensor
        weighted = wide * weights[..., None]
        return (weighted * (original / weighted.mean())).to(z.dtype)


@dataclass(frozen=True, eq=False)
class TextSchedule:
    """One prompt's states step by step: [(last step, states [77·k, width]), ...] (see `editing`)."""
    entries: tuple[tuple[int, torch.Tensor], ...]

    def at(self, step: int) -> torch.Tensor:
        return entry_at(self.entries, step)

    @property
    def constant(self) -> bool:
        return len(self.entries) == 1


@dataclass(frozen=True, eq=False)
class Conditioning:
    """What the guided UNet needs at every step, for every image of a generation."""
    cond: tuple[tuple[tuple[float, TextSchedule], ...], ...]    # per image: its AND parts, (weight, schedule)
    uncond: tuple[TextSchedule, ...] | None                      # per image; None when guidance is off
    embeddings: tuple[Embedding, ...]                            # every embedding used (the infotext's TI hashes)
    tags: tuple[Tag, ...]                                        # extra-network tags taken out of the prompts

    @property
    def simple(self) -> bool:
        """One part of weight 1 per image and no schedule: plain tensors do (the batched fast path)."""
        return all(len(parts) == 1 and parts[0][0] == 1.0 and parts[0][1].constant for parts in self.cond) and (
            self.uncond is None or all(u.constant for u in self.uncond))

    def at(self, step: int) -> tuple[list[list[tuple[float, torch.Tensor]]], list[torch.Tensor] | None]:
        cond = [[(w, s.at(step)) for w, s in parts] for parts in self.cond]
        uncond = None if self.uncond is None else [u.at(step) for u in self.uncond]
        return cond, uncond


def encode_conditioning(encoder: PromptEncoder, prompts: Sequence[str], negatives: Sequence[str], *,
                        steps: int, clip_skip: int = 1, syntax: str = "a1111", emphasis: str = "original",
                        guidance_scale: float = 7.5) -> Conditioning:
    """The conditioning of one image per prompt. `steps` is the request's steps, which prompt editing
    counts in. With guidance scale 1 and one part of weight 1 per image the negatives are not needed
    (the conditional model alone), and not encoded."""
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}")
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis must be one of {', '.join(EMPHASES)}, got {emphasis!r}")
    weighted = syntax == "a1111" and emphasis == "original"
    cache: dict[str, tuple[TextSchedule, list[Embedding]]] = {}
    used: dict[str, Embedding] = {}

    def schedule_of(text: str) -> TextSchedule:
        if text not in cache:
            entries = prompt_schedule(text, steps) if syntax == "a1111" else [(steps, text)]
            states, embeddings = encoder.encode_together([t for _, t in entries], clip_skip=clip_skip,
                                                         emphasis=weighted)
            cache[text] = TextSchedule(tuple((last, states[i]) for i, (last, _) in enumerate(entries))), embeddings
        schedule, embeddings = cache[text]
        used.update((e.name, e) for e in embeddings)
        return schedule

    cond, tags = [], []
    for prompt in prompts:
        if syntax == "a1111":
            prompt, found = split_tags(prompt)
            tags += found
            parts = split_and(prompt)
        else:
            parts = [(prompt, 1.0)]
        cond.append(tuple((weight, schedule_of(text)) for text, weight in parts))
    single = all(len(parts) == 1 and parts[0][0] == 1.0 for parts in cond)
    if guidance_scale == 1 and single:      # not needed; its embeddings still count as used, as in A1111
        uncond = None
        for n in negatives:
            used.update((e.name, e) for e in encoder.tokenize(n, weighted).embeddings)
    else:
        uncond = tuple(schedule_of(n) for n in negatives)
    return Conditioning(tuple(cond), uncond, tuple(used.values()), tuple(dict.fromkeys(tags)))
