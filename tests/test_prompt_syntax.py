"""A1111's prompt language, piece by piece, against A1111's documented behaviour:

- emphasis (`parse_prompt_attention`): its doctests and the rules of its bracket stack;
- prompt editing and alternation: the step table of A1111's scheduler, and A1111's own grammar run
  through `lark` (the parser library A1111 uses) as an independent oracle on thousands of prompts;
- chunking (`tokenize_line`): 75-token chunks, the comma backtrack at its edges, BREAK, the empty
  prompt, embeddings that count as n tokens and move whole;
- AND and extra-network tags; guidance over AND parts and prompt-editing schedules.
The CLIP side (clip skip, emphasis' mean, chunks through the encoder) is test_conditioning_parity.py.
"""

import math
import random

import pytest
import torch

from sd15.conditioning.chunks import tokenize
from sd15.conditioning.editing import Stray, entry_at, parse, prompt_schedule
from sd15.conditioning.embeddings import Embedding, Embeddings
from sd15.conditioning.emphasis import parse_emphasis
from sd15.conditioning.prompts import split_and, split_tags
from sd15.conditioning.tokenizer import CLIPTokenizer
from sd15.sampling import ModelCall
from sd15.sampling.guidance import guided, guided_by_step, stack_padded

BOS, EOS, COMMA, CAT = 49406, 49407, 267, 2368


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


# ---- emphasis ------------------------------------------------------------------------------------

def approx(pieces):
    return [(t, pytest.approx(w)) for t, w in pieces]


@pytest.mark.parametrize("text,expected", [      # A1111's doctests, weights as it prints them
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("((a:1.5))", [("a", 1.65)]),
    ("(a : 1.3 )", [("a ", 1.3)]),
    ("(a:-1)", [("a", -1.0)]),
    ("a:1.3) b] c)", [("a:1.3) b] c)", 1.0)]),          # closers without openers are text
    ("", [("", 1.0)]),
])
def test_emphasis_doctests(text, expected):
    assert parse_emphasis(text) == approx(expected)


def test_break():
    assert parse_emphasis("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_emphasis("BREAK a") == [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]
    assert parse_emphasis("a break b") == [("a break b", 1.0)]                  # upper case only
    assert parse_emphasis("aBREAKb") == [("aBREAKb", 1.0)]                      # a word of its own
    # Inside brackets the marker's weight is multiplied: it is then the word, not a break.
    assert parse_emphasis("(a BREAK b)") == approx([("a", 1.1), ("BREAK", -1.1), ("b", 1.1)])


def test_a_weight_that_is_no_number_is_a_clear_error():
    with pytest.raises(ValueError, match="emphasis weight '1.2.3' is not a number"):
        parse_emphasis("(a:1.2.3)")


# ---- prompt editing --------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,steps,per_step", [        # A1111's scheduler, run (the reference's table)
    ("a [b:c:3] d", 10, ["a b d"] * 4 + ["a c d"] * 6),
    ("[a:b:0.5]", 20, ["a"] * 11 + ["b"] * 9),
    ("[a:b:1]", 10, ["a", "a"] + ["b"] * 8),
    ("[a:b:1.0]", 10, ["a"] * 10),                           # 1.0 is 100 %: never switches in one pass
    ("[a:b:0]", 10, ["b"] * 10),
    ("[a:b:2.5]", 10, ["a"] * 10),
    ("[a:b:15]", 10, ["a"] * 10),
    ("[a::3]", 10, ["a"] * 4 + [""] * 6),
    ("[a:3]", 10, [""] * 4 + ["a"] * 6),
    ("[a|b] x", 6, ["a x", "a x", "b x", "a x", "b x", "a x"]),
    ("[fe|||]male", 8, ["female", "female", "male", "male", "male", "female", "male", "male"]),
])
def test_the_a1111_step_table(prompt, steps, per_step):
    schedule = prompt_schedule(prompt, steps)
    assert [entry_at(schedule, s) for s in range(steps)] == per_step


def test_nesting_and_emphasis_kept():
    assert prompt_schedule("a[b:[c:d:2]:1]e", 10) == [(1, "abe"), (2, "ace"), (10, "ade")]
    assert prompt_schedule("[(a:2):3]", 10) == [(3, ""), (10, "(a:2)")]


@pytest.mark.parametrize("prompt", ["a | b", "x\\", "[a:b:3] |"])
def test_what_the_grammar_cannot_parse_is_used_as_written(prompt):
    assert prompt_schedule(prompt, 10) == [(10, prompt)]


LARK_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


