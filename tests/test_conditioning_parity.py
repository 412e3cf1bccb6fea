"""Parity of A1111's prompt language (emphasis, long prompts, BREAK, clip skip, prompt editing,
textual-inversion embeddings) against references written here, independently of `sd15.conditioning`.

The reference (section 1 below) is A1111's algorithm as its code documents it
(`modules/prompt_parser.py: parse_prompt_attention`, `modules/sd_hijack_clip.py: tokenize_line /
process_tokens`, `modules/sd_emphasis.py: EmphasisOriginal`), written here from those rules:
  - emphasis: the weighted pieces, from the parser held to A1111's doctests (here and in
    test_prompt_syntax.py);
  - chunks: each weighted segment tokenised on its own (our tokenizer's `encode`, which test_tokenizer
    holds to transformers 4.x golden ids), 75-token chunks as BOS + tokens + EOS padding, comma
    backtrack 20, BREAK, an embedding's n vectors moving whole to the next chunk;
  - CLIP: transformers' `CLIPTextModel` on each 77-token chunk, `final_layer_norm(hidden_states[-k])`
    for clip skip k > 1 (`last_hidden_state` for 1), then per chunk index over the batch
    z·w · (mean(z) / mean(z·w)), one scalar mean over the whole [B, 77, C] tensor; chunks concatenated;
    the texts of a batch padded to its chunk count with the encoding of "" (BOS, EOS x 76).
Embeddings on the reference side are diffusers' `load_textual_inversion` rows in the transformers
text encoder's token-embedding matrix (the chunker puts their added token ids where sd15 puts its
placeholders), so sd15's insertion of vectors is checked against diffusers' own mechanism.

End to end (section 3), sd15's txt2img (a tiny checkpoint file; one case at full SD1.5 size) is
compared with diffusers' StableDiffusionPipeline fed `prompt_embeds` / `negative_prompt_embeds` from the
reference, with the schedulers, seeds and metrics of tests/test_pipeline_parity.py.

Measured on the test CPU (torch 2.13, transformers 5.24, diffusers 0.42.1, ~40 s for the file);
`pytest -s` prints each case's figures:
  - text states, full SD1.5 text encoder (random weights), rel err (max|ours-ref|/max|ref|) 1.1e-6 to
    1.7e-6 (weighted, nested, escapes, 3 chunks, BREAK, clip skip 2, "", a batch of 3- and 1-chunk texts);
    tiny: 0 (bit-identical);
  - embeddings (tiny), every format and in weighted / long / BREAK prompts: 0 (bit-identical);
  - txt2img (tiny, 64x64): latents <= 3.2e-6, decoded <= 3.1e-6, pixels max diff <= 1 (>= 99.98 %
    identical); full size, 2 steps: latents 1.0e-6, decoded 3.3e-6.
Bounds: text states 1e-4 (the brief's parity bound); txt2img latents and decoded 1e-5 (as
test_pipeline_parity), 1e-4 where the negative is repeated whole (see `test_txt2img_long_prompt_short_negative`).
Not covered here: diffusers' own `clip_skip` (broken with transformers >= 5.6: that sub-case skips).
"""

import copy
import gc
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer as ReferenceTokenizer

import sd15
from reference import (FULL, POSITION_IDS, TINY, component, engine_models, pixel_stats, reference_models,
                       reference_scheduler, reference_text_encoder, rel_err)
from tools.reference import fill
from sd15.conditioning import Embedding, Embeddings, read_embedding
from sd15.conditioning.chunks import tokenize
from sd15.conditioning.emphasis import parse_emphasis
from sd15.conditioning.prompts import PromptEncoder
from sd15.conditioning.tokenizer import CLIPTokenizer
from sd15.files.remap import remap
from sd15.models.demo import PREFIX, random_tensor
from sd15.models.keymap import text_key_map
from sd15.models.latents import LATENT_SCALE
from sd15.models.text_encoder import TextEncoder
from tools.make_checkpoint import random_full_state_dict, read_key_table

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

STATE_TOL = 1e-4            # text states: the brief's bound (measured <= 1.7e-6)
LATENT_TOL = 1e-5           # txt2img latents and decoded images: test_pipeline_parity's bound
REPEAT_TOL = 1e-4           # the same, where diffusers sees the negative repeated whole (rounding only)
PIXEL_MAX_DIFF, PIXEL_IDENTICAL, PIXEL_PSNR = 1, 0.995, 60.0

WIDTH = TINY.text_encoder.width          # 32: the tiny text encoder's (embeddings are made this wide)
ENCODE = CLIPTokenizer().encode          # proven against transformers 4.x golden ids (test_tokenizer)


# =====================================================================================================
# 1. The reference: A1111's prompt -> chunks -> CLIP -> emphasis, written from A1111's documented rules
# =====================================================================================================

BOS, EOS, COMMA = 49406, 49407, 267     # <|startoftext|>, <|endoftext|> (SD1 pads with it), ",</w>"
CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20                    # A1111's comma_padding_backtrack default

# The weighted pieces come from the engine's `parse_emphasis`, which both this file and
# test_prompt_syntax.py hold to A1111's doctests; everything after the parse is the reference's own.
def parse_prompt_attention(text):
    return [list(piece) for piece in parse_emphasis(text)]


