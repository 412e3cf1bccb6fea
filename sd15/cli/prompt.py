"""`python -m sd15.prompt "PROMPT"`: how sd15 (and A1111) reads a prompt, without loading any model.

    python -m sd15.prompt "masterpiece, (a red fox:1.3) [in snow:at dusk:10] BREAK easynegative" --steps 20

Prints the extra-network tags taken out, the AND parts and their weights, each part's texts step by step
(prompt editing), and for each text its weighted pieces and its 75-token chunks ("x/75" as A1111
counts them) with the embeddings found. Exits 2 with one `error:` line on a bad argument.
"""

import argparse
import sys

from ..conditioning.chunks import CHUNK, tokenize
from ..conditioning.editing import prompt_schedule
from ..conditioning.embeddings import Embeddings
from ..conditioning.emphasis import parse_emphasis
from ..conditioning.prompts import split_and, split_tags
from ..conditioning.tokenizer import CLIPTokenizer
from .generate import EMBEDDINGS_ENV, folders


def describe(prompt: str, steps: int, tokenizer: CLIPTokenizer, embeddings: Embeddings | None,
             plain: bool = False) -> list[str]:
    lines = []
    if not plain:
        prompt, tags = split_tags(prompt)
        if tags:
            lines.append("tags (removed): " + " ".join(map(str, tags)))
    parts = [(prompt, 1.0)] if plain else split_and(prompt)
    for number, (text, weight) in enumerate(parts, 1):
        if len(parts) > 1:
            lines.append(f"part {number} (AND weight {weight:g}): {text!r}")
        schedule = [(steps, text)] if plain else prompt_schedule(text, steps)
        for last, variant in schedule:
            indent = "  " if len(parts) > 1 else ""
            if len(schedule) > 1:
                lines.append(f"{indent}steps up to {last}: {variant!r}")
                indent += "  "
            if not plain:
                pieces = ", ".join(f"{t!r}" + ("" if w == 1 else f" x{w:.4g}") for t, w in parse_emphasis(variant))
                lines.append(f"{indent}pieces: {pieces}")
            tokenized = tokenize(variant, tokenizer, embeddings, emphasis=not plain)
            for i, chunk in enumerate(tokenized.chunks):
                used = sum(1 for t in chunk.tokens[1:-1] if t != tokenizer.eos_id)
                found = "".join(f", {e.name} ({len(e.vectors)} vectors at {p})" for p, e in chunk.inserts)
                lines.append(f"{indent}chunk {i}: {used}/{CHUNK} tokens{found}")
            lines.append(f"{indent}tokens: {tokenized.token_count}/{-(-max(tokenized.token_count, 1) // CHUNK) * CHUNK}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd15.prompt", description=__doc__.split("\n")[0])
    p.add_argument("prompt")
    p.add_argument("--steps", type=int, default=25, help="sampling steps, for prompt editing (default 25)")
    p.add_argument("--embeddings-dir", action="append", metavar="DIR",
                   help=f"textual-inversion embeddings to find in the prompt; default ${EMBEDDINGS_ENV}")
    p.add_argument("--plain-prompt", action="store_true", help="read the prompt literally (see sd15.generate)")
    args = p.parse_args(argv)
    if args.steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    tokenizer = CLIPTokenizer()
    embeddings = Embeddings(tokenizer)
    try:
        for folder in folders(args.embeddings_dir):
            embeddings.add_dir(folder)
        print("\n".join(describe(args.prompt, args.steps, tokenizer, embeddings, args.plain_prompt)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