def lark_schedule(parser, prompt: str, steps: int) -> list[tuple[int, str]]:
    """A1111's scheduling over A1111's grammar, parsed by lark (written here from the published rules)."""
    import lark
    try:
        tree = parser.parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    found, whens = {steps}, {}
    for sub in tree.iter_subtrees():
        if sub.data == "scheduled":
            s = str(sub.children[-2])
            when = min(steps, int(float(s) * steps if "." in s else float(s)))
            whens[id(sub)] = when
            if when >= 1:
                found.add(when)
        elif sub.data == "alternate":
            found.update(range(1, steps + 1))

    def text(node, step):
        if node is None:
            return ""
        if isinstance(node, lark.Token):
            return str(node)
        if node.data == "scheduled":
            return text(node.children[0], step) if step <= whens[id(node)] else text(node.children[1], step)
        if node.data == "alternate":
            return text(node.children[(step - 1) % len(node.children)], step)
        return "".join(text(c, step) for c in node.children)
    return [(t, text(tree, t)) for t in sorted(found)]


def touches_a_stray(tree) -> bool:
    """A bracket or colon that no construct took, next to a construct or another such character: there
    A1111's grammar is ambiguous and lark's tie-break decides (docs/architecture.md, "Prompts")."""
    if tree is None:
        return False
    for i, node in enumerate(tree):
        if isinstance(node, Stray):
            for j in (i - 1, i + 1):
                if 0 <= j < len(tree) and not (type(tree[j]) is str and tree[j] not in "()[]:"):
                    return True
    return False