# A1111's doctests of parse_prompt_attention (prompt_parser.py) and its documented nesting rules.
EMPHASIS_DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    ("((a))", [["a", 1.21]]),
    ("[[a]]", [["a", 1 / 1.21]]),
    ("((a:1.5))", [["a", 1.65]]),
    ("(a : 1.3 )", [["a ", 1.3]]),
    ("", [["", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
]


def find_embedding(ids, pos, embeddings):
    """A1111's find_embedding_at_position: the longest name whose token ids start at ids[pos]."""
    for name_ids, vector_ids in sorted((embeddings or {}).items(), key=lambda e: -len(e[0])):
        if tuple(ids[pos:pos + len(name_ids)]) == name_ids:
            return len(name_ids), vector_ids
    return None


def a1111_chunks(text, embeddings=None, backtrack=COMMA_BACKTRACK):
    """A1111's tokenize_line: [(77 token ids, 77 multipliers), ...].

    `embeddings`: {token ids of a trigger word: the ids standing for its n vectors} (here, the ids
    diffusers' load_textual_inversion added to the reference tokenizer and text encoder). As in A1111,
    an embedding is a placeholder run (id 0) plus a fix (content offset, vector ids) on its chunk, applied
    when the chunk is encoded; the comma backtrack moves tokens, not fixes."""
    parsed = parse_prompt_attention(text)
    tokenized = [ENCODE(segment) for segment, _ in parsed]        # per segment, no BOS/EOS, not truncated
    chunks, tokens, mults, fixes, last_comma = [], [], [], [], -1

    def next_chunk():
        nonlocal tokens, mults, fixes, last_comma
        pad = CHUNK_LENGTH - len(tokens)
        ids = [BOS] + tokens + [EOS] * pad + [EOS]
        for offset, vector_ids in fixes:                 # EmbeddingsWithFixes: after BOS, up to position 76
            fit = min(77 - offset - 1, len(vector_ids))
            ids[offset + 1:offset + 1 + fit] = vector_ids[:fit]
        chunks.append((ids, [1.0] + mults + [1.0] * pad + [1.0]))
        tokens, mults, fixes, last_comma = [], [], [], -1

    for ids, (segment, weight) in zip(tokenized, parsed):
        if segment == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == COMMA:
                last_comma = len(tokens)
            elif (backtrack != 0 and len(tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(tokens) - last_comma <= backtrack):
                cut = last_comma + 1
                moved_tokens, moved_mults = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                next_chunk()
                tokens, mults = moved_tokens, moved_mults
            if len(tokens) == CHUNK_LENGTH:
                next_chunk()
            found = find_embedding(ids, position, embeddings)
            if found is None:
                tokens.append(token)
                mults.append(weight)
                position += 1
                continue
            name_length, vector_ids = found
            if len(tokens) + len(vector_ids) > CHUNK_LENGTH:
                next_chunk()
            fixes.append((len(tokens), list(vector_ids)))
            tokens += [0] * len(vector_ids)
            mults += [weight] * len(vector_ids)
            position += name_length
    if tokens or not chunks:
        next_chunk()
    return chunks


EMPTY_CHUNK = ([BOS] + [EOS] * 76, [1.0] * 77)          # A1111's empty_chunk(): the encoding of ""


def final_layer_norm(te):
    return (te.text_model if hasattr(te, "text_model") else te).final_layer_norm


@torch.inference_mode()
def reference_states(te, texts, clip_skip=1, embeddings=None, chunked=None):
    """[len(texts), 77·k, C] as A1111 encodes a batch of texts (process_tokens, once per chunk index)."""
    chunked = chunked or [a1111_chunks(t, embeddings) for t in texts]
    count = max(len(c) for c in chunked)
    zs = []
    for i in range(count):
        batch = [c[i] if i < len(c) else EMPTY_CHUNK for c in chunked]
        ids = torch.tensor([tokens for tokens, _ in batch])
        out = te(input_ids=ids, output_hidden_states=True)
        z = out.last_hidden_state if clip_skip == 1 else final_layer_norm(te)(out.hidden_states[-clip_skip])
        multipliers = torch.tensor([m for _, m in batch])
        original_mean = z.mean()                                           # EmphasisOriginal
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        new_mean = z.mean()
        zs.append(z * (original_mean / new_mean))
    return torch.cat(zs, dim=1)                                            # torch.hstack(zs)


def test_the_parser_the_reference_uses_holds_a1111s_doctests():
    for prompt, expected in EMPHASIS_DOCTESTS:
        for got in (parse_prompt_attention(prompt),):
            assert [t for t, _ in got] == [t for t, _ in expected], prompt
            assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12), prompt


# ---- prompts -----------------------------------------------------------------------------------------

WORDS = ("red car house tree river mountain sky cloud light dark night morning city street window door "
         "garden flower stone bridge forest lake ocean wave sand desert snow winter summer autumn spring "
         "painting portrait detailed sharp soft warm cold golden silver blue green yellow purple old new").split()


def plain_words(n_tokens, seed, commas=True):
    """Plain single-token words, `n_tokens` tokens in all; with commas after phrases of 1-6 words, so a
    chunk boundary usually falls within 20 tokens of a comma (A1111's backtrack moves the phrase)."""
    rng = random.Random(seed)
    out, count = [], 0
    while count < n_tokens:
        phrase = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
        phrase = phrase[:n_tokens - count]
        count += len(phrase)
        out.append(" ".join(phrase))
        if commas and count < n_tokens:
            count += 1
    return (", " if commas else " ").join(out)


LONG = plain_words(180, seed=8)                                   # 3 chunks: 72 + 73 + 35, two backtracks
LONG_WEIGHTED = ("(masterpiece:1.2), [blurry], " + plain_words(120, seed=2) + ", ((glowing lights)), "
                 + plain_words(40, seed=3) + " (deep shadows:0.7)")
NO_COMMAS = plain_words(160, seed=4, commas=False)                 # hard splits at 75 and 150

CASES = {   # name -> (texts encoded together, clip skip)
    "weighted": (["a (red:1.3) car, [blurry]"], 1),
    "nested": (["((a)) house, [[on]] a (((hill))) (sky:0.5)"], 1),
    "escapes-unbalanced": (["\\(literal\\) a (b:1.2) (unbalanced [open"], 1),
    "long-3-chunks": ([LONG], 1),
    "long-weighted": ([LONG_WEIGHTED], 1),
    "long-no-commas": ([NO_COMMAS], 1),
    "break": (["a red car BREAK (a blue sky:1.2) BREAK BREAK last"], 1),
    "break-first": (["BREAK a cat"], 1),
    "clip-skip-2": (["a (red:1.3) car, [blurry]"], 2),
    "clip-skip-2-long": ([LONG_WEIGHTED], 2),
    "empty": ([""], 1),
    "batch-3-and-1-chunks": ([LONG_WEIGHTED, "a (small:0.8) cat"], 1),
}
FULL_SIZE_CASES = list(CASES)       # all of them run at full size (cheap enough: ~25 CLIP passes per side)


def test_reference_chunker_sanity():
    """The prompts exercise what they are meant to: 3 chunks, a comma backtrack, hard splits, BREAK."""
    long = a1111_chunks(LONG)
    assert len(long) == 3
    for ids, _ in long[:2]:                                            # both backtracked to a comma
        content = ids[1:ids.index(EOS)]
        assert len(content) < CHUNK_LENGTH and content[-1] == COMMA
    assert [len(c) for c in (a1111_chunks(NO_COMMAS), a1111_chunks(LONG_WEIGHTED))] == [3, 3]
    assert all(EOS not in c[0][1:-1] for c in a1111_chunks(NO_COMMAS)[:2])   # full chunks: hard splits
    assert len(a1111_chunks("a red car BREAK (a blue sky:1.2) BREAK BREAK last")) == 4
    assert a1111_chunks("BREAK a cat")[0] == EMPTY_CHUNK
    assert a1111_chunks("") == [EMPTY_CHUNK]


def engine_chunks_match(encoder, texts):
    """The engine's chunks (ids and weights) are the reference's: a readable failure before the tensors."""
    for text in texts:
        ours = [(c.tokens, c.weights) for c in encoder.tokenize(text).chunks]
        ref = a1111_chunks(text)
        assert [t for t, _ in ours] == [t for t, _ in ref], f"chunk ids differ for {text!r}"
        for (_, a), (_, b) in zip(ours, ref):
            assert a == pytest.approx(b, rel=1e-12), f"weights differ for {text!r}"


FUZZ_PIECES = ["a", "red", "car", ",", " ", "(", ")", "[", "]", ":1.3)", ":0.5)", ":", "\\(", "\\)", "\\\\", "\\",
               " BREAK ", "BREAK", "house,", ", ", "((", "))", "(x:1.2)", "[y]", "dog cat", "1.5", "é", "!!",
               " qzvxembed ", "bigemb", "redcar", "(bigemb:1.2)", "qzvxembed,"]
FUZZ_EMBEDDINGS = {"qzvxembed": 3, "bigemb": 12, "redcar": 2}     # "red car" is other ids: no match


def test_chunks_fuzz_match_reference():
    """1000 random prompts of brackets, weights, escapes, commas, BREAKs and embedding names (1-120
    pieces: 1-3 chunks): the engine's chunk ids, weights and embedding positions are the reference's."""
    tokenizer = CLIPTokenizer()
    library = Embeddings(tokenizer, WIDTH)
    sentinels = {}          # each embedding's vectors stand as negative ids on both sides
    for k, (name, n) in enumerate(FUZZ_EMBEDDINGS.items()):
        library.add(Embedding(name, torch.zeros(n, WIDTH), "0"))
        sentinels[name] = tuple(-(100 * k + j + 1) for j in range(n))
    reference_embeddings = {tuple(ENCODE(name)): ids for name, ids in sentinels.items()}
    rng = random.Random(0)
    for _ in range(1000):
        prompt = "".join(rng.choice(FUZZ_PIECES) + rng.choice(["", " "]) for _ in range(rng.choice([3, 10, 40, 120])))
        ref = a1111_chunks(prompt, reference_embeddings)
        ours = []
        for chunk in tokenize(prompt, tokenizer, library).chunks:
            ids = list(chunk.tokens)
            for pos, embedding in chunk.inserts:
                fit = min(len(embedding.vectors), 77 - pos)
                ids[pos:pos + fit] = sentinels[embedding.name][:fit]
            ours.append((ids, chunk.weights))
        assert [ids for ids, _ in ours] == [ids for ids, _ in ref], prompt
        for (_, a), (_, b) in zip(ours, ref):
            assert a == pytest.approx(b, rel=1e-12), prompt


def test_emphasis_alternatives_are_outside_the_tolerance(tiny_models):
    """The comparisons can tell A1111's normalisation from its look-alikes: no mean restore (A1111's
    "No norm"), and a mean per text instead of one over the batch (closer to lpw's per-item mean)."""
    te = tiny_models[1].text_encoder
    texts = CASES["batch-3-and-1-chunks"][0]
    ours = PromptEncoder(CLIPTokenizer(), te).encode_together(texts)[0]
    chunked = [a1111_chunks(t) for t in texts]
    with torch.inference_mode():
        no_norm = torch.cat([torch.cat([te(torch.tensor([ids])) * torch.tensor(m)[None, :, None]
                                        for ids, m in c + [EMPTY_CHUNK] * (3 - len(c))], dim=1) for c in chunked])
    per_text = torch.cat([reference_states(tiny_models[0].text_encoder, [t]) for t in texts[:1]] +
                         [reference_states(tiny_models[0].text_encoder, [texts[1]],
                                           chunked=[chunked[1] + [EMPTY_CHUNK] * 2])])
    assert rel_err(ours, no_norm) > 10 * STATE_TOL
    assert rel_err(ours, per_text) > 10 * STATE_TOL


# =====================================================================================================
# 2. Text states vs the reference
# =====================================================================================================

def engine_text_encoder(sd, cfg):
    """Our TextEncoder from an original-layout dict, as sd15.load builds it (meta, remap, assign)."""
    with torch.device("meta"):
        model = TextEncoder(cfg)
    source = component(sd, "text_encoder")
    source.pop(POSITION_IDS, None)
    state = remap(source, text_key_map(cfg), {k: v.shape for k, v in model.state_dict().items()},
                  component="text_encoder")
    return fill(model, state, "engine text encoder")


@pytest.fixture(scope="module")
def full_text_encoders():
    """(ours, transformers') full SD1.5 text encoders (123 M random parameters) on the same tensors: only
    the text encoder's 196 tensors of the real checkpoint's key table are made."""
    gen = torch.Generator().manual_seed(0)
    sd = {k: random_tensor(k, shape, gen) for k, shape in read_key_table().items()
          if k.startswith(PREFIX["text_encoder"])}
    return engine_text_encoder(sd, FULL.text_encoder), reference_text_encoder(sd, FULL.text_encoder)


@pytest.mark.parametrize("case", FULL_SIZE_CASES)
def test_full_size_states_match_reference(full_text_encoders, case):
    ours_te, ref_te = full_text_encoders
    texts, clip_skip = CASES[case]
    encoder = PromptEncoder(CLIPTokenizer(), ours_te)
    engine_chunks_match(encoder, texts)
    ours, used = encoder.encode_together(texts, clip_skip=clip_skip)
    ref = reference_states(ref_te, texts, clip_skip)
    assert used == []
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    print(f"full size {case}: {tuple(ref.shape)}, rel err {err:.1e}")
    assert err <= STATE_TOL


def test_full_size_clip_skip_changes_states(full_text_encoders):
    """Clip skip 2 is not a no-op (the comparison above would pass trivially if both ignored it)."""
    ours_te, _ = full_text_encoders
    encoder = PromptEncoder(CLIPTokenizer(), ours_te)
    one = encoder.encode_together(["a red car"], clip_skip=1)[0]
    two = encoder.encode_together(["a red car"], clip_skip=2)[0]
    assert rel_err(one, two) > 0.1


@pytest.mark.parametrize("case", ["weighted", "long-weighted", "break", "clip-skip-2", "batch-3-and-1-chunks"])
def test_tiny_states_match_reference(tiny_models, case):
    ref_te, ours_te = tiny_models[0].text_encoder, tiny_models[1].text_encoder
    texts, clip_skip = CASES[case]
    ours = PromptEncoder(CLIPTokenizer(), ours_te).encode_together(texts, clip_skip=clip_skip)[0]
    ref = reference_states(ref_te, texts, clip_skip)
    err = rel_err(ours, ref)
    print(f"tiny {case}: rel err {err:.1e}")
    assert err <= STATE_TOL


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("text", ["a photo of a cat", LONG, "a BREAK b", ""], ids=["short", "long", "break", "empty"])
def test_all_weights_one_is_the_plain_encoding(tiny_models, text, clip_skip):
    """No brackets: exactly (torch.equal) today's encoding, the text encoder on each chunk's ids."""
    te = tiny_models[1].text_encoder
    tokenizer = CLIPTokenizer()
    chunks = a1111_chunks(text)
    assert all(w == 1.0 for _, m in chunks for w in m)
    with torch.inference_mode():
        plain = torch.cat([te(torch.tensor([ids]), clip_skip=clip_skip) for ids, _ in chunks], dim=1)
    ours = PromptEncoder(tokenizer, te).encode_together([text], clip_skip=clip_skip)[0]
    assert torch.equal(ours, plain)
    # and the pipeline-level helper, when there is one chunk: the tokenizer's own 77 ids
    if len(chunks) == 1 and "BREAK" not in text:
        with torch.inference_mode():
            assert torch.equal(ours, te(tokenizer(text), clip_skip=clip_skip))


# =====================================================================================================
# 3. End to end: sd15's txt2img vs diffusers fed the reference's prompt embeddings
# =====================================================================================================

@pytest.fixture(scope="module")
def ours(tiny_ckpt_file):
    return sd15.load(tiny_ckpt_file, device="cpu")


def diffusers_pipe(models, sampler, tokenizer=None, text_encoder=None):
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=text_encoder or models.text_encoder,
                                   tokenizer=tokenizer, unet=models.unet, scheduler=reference_scheduler(sampler),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_ours(pipe, prompt, negative, sampler, seed, steps, **kwargs):
    latents = []
    request = sd15.Request(prompt, negative_prompt=negative, sampler=sampler, seed=seed, steps=steps,
                           guidance_scale=7.5, width=64, height=64, **kwargs)
    images = pipe.generate(request, progress=lambda i, n, x: latents.append(x.clone()))
    return images, latents


def run_diffusers(pipe, seed, steps, prompt_embeds=None, negative_prompt_embeds=None, switch=None, **kwargs):
    """diffusers' txt2img; `switch` = (step i, new [negative; positive] embeddings): after step i, the
    pipeline's (CFG-concatenated) prompt_embeds are replaced through callback_on_step_end."""
    latents = []

    def on_step_end(_pipe, i, _t, tensors):
        latents.append(tensors["latents"].clone())
        if switch is not None and i == switch[0]:
            assert tensors["prompt_embeds"].shape == switch[1].shape     # [negative; positive], diffusers' order
            return {"prompt_embeds": switch[1]}
        return {}

    out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, num_inference_steps=steps,
               guidance_scale=7.5, width=64, height=64, generator=torch.Generator().manual_seed(seed),
               callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
               output_type="pil", **kwargs)
    return out.images, latents


def check_images(name, pipe, ref_vae, ours_out, ref_out, tol=LATENT_TOL):
    (our_images, our_latents), (ref_images, ref_latents) = ours_out, ref_out
    assert len(our_latents) == len(ref_latents) > 0
    errors = [rel_err(a, b) for a, b in zip(our_latents, ref_latents)]
    assert max(errors) <= tol, f"latents differ: per step {[f'{e:.1e}' for e in errors]}"
    with torch.inference_mode():
        decoded = rel_err(pipe.decode(our_latents[-1]), ref_vae.decode(ref_latents[-1] / LATENT_SCALE).sample)
    assert decoded <= tol
    identical, max_diff, psnr = pixel_stats(our_images, ref_images)
    assert max_diff <= PIXEL_MAX_DIFF and identical >= PIXEL_IDENTICAL and psnr >= PIXEL_PSNR, \
        f"identical {identical:.5f}, max diff {max_diff}, PSNR {psnr:.1f} dB"
    assert float(np.asarray(our_images[0]).std()) > 5
    print(f"{name}: latents {max(errors):.1e}, decoded {decoded:.1e}, identical {identical:.5f}, "
          f"max diff {max_diff}, PSNR {psnr:.1f} dB")
    return errors


def test_full_size_txt2img_weighted_two_chunks():
    """Full SD1.5 size (1.07 B random parameters, fp32), 64x64, DPM++ 2M Karras, 2 steps: a weighted
    2-chunk prompt (BREAK) against a weighted 1-chunk negative, repeated whole for diffusers (see
    test_txt2img_long_prompt_short_negative). Both sides share one in-memory state dict, as in
    test_pipeline_parity's full-size case. Runs before the one_thread tests (file order)."""
    sd = random_full_state_dict(seed=0)
    ref, engine = reference_models(sd, FULL), engine_models(sd, FULL)
    del sd
    pipe = sd15.Pipeline(tokenizer=CLIPTokenizer(), text_encoder=engine.text_encoder, unet=engine.unet,
                         vae=engine.vae, device=torch.device("cpu"), dtype=torch.float32)
    prompt, negative = "(masterpiece:1.2), a lighthouse at dusk BREAK [blurry] oil ((painting))", \
        "blurry, (low quality:1.3)"
    try:
        cond = reference_states(ref.text_encoder, [prompt])
        uncond = reference_states(ref.text_encoder, [negative])
        assert (cond.shape[1], uncond.shape[1]) == (154, 77)
        check_images("full size 2 chunks", pipe, ref.vae, run_ours(pipe, prompt, negative, "dpmpp_2m_karras", 42, 2),
                     run_diffusers(diffusers_pipe(ref, "dpmpp_2m_karras"), 42, 2, cond, uncond.repeat(1, 2, 1)),
                     tol=REPEAT_TOL)
    finally:
        del pipe, ref, engine
        gc.collect()


E2E = {     # name -> (prompt, negative prompt, sampler, clip skip)
    "weighted": ("a (red:1.3) car, [blurry], ((sharp))", "(low quality:1.2), watermark", "dpmpp_2m_karras", 1),
    "break": ("a red car BREAK (a blue sky:1.2)", "a cat BREAK a dog", "euler_a", 1),
    "clip-skip-2": ("a (red:1.3) car, [blurry]", "blurry", "ddim", 2),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(E2E))
def test_txt2img_matches_diffusers(ours, tiny_models, case):
    prompt, negative, sampler, clip_skip = E2E[case]
    ref = tiny_models[0]
    cond = reference_states(ref.text_encoder, [prompt], clip_skip)
    uncond = reference_states(ref.text_encoder, [negative], clip_skip)
    assert cond.shape == uncond.shape
    check_images(case, ours, ref.vae, run_ours(ours, prompt, negative, sampler, 7, 6, clip_skip=clip_skip),
                 run_diffusers(diffusers_pipe(ref, sampler), 7, 6, cond, uncond))


@pytest.mark.usefixtures("one_thread")
def test_txt2img_long_prompt_short_negative(ours, tiny_models):
    """A 3-chunk prompt (231 tokens) against a 1-chunk negative (77).

    sd15, like A1111 by default, runs the UNet twice per step (cond and uncond separately: their lengths
    differ). diffusers needs equal shapes, so it gets the negative repeated whole three times: in exact
    arithmetic cross-attention over keys/values duplicated k times is the same attention (each softmax
    weight is divided by k, each value counted k times), so this is A1111's result up to float rounding
    (A1111's CFGDenoiser with pad_cond_uncond off). Padding the negative with "" chunks (A1111's pad_cond_uncond, diffusers'
    own encode_prompt) would be a different result. Tolerance: REPEAT_TOL, for that rounding."""
    ref = tiny_models[0]
    negative = "(low quality:1.2), blurry"
    cond = reference_states(ref.text_encoder, [LONG_WEIGHTED])
    uncond = reference_states(ref.text_encoder, [negative])
    assert (cond.shape[1], uncond.shape[1]) == (231, 77)
    repeated = uncond.repeat(1, cond.shape[1] // uncond.shape[1], 1)
    check_images("long vs short negative", ours, ref.vae,
                 run_ours(ours, LONG_WEIGHTED, negative, "euler", 3, 6),
                 run_diffusers(diffusers_pipe(ref, "euler"), 3, 6, cond, repeated), tol=REPEAT_TOL)


@pytest.mark.usefixtures("one_thread")
def test_clip_skip_2_matches_diffusers_own_encoding(ours, tiny_models, reference_tokenizer_files):
    """A1111 clip skip 2 is diffusers' clip_skip=1 (its own prompt encoding: tokenizer + text encoder).

    With transformers >= 5.6 (flattened CLIPTextModel, no `.text_model`) diffusers 0.42.1's encode_prompt
    raises AttributeError for any clip_skip: then only this sub-case is skipped (the clip-skip-2 case of
    test_txt2img_matches_diffusers covers clip skip against the reference's own hidden_states[-2])."""
    ref = tiny_models[0]
    pipe = diffusers_pipe(ref, "ddim", tokenizer=ReferenceTokenizer(*reference_tokenizer_files, model_max_length=77))
    try:
        ref_out = run_diffusers(pipe, 5, 4, prompt="a red car", negative_prompt="blurry", clip_skip=1)
    except AttributeError as e:
        if "text_model" not in str(e):
            raise
        pytest.skip(f"diffusers' encode_prompt(clip_skip=...) is broken with this transformers: {e}")
    check_images("diffusers clip_skip=1", ours, ref.vae, run_ours(ours, "a red car", "blurry", "ddim", 5, 4,
                                                                  clip_skip=2), ref_out)


EDITING = {   # name -> (prompt, the text of steps 0..3, the text from step 4)
    "plain": ("a [cat:dog:3] in a field", "a cat in a field", "a dog in a field"),
    # weighted: the two variants are encoded together and share the emphasis mean (A1111 encodes a prompt's schedule variants in one call)
    "weighted": ("a [(cat:1.3):dog:3] in a (field:0.8)", "a (cat:1.3) in a (field:0.8)", "a dog in a (field:0.8)"),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(EDITING))
def test_prompt_editing_matches_diffusers_switching_embeds(ours, tiny_models, case):
    """`[cat:dog:3]` over 10 steps: A1111's 0-based `step <= 3` rule, so 'cat' for steps 0..3 and 'dog'
    from step 4 on. diffusers' callback_on_step_end after step 3 swaps in the 'dog' embeddings (the
    pipeline holds [negative; positive] concatenated for CFG, so that is what is returned)."""
    prompt, before, after = EDITING[case]
    ref = tiny_models[0]
    states = reference_states(ref.text_encoder, [before, after])      # one prompt's variants: one batch
    uncond = reference_states(ref.text_encoder, ["blurry"])
    cat, dog = states[:1], states[1:]
    pipe = diffusers_pipe(ref, "dpmpp_2m_uniform")
    ours_out = run_ours(ours, prompt, "blurry", "dpmpp_2m_uniform", 11, 10)
    check_images(f"editing {case}", ours, ref.vae, ours_out,
                 run_diffusers(pipe, 11, 10, cat, uncond, switch=(3, torch.cat([uncond, dog]))))
    # the test can tell the switching step: one step early (a `<` rule) is far outside the tolerance
    _, early = run_diffusers(pipe, 11, 10, cat, uncond, switch=(2, torch.cat([uncond, dog])))
    assert rel_err(ours_out[1][-1], early[-1]) > 100 * LATENT_TOL


# =====================================================================================================
# 4. Textual-inversion embeddings vs diffusers' load_textual_inversion
# =====================================================================================================

def write_embedding(folder, fmt, stem, n, seed):
    """An embedding file of `fmt` at folder/<stem>.<ext>; returns (path, the [n, WIDTH] vectors)."""
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn((n, WIDTH), generator=gen) * 0.02 * math.sqrt(WIDTH)
    if fmt == "a1111-pt":
        path = folder / f"{stem}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone()},
                    "name": "a-different-name", "step": 1500, "sd_checkpoint": "abcdef12",
                    "sd_checkpoint_name": "some-model"}, path)
    elif fmt == "kohya-safetensors":
        path = folder / f"{stem}.safetensors"
        save_file({"emb_params": vectors.clone()}, str(path))
    elif fmt == "diffusers-bin":
        assert n == 1
        path = folder / f"{stem}.bin"
        torch.save({f"<{stem}>": vectors[0].clone()}, path)               # one vector, shape [C]
    elif fmt == "diffusers-safetensors":
        path = folder / f"{stem}.safetensors"
        save_file({f"<{stem}>": vectors.clone()}, str(path))
    elif fmt == "sdxl-pair":
        path = folder / f"{stem}.safetensors"
        clip_g = torch.randn((n, 1280), generator=gen)
        save_file({"clip_l": vectors.clone(), "clip_g": clip_g}, str(path))
    else:
        raise AssertionError(fmt)
    return path, vectors


