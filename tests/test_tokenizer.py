"""Our CLIP tokenizer against golden ids from transformers 4.x's Python CLIPTokenizer + ftfy.

The fixture is made by tools/make_tokenizer_golden.py (see its docstring to regenerate it).
"""

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from sd15.conditioning.tokenizer import CLIPTokenizer
from sd15.conditioning.tokenizer.clip_tokenizer import MERGES_FILE, NUM_MERGES

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_golden.json").read_text(encoding="utf-8"))
CASES = GOLDEN["cases"]
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def padded(golden_ids):
    """What __call__ must give for a golden (BOS, ids, EOS) list: cut to 75 ids, pad with EOS to 77."""
    ids = [BOS, *golden_ids[1:-1][:75], EOS]
    return ids + [EOS] * (77 - len(ids))


def test_bundled_merges_file_and_licence():
    assert MERGES_FILE.exists() and MERGES_FILE.with_name("LICENSE-bpe-vocab.txt").exists()
    assert hashlib.sha256(MERGES_FILE.read_bytes()).hexdigest() == GOLDEN["merges_sha256"]


def test_vocabulary_is_the_reference_one(tok):
    assert len(tok.tokens) == len(tok.vocab) == 49408
    # The fixture records the vocab the reference tokenizer was given (derived the way the hub's
    # vocab.json is laid out); ids known from the hub's vocab.json pin the layout independently.
    assert hashlib.sha256("\n".join(tok.tokens).encode()).hexdigest() == GOLDEN["vocab_sha256"]
    known = {"!": 0, "!</w>": 256, "a</w>": 320, ",</w>": 267, "of</w>": 539, "photo</w>": 1125, "cat</w>": 2368,
             "<|startoftext|>": 49406, "<|endoftext|>": 49407}
    assert {t: tok.vocab[t] for t in known} == known
    with gzip.open(MERGES_FILE, "rt", encoding="utf-8") as f:
        last_merge = f.read().split("\n")[NUM_MERGES]
    assert tok.tokens[49405] == last_merge.replace(" ", "")


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.max_length) == (49406, 49407, 77)
    assert tok.encode("<|startoftext|><|endoftext|>") == [49406, 49407]


def test_encode_matches_golden(tok):
    assert len(CASES) > 300
    wrong = {p: ids for p, ids in CASES.items() if [BOS, *tok.encode(p), EOS] != ids}
    assert not wrong, f"{len(wrong)} prompts differ from transformers 4.x, e.g. {list(wrong)[:5]}"


def test_call_matches_golden_padded_and_truncated(tok):
    prompts = list(CASES)
    got = tok(prompts)
    assert got.shape == (len(prompts), 77) and got.dtype == torch.long
    assert any(len(ids) > 77 for ids in CASES.values())  # the fixture does exercise truncation
    assert got.tolist() == [padded(CASES[p]) for p in prompts]


def test_batch_shapes(tok):
    one = tok("a cat")
    assert one.shape == (1, 77) and one.dtype == torch.long
    assert one[0, :4].tolist() == [BOS, 320, 2368, EOS] and (one[0, 3:] == EOS).all()
    assert tok(["a cat", "a dog"]).shape == (2, 77)
    assert tok([]).shape == (0, 77)
    assert tok(("a cat",)).equal(one)


def test_truncation_reports_what_was_cut(tok):
    assert tok.truncation("a cat") == ""
    assert tok.truncation("cat " * 75) == ""
    assert tok.truncation("cat " * 75 + "on a mat, at night") == "on a mat, at night"
    # A word the cut splits in two: only its dropped pieces are reported.
    word = "antidisestablishmentarianism"
    pieces = tok.encode(word)
    assert len(pieces) > 2
    assert tok.truncation("cat " * 74 + word + " forever") == tok.decode(pieces[1:]) + " forever"


def test_truncation_agrees_with_the_ids_it_drops(tok):
    for prompt, ids in CASES.items():
        cut = tok.truncation(prompt)
        assert bool(cut) == (len(ids) > 77), prompt
        if cut and prompt.isascii():
            assert tok.decode(ids[76:-1]).replace(" ", "") == cut.replace(" ", ""), prompt


def test_decode(tok):
    assert tok.decode(tok.encode("A Photo of a CAT, 8k!")) == "a photo of a cat , 8 k !"
    assert tok.decode(tok.encode("café 日本 🙂")) == "café 日本 🙂"
    assert tok.decode(tok("a cat")[0]) == "a cat"
    assert tok.decode([BOS, 320, EOS], skip_special_tokens=False) == "<|startoftext|> a <|endoftext|>"


def test_word_cache_is_used(tok):
    tok.encode("a reused word")
    before = tok._word_ids.cache_info().hits
    tok.encode("a reused word")
    assert tok._word_ids.cache_info().hits >= before + 3


def test_user_errors(tmp_path):
    with pytest.raises(TypeError, match="prompt must be a str"):
        CLIPTokenizer().encode(None)
    with pytest.raises(ValueError, match="cannot read"):
        CLIPTokenizer(tmp_path / "missing.txt.gz")
    short = tmp_path / "merges.txt"
    short.write_text("#version: 0.2\ni n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a CLIP merges file"):
        CLIPTokenizer(short)


def test_transformers5_agrees_where_it_should(tok):
    """transformers 5's tokenizer (Rust, no ftfy) is a second, independent BPE. It differs on HTML
    entities, odd unicode and upper-case special tokens, so compare on printable-ASCII prompts only."""
    transformers = pytest.importorskip("transformers")
    if not transformers.__version__.startswith("5."):
        pytest.skip("needs transformers 5")
    with gzip.open(MERGES_FILE, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : NUM_MERGES + 1]]
    theirs = transformers.CLIPTokenizer(vocab=dict(tok.vocab), merges=merges)
    safe = [p for p in CASES if p.isascii() and p.isprintable() and not any(s in p for s in ("&", "<|", "|>"))]
    assert len(safe) > 150
    wrong = [p for p in safe if theirs(p)["input_ids"] != CASES[p]]
    assert not wrong, wrong[:5]


def test_ftfy_leaves_printable_ascii_without_ampersands_alone():
    """The fast path of `clean` skips ftfy for such text: it must be exactly what ftfy would give."""
    import random
    import string

    import ftfy
    rng = random.Random(0)
    chars = [c for c in string.printable if c.isprintable() and c != "&"]
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 40))) for _ in range(20000)]
    texts += ["(masterpiece:1.2), a cat", "a \\\\(b\\\\)", "x < y > z", "it's", '"quoted"', "--", "..."]
    assert [t for t in texts if ftfy.fix_text(t) != t] == []