def test_editing_matches_a1111s_grammar_run_by_lark():
    lark = pytest.importorskip("lark", reason="lark is in the test extra: pip install -e '.[test]'")
    parser = lark.Lark(LARK_GRAMMAR)
    rng = random.Random(2)
    alphabet = list("ab c,") + ["[", "]", "(", ")", ":", "|", "\\", "3", "0.5", "1", " ", ":2", "::", "[a:b:2]",
                                "[a|b]", "(x:1.2)", "[a::1]", "[b:2]", "((a))", "[[a:b:1]|c]", "\\(", "[a:(b:1.2):0.5]"]
    compared = 0
    for _ in range(2000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        if touches_a_stray(parse(prompt)):
            continue
        compared += 1
        for steps in (1, 4, 10):
            assert prompt_schedule(prompt, steps) == lark_schedule(parser, prompt, steps), (prompt, steps)
    assert compared > 1000


# ---- chunks --------------------------------------------------------------------------------------

def cats(n: int) -> str:
    return " ".join(["cat"] * n)


def content(chunk) -> list[int]:
    """A chunk's prompt tokens: without BOS, EOS and the EOS padding."""
    ids = chunk.tokens[1:-1]
    while ids and ids[-1] == EOS:
        ids = ids[:-1]
    return ids


def test_chunk_layout_and_the_75_token_boundary(tok):
    one = tokenize(cats(75), tok)
    assert len(one.chunks) == 1 and one.chunks[0].tokens == [BOS] + [CAT] * 75 + [EOS]
    two = tokenize(cats(76), tok)
    assert [content(c) for c in two.chunks] == [[CAT] * 75, [CAT]]
    assert all(len(c.tokens) == len(c.weights) == 77 for c in two.chunks) and two.token_count == 76
    assert two.chunks[1].tokens == [BOS, CAT] + [EOS] * 75                       # padded with EOS


@pytest.mark.parametrize("comma_at,moved", [(54, 0), (55, 19), (56, 18), (74, 0)])
def test_comma_backtrack_edges(tok, comma_at, moved):
    """Full chunk, next token not a comma: what follows the last comma moves if it is <= 20 tokens.
    A comma at index 74 is the chunk's last token: nothing after it, nothing to move."""
    text = cats(comma_at) + ", " + cats(100 - comma_at)
    first, second = (content(c) for c in tokenize(text, tok).chunks[:2])
    if moved:
        assert len(first) == comma_at + 1 and first[-1] == COMMA and len(second) >= moved
        assert second[:moved] == [CAT] * moved
    else:
        assert len(first) == 75
    no_backtrack = tokenize(text, tok, comma_backtrack=0).chunks
    assert len(content(no_backtrack[0])) == 75


def test_a_comma_exactly_at_a_full_chunk_opens_the_next(tok):
    chunks = tokenize(cats(75) + ", " + cats(3), tok).chunks
    assert content(chunks[0]) == [CAT] * 75 and content(chunks[1]) == [COMMA, CAT, CAT, CAT]


def test_break_and_the_empty_prompt(tok):
    assert [content(c) for c in tokenize("cat BREAK cat", tok).chunks] == [[CAT], [CAT]]
    assert [content(c) for c in tokenize("BREAK cat", tok).chunks] == [[], [CAT]]            # all-padding chunk
    assert [content(c) for c in tokenize("cat BREAK BREAK cat", tok).chunks] == [[CAT], [], [CAT]]
    empty = tokenize("", tok)
    assert len(empty.chunks) == 1 and empty.chunks[0].tokens == [BOS] + [EOS] * 76 and empty.token_count == 0
    assert [content(c) for c in tokenize("(cat BREAK cat)", tok).chunks] == [
        [CAT] + tok.encode("break") + [CAT]]                                   # inside brackets: a word
    assert len(tokenize("cat BREAK cat", tok, emphasis=False).chunks) == 1      # plain: BREAK is text


def test_weights_follow_their_tokens_and_split_words(tok):
    chunk = tokenize("a (red:1.5)dog", tok).chunks[0]
    ids = content(chunk)
    assert ids == tok.encode("a") + tok.encode("red") + tok.encode("dog")   # pieces tokenised on their own
    assert chunk.weights[1:1 + len(ids)] == [1.0, 1.5, 1.0]


def embedding(name: str, n: int) -> Embedding:
    return Embedding(name, torch.randn(n, 768, generator=torch.Generator().manual_seed(n)), "0" * 12)


def test_embeddings_count_their_vectors_and_move_whole(tok):
    lib = Embeddings(tok)
    lib.add(embedding("easynegative", 8))
    t = tokenize("cat, (EasyNegative:1.2)", tok, lib)                     # case-insensitive, weighted
    chunk = t.chunks[0]
    assert content(chunk) == [CAT, COMMA] + [0] * 8 and t.token_count == 10
    assert chunk.inserts == [(3, lib["easynegative"])] and chunk.weights[3:11] == [1.2] * 8
    assert t.embeddings == (lib["easynegative"],)
    late = tokenize(cats(70) + " easynegative", tok, lib)                  # 70 + 8 > 75: the whole embedding moves
    assert len(content(late.chunks[0])) == 70 and content(late.chunks[1]) == [0] * 8
    assert late.chunks[1].inserts[0][0] == 1


def test_the_longest_name_wins(tok):
    lib = Embeddings(tok)
    lib.add(embedding("bad", 1))
    lib.add(embedding("bad_hands", 2))
    assert tokenize("bad_hands", tok, lib).chunks[0].inserts[0][1].name == "bad_hands"
    assert tokenize("bad cat", tok, lib).chunks[0].inserts[0][1].name == "bad"


def test_a_backtracked_embedding_keeps_a1111s_quirk(tok):
    """A1111 moves the placeholders after the last comma to the next chunk but leaves the embedding's
    insertion on the old chunk at its old offset: its vectors land on that chunk's padding and the moved
    placeholders stay token 0."""
    lib = Embeddings(tok)
    lib.add(embedding("easynegative", 3))
    chunks = tokenize(cats(60) + ", easynegative " + cats(20), tok, lib).chunks
    assert content(chunks[0]) == [CAT] * 60 + [COMMA]
    assert chunks[0].inserts == [(62, lib["easynegative"])]                    # content offset 61, past the BOS
    assert chunks[0].tokens[62:65] == [EOS] * 3                                 # padding the vectors overwrite
    assert content(chunks[1])[:3] == [0, 0, 0] and not chunks[1].inserts


# ---- AND and tags --------------------------------------------------------------------------------

def test_and_and_tags():
    assert split_and("a cat AND a dog :0.7") == [("a cat", 1.0), (" a dog", 0.7)]
    assert split_and("a cat AND a dog:-0.5 AND x") == [("a cat", 1.0), (" a dog", -0.5), (" x", 1.0)]
    assert split_and("a BRAND new") == [("a BRAND new", 1.0)]                     # a word of its own
    text, tags = split_tags("a cat <lora:add_detail:0.8>, <hypernet:x:1> <lyco:y>")
    assert text == "a cat , " + " " and [str(t) for t in tags] == [
        "<lora:add_detail:0.8>", "<hypernet:x:1>", "<lyco:y>"]


# ---- guidance over AND parts and schedules ----------------------------------------------------------------

class ToyUNet:
    def __init__(self):
        self.contexts = []

    def __call__(self, x, t, context):
        self.contexts.append(context)
        return 0.1 * x + context.mean(dim=(1, 2))[:, None, None, None] + torch.cos(t / 300)[:, None, None, None]


def call(step: int) -> ModelCall:
    return ModelCall(sigma=1.0, t=500.0, step=step, steps=10)


def test_and_is_uncond_plus_the_weighted_sum_of_guided_differences():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g)
    c1, c2, c3, u = (torch.randn(77, 8, generator=g) for _ in range(4))
    cond = [[(1.0, c1), (0.7, c2)], [(1.0, c3)]]
    unet = ToyUNet()
    eps = guided_by_step(unet, lambda step: (cond, [u, u]), 7.5)(x, call(0))
    t = torch.full((1,), 500.0)
    e = lambda xi, c: unet(xi[None], t, c[None])[0]                       # noqa: E731
    expected0 = e(x[0], u) + 1.0 * 7.5 * (e(x[0], c1) - e(x[0], u)) + 0.7 * 7.5 * (e(x[0], c2) - e(x[0], u))
    expected1 = e(x[1], u) + 7.5 * (e(x[1], c3) - e(x[1], u))
    assert torch.allclose(eps, torch.stack([expected0, expected1]), atol=1e-5)