def diffusers_state_dict(path):
    """What the file holds, read the way diffusers reads it (weights_only torch.load, or safetensors)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


FORMATS = [("a1111-pt", 1), ("a1111-pt", 3), ("kohya-safetensors", 1), ("kohya-safetensors", 3),
           ("diffusers-bin", 1), ("diffusers-safetensors", 3), ("sdxl-pair", 3)]


@pytest.fixture
def both_with_embedding(tiny_models, tiny_ckpt_file, reference_tokenizer_files, tmp_path):
    """make(fmt, n) -> (sd15 pipeline, diffusers pipeline, stem, vectors), each with the file loaded.

    Fresh copies of what loading changes: diffusers' tokenizer and text encoder (load_textual_inversion
    adds tokens and rows), sd15's embedding library (a new Pipeline over the shared tiny models)."""
    ref = tiny_models[0]

    def make(fmt, n, stem="qzvxembed"):
        path, vectors = write_embedding(tmp_path, fmt, stem, n, seed=n)
        tokenizer = ReferenceTokenizer(*reference_tokenizer_files, model_max_length=77)
        assert stem not in tokenizer.get_vocab()
        d_pipe = diffusers_pipe(ref, "ddim", tokenizer=tokenizer, text_encoder=copy.deepcopy(ref.text_encoder))
        state = diffusers_state_dict(path)
        if fmt == "sdxl-pair":        # diffusers cannot load the pair: the clip_l half on its own
            state = {stem: state["clip_l"]}
        d_pipe.load_textual_inversion(state, token=stem)
        ours = sd15.load(tiny_ckpt_file, device="cpu")
        embedding = ours.add_embedding(path)
        assert embedding.name == stem and torch.equal(embedding.vectors, vectors)
        return ours, d_pipe, stem, vectors

    return make


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("fmt,n", FORMATS, ids=[f"{f}-{n}vec" for f, n in FORMATS])
def test_embedding_matches_diffusers_encode_prompt(both_with_embedding, fmt, n):
    ours, d_pipe, stem, vectors = both_with_embedding(fmt, n)
    prompt = f"a photo of {stem}"
    # diffusers spells an n-vector token as "stem stem_1 ... stem_{n-1}", n added tokens in a row
    converted = d_pipe.maybe_convert_prompt(prompt, d_pipe.tokenizer)
    assert converted == " ".join(["a photo of", stem] + [f"{stem}_{i}" for i in range(1, n)])
    ids = d_pipe.tokenizer(converted).input_ids
    added = d_pipe.tokenizer.convert_tokens_to_ids([stem] + [f"{stem}_{i}" for i in range(1, n)])
    assert ids == [BOS, *ENCODE("a photo of"), *added, EOS]
    assert torch.equal(d_pipe.text_encoder.get_input_embeddings().weight[added], vectors)

    cond_ref, uncond_ref = d_pipe.encode_prompt(prompt, "cpu", 1, True, "")
    conditioning = ours.conditioning([prompt])
    cond, uncond = conditioning.at(0)
    assert [e.name for e in conditioning.embeddings] == [stem]
    err = rel_err(cond[0][0][1], cond_ref[0])
    print(f"embedding {fmt} x{n}: rel err {err:.1e}")
    assert err <= STATE_TOL
    assert rel_err(uncond[0], uncond_ref[0]) <= STATE_TOL
    # the embedding is used: the same prompt without it is far away
    without, _ = d_pipe.encode_prompt("a photo of", "cpu", 1, True, "")
    assert rel_err(cond[0][0][1], without[0]) > 0.01


