"""Tokenizer speed: prompts per second on ~1000 typical SD prompts, cold (empty word cache) and warm.

Run from the repository root:  python -m tools.bench_tokenizer [--prompts 1000]
"""

import argparse
import random
import time

from sd15.conditioning.chunks import tokenize
from sd15.conditioning.editing import prompt_schedule
from sd15.conditioning.prompts import split_and, split_tags
from sd15.conditioning.tokenizer import CLIPTokenizer

SUBJECTS = ["a cat", "an old man", "a castle on a hill", "a dragon", "a girl with red hair", "a robot",
            "a lighthouse", "an enchanted forest", "a bowl of ramen", "a samurai", "a spaceship", "a cozy cabin",
            "a tiger", "an elf queen", "a rainy city street", "a portrait of a knight", "a mountain lake"]
DETAILS = ["highly detailed", "intricate", "sharp focus", "8k uhd", "dslr", "soft lighting", "golden hour",
           "volumetric fog", "bokeh", "octane render", "unreal engine 5", "trending on artstation", "hdr",
           "film grain", "cinematic lighting", "depth of field", "studio lighting", "ray tracing", "4k",
           "photorealistic", "oil painting", "watercolor", "concept art", "anime style", "(masterpiece:1.2)",
           "best quality", "by greg rutkowski", "by alphonse mucha", "by makoto shinkai", "by wlop", "elegant",
           "smooth", "illustration", "vibrant colors", "moody", "symmetrical", "wide angle", "macro", "35mm"]


def typical_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [", ".join([rng.choice(SUBJECTS), *rng.sample(DETAILS, rng.randint(3, 14))]) for _ in range(n)]


def rate(fn, prompts: list[str]) -> float:
    start = time.perf_counter()
    fn(prompts)
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    args = parser.parse_args()
    prompts = typical_prompts(args.prompts)

    start = time.perf_counter()
    tok = CLIPTokenizer()
    print(f"load merges + build vocab: {1000 * (time.perf_counter() - start):.0f} ms")

    def encode_all(ps):
        for p in ps:
            tok.encode(p)

    print(f"encode, cold: {rate(encode_all, prompts):8.0f} prompts/s")
    print(f"encode, warm: {rate(encode_all, prompts):8.0f} prompts/s")
    def prompt_language(ps):      # what the conditioning stage does before CLIP: tags, AND, editing, emphasis, chunks
        for p in ps:
            text, _tags = split_tags(p)
            for part, _weight in split_and(text):
                for _last, variant in prompt_schedule(part, 25):
                    tokenize(variant, tok)

    tok._word_ids.cache_clear()
    print(f"prompt language -> chunks, cold: {rate(prompt_language, prompts):8.0f} prompts/s")
    print(f"prompt language -> chunks, warm: {rate(prompt_language, prompts):8.0f} prompts/s")
    tok._word_ids.cache_clear()
    print(f"tok(batch) -> LongTensor [B,77], cold: {rate(tok, prompts):8.0f} prompts/s")
    print(f"tok(batch) -> LongTensor [B,77], warm: {rate(tok, prompts):8.0f} prompts/s")
    # The typical prompts share few words, so their cache warms within a few prompts; this is BPE alone
    # on words it has never seen (vocabulary entries, spelled out as text).
    words = [t.removesuffix("</w>") for t in tok.tokens[512:-2] if t.isalpha() and t.isascii()]
    words = random.Random(0).sample(words, 5000)
    tok._word_ids.cache_clear()
    start = time.perf_counter()
    for w in words:
        tok._word_ids(w)
    print(f"BPE of 5000 unseen words: {5000 / (time.perf_counter() - start):8.0f} words/s")
    mean = sum(len(tok.encode(p)) for p in prompts) / len(prompts)
    print(f"{len(prompts)} prompts, {mean:.1f} tokens each on average")


if __name__ == "__main__":
    main()