def test_one_part_each_equals_plain_guidance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, generator=g)
    c, u = torch.randn(2, 77, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    by_step = guided_by_step(ToyUNet(), lambda step: ([[(1.0, c[0])], [(1.0, c[1])]], [u[0], u[1]]), 7.5)
    assert torch.allclose(by_step(x, call(0)), guided(ToyUNet(), c, u, 7.5)(x, call(0)), atol=1e-6)


def test_the_schedule_switches_at_the_step():
    a, b, u = torch.zeros(77, 8), torch.ones(77, 8), torch.full((77, 8), 0.5)
    unet = ToyUNet()
    model = guided_by_step(unet, lambda step: ([[(1.0, a if step <= 3 else b)]], [u]), 7.5)
    for step in range(6):
        model(torch.zeros(1, 4, 4, 4), call(step))
    seen = [float(ctx[1].mean()) for ctx in unet.contexts]            # row 0 is the negative
    assert seen == [0.0] * 4 + [1.0] * 2


def test_padding_repeats_the_last_vector():
    short, long = torch.arange(6.0).reshape(3, 2), torch.zeros(5, 2)
    batch = stack_padded([short, long])
    assert batch.shape == (2, 5, 2) and torch.equal(batch[0, 3:], short[-1:].expand(2, 2))
    assert math.isclose(float(batch[0, 2, 0]), 4.0)


def test_bad_numbers_and_deep_nesting_are_clear_errors():
    with pytest.raises(ValueError, match="too large a number"):
        prompt_schedule("[a:b:1e400]", 10)
    with pytest.raises(ValueError, match="nests brackets too deeply"):
        prompt_schedule("(" * 5000 + "a" + ")" * 5000, 10)


def test_emphasis_none_reads_brackets_as_text_but_still_edits(tiny_ckpt_file):
    import sd15
    pipe = sd15.load(tiny_ckpt_file, device="cpu")
    cond = pipe.conditioning(["(red) [cat:dog:2]"], steps=4, emphasis="none")
    schedule = cond.cond[0][0][1]
    assert [last for last, _ in schedule.entries] == [2, 4]                   # prompt editing still runs
    encoder = sd15.conditioning.PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    literal = encoder.encode_together(["(red) cat"], emphasis=False)[0][0]
    assert torch.equal(schedule.at(0), literal)                               # "(red)" as four characters
    weighted = encoder.encode_together(["(red) cat"])[0][0]
    assert not torch.equal(weighted, literal)


def test_ti_hashes_spell_names_as_a1111_does(tiny_ckpt_file, tmp_path):
    """A1111 writes embedding names in "TI hashes" without ":" and ","; an embedding used only in the
    negative prompt counts even when guidance 1 skips encoding it, as A1111 encodes it anyway."""
    import sd15
    from safetensors.torch import save_file
    pipe = sd15.load(tiny_ckpt_file, device="cpu")
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "x.safetensors"))
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "y.safetensors"))
    first = pipe.add_embedding(tmp_path / "x.safetensors", name="bad,hands")
    second = pipe.add_embedding(tmp_path / "y.safetensors", name="lowq")
    image = pipe.txt2img("a bad,hands cat", negative_prompt="lowq", steps=1, width=32, height=32, seed=1,
                         guidance_scale=1)[0]
    back = sd15.Request.from_infotext(image.info["parameters"])
    assert back.ti_hashes == {"badhands": first.hash, "lowq": second.hash}