EMBEDDING_PROMPTS = {
    "weighted": "a (photo:1.2) of ({stem}:1.3), [blurry]",
    # 73 plain tokens, then the 3 vectors: they do not fit in the first chunk and move to the next, whole
    "long-moves-whole": " ".join(["red"] * 73) + " ({stem}:0.9) " + plain_words(60, seed=5),
    "long-break": plain_words(100, seed=6) + " BREAK {stem}, ((sharp))",
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(EMBEDDING_PROMPTS))
def test_weighted_long_prompt_with_embedding(both_with_embedding, case):
    """Against the reference built from diffusers' text encoder after it loaded the embedding: the
    reference chunker puts the embedding's added token ids where the trigger word's tokens were."""
    ours, d_pipe, stem, _ = both_with_embedding("a1111-pt", 3)
    prompt = EMBEDDING_PROMPTS[case].format(stem=stem)
    added = tuple(d_pipe.tokenizer.convert_tokens_to_ids([stem, f"{stem}_1", f"{stem}_2"]))
    embeddings = {tuple(ENCODE(stem)): added}
    chunks = a1111_chunks(prompt, embeddings)
    if case == "long-moves-whole":
        assert len(chunks) == 2 and chunks[0][0][74] == EOS and chunks[1][0][1:4] == list(added)
    ref = reference_states(d_pipe.text_encoder, [prompt], embeddings=embeddings)
    cond, _ = ours.conditioning([prompt]).at(0)
    states = cond[0][0][1]
    assert states.shape == ref.shape[1:]
    err = rel_err(states, ref[0])
    print(f"embedding in {case}: {tuple(states.shape)}, rel err {err:.1e}")
    assert err <= STATE_TOL


# =====================================================================================================
# 5. Hostile and wrong embedding files: refused, with a message, nothing run
# =====================================================================================================

class RunsCommand:
    """Unpickling this runs a shell command (what a malicious embedding .pt does)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _pickle_in_torch_zip(folder, marker):
    path = folder / "evilembed.pt"
    torch.save({"string_to_param": {"*": RunsCommand(f"touch '{marker}'")}, "name": "evil", "step": 1}, path)
    return path


def _bare_pickle(folder, marker):
    path = folder / "evilbare.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": RunsCommand(f"touch '{marker}'")}}, protocol=2))
    return path


def _safetensors(name, tensors):
    def build(folder, marker):
        path = folder / f"{name}.safetensors"
        save_file(tensors, str(path))
        return path
    return build


def _torch_file(name, obj):
    def build(folder, marker):
        path = folder / f"{name}.pt"
        torch.save(obj, path)
        return path
    return build


HOSTILE = {   # id -> (build(folder, marker) -> path, words the message must contain)
    "os-system-in-torch-zip": (_pickle_in_torch_zip, ("refusing", "system")),
    "os-system-bare-pickle": (_bare_pickle, ("refusing", "pickle")),
    "sd2-width-1024": (_safetensors("sdtwo", {"emb_params": torch.zeros(2, 1024)}), ("SD 2", "1024")),
    "sdxl-width-1280": (_safetensors("sdxlone", {"emb_params": torch.zeros(2, 1280)}), ("SDXL", "1280")),
    "sdxl-width-1280-a1111": (_torch_file("sdxltwo", {"string_to_param": {"*": torch.zeros(1, 1280)}}), ("SDXL",)),
    "nan-vectors": (_safetensors("nanembed", {"emb_params": torch.tensor([[float("nan")] * WIDTH])}), ("NaN",)),
    "inf-vectors": (_torch_file("infembed", {"x": torch.full((2, WIDTH), float("inf"))}), ("infinite",)),
    "two-tensors": (_safetensors("twotensors", {"a": torch.zeros(2, WIDTH), "b": torch.zeros(2, WIDTH)}),
                    ("not a textual-inversion embedding", "a, b")),
    "empty-dict": (_torch_file("emptyembed", {}), ("not a textual-inversion embedding", "nothing")),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_embedding_refused(ours, tmp_path, case):
    build, words = HOSTILE[case]
    marker = tmp_path / "payload-ran"
    path = build(tmp_path, marker)
    pipe = sd15.Pipeline(tokenizer=ours.tokenizer, text_encoder=ours.text_encoder, unet=ours.unet, vae=ours.vae,
                         device=ours.device, dtype=ours.dtype)       # its own, empty, embedding library
    with pytest.raises(sd15.CheckpointError) as info:
        pipe.add_embedding(path)
    message = str(info.value)
    assert path.name in message
    assert all(w in message for w in words), message
    assert not marker.exists(), "the pickle's payload ran"
    assert len(pipe.embeddings) == 0
    # nothing ran for the full-size width either (SD 1.x's 768), and the refusal is the same
    with pytest.raises(sd15.CheckpointError):
        read_embedding(path, width=768)
    assert not marker.exists()
