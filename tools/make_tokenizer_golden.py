"""Write tests/fixtures/tokenizer_golden.json: CLIP token ids made by the reference tokenizer.

The reference (docs/architecture.md, "Numerics") is transformers 4.x's *Python* `CLIPTokenizer` with ftfy installed, the
tokenizer SD 1.x was trained with. The hub is out of reach, so its vocab.json and merges.txt are
derived here from the bundled sd15/conditioning/tokenizer/bpe_simple_vocab_16e6.txt.gz, independently of our tokenizer
package. Each prompt maps to `tokenizer(prompt)["input_ids"]`: BOS, ids, EOS, not truncated, not padded.

Run from the repository root, in a venv of its own (no torch needed):

    python3 -m venv .venv-tok4
    .venv-tok4/bin/pip install "transformers<5" ftfy regex
    .venv-tok4/bin/python tools/make_tokenizer_golden.py
"""

import gzip
import hashlib
import html
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGES_GZ = ROOT / "sd15" / "conditioning" / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
OUT = ROOT / "tests" / "fixtures" / "tokenizer_golden.json"
NUM_MERGES = 49152 - 256 - 2  # transformers reads merges lines [1 : 49152 - 256 - 2 + 1]

# Inputs picked by hand for the ways they can go wrong.
TRICKY = [
    "", " ", "   ", "\t", "\n", "\r\n", " \t\n\r\x0b\x0c ", "\u3000", "\u00a0", "\u200b", "\ufeff", "\u2028a\u2029b",
    "a photo of a cat", "A Photo Of A CAT", "a  photo\tof\na\r\ncat", "  leading and trailing  ",
    "a\x1cb\x1dc\x1ed\x1ff", "a\x85b", "a\u200bb", "a\u200cb\u200db", "soft\u00adhyphen", "nbsp\u00a0space",
    "tab\tseparated\tvalues", "line\nbreaks\n\nand\n\n\nmore",
    # contractions and apostrophes
    "it's", "IT'S", "don't", "we're", "I've", "I'm", "you'll", "he'd", "it\u2019s", "rock'n'roll", "'s",
    "dogs' toys", "o'clock", "'quoted'", "''", "'''", "'S 'T 'RE 'VE 'M 'LL 'D", "can't won't shan't",
    "\u2018single\u2019 \u201cdouble\u201d", "\u00abguillemets\u00bb", "`backtick`",
    # digits and numbers
    "1920x1080", "8k", "4k uhd", "3.14159", "1,000,000", "2023-01-01", "v1.5", "x1.2", "007",
    "\u0661\u0662\u0663", "\u00b2\u00b3\u00b9", "\u00bd \u00bc", "\u216b", "\u2460\u2461", "\uff11\uff12\uff13",
    "seed 1234567890", "f/1.8 85mm", "24mm 1/250s iso100",
    # punctuation runs and prompt syntax
    "!!!", "...", "?!", "\u2014", "--", "-", "(((masterpiece)))", "[[[foo]]]", "{bar}", "<lora:foo_v2:0.8>",
    "(masterpiece:1.2), [foo], (best quality:1.4), ((ultra detailed))", "a [cat:dog:0.5] photo",
    "(red hair:1.3) BREAK blue eyes", "\\(escaped\\) parens", "a|b|c", "__wildcard__", "#hashtag @user",
    "http://example.com/img.png?x=1&y=2", "email@example.com", "C++ & C#", "$100 50% ~tilde^ *star*",
    "emb:embedding_name", "<hypernet:anime:1>", "(word:1.1)(other:0.9)", "a, b,c ,d , e",
    # literal special tokens
    "<|endoftext|>", "<|startoftext|>", "a <|startoftext|> b", "<|ENDOFTEXT|>", "x<|endoftext|>y",
    "<|endoftext|", "|endoftext|>", "<|startoftext<|endoftext|>", "<|<|endoftext|>", "!!<|endoftext|>!!",
    "<|endoftext|><|endoftext|>", "a<|EndOfText|>b", "&lt;|endoftext|&gt;", " <|endoftext|> ",
    # HTML entities
    "&amp;", "&lt;b&gt;", "&#39;", "&quot;hi&quot;", "&nbsp;", "&eacute;t&eacute;", "&#x1F600;", "&amp;amp;",
    "&amp;lt;", "<b>&amp;</b>", "&AMP;", "&copy 2024", "&foo;", "tom &amp; jerry", "a &lt; b &gt; c",
    "fish &amp; chips <3", "&#128512;", "&#0;", "&;", "& amp;", "rock &#39;n&#39; roll",
    # mojibake and odd encodings
    "Ã©", "cafÃ©", "Ã¼ber", "donâ€™t", "â€œquotedâ€\x9d", "Ã\xa0 la carte", "æ—¥æœ¬", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
    "naÃ¯ve rÃ©sumÃ©", "Ã", "Â£100", "ÃƒÂ©", "\x1b[31mred\x1b[0m", "\ufffd", "caf\u00e9 vs cafe\u0301",
    # letters and scripts
    "café naïve résumé", "Ünïcödé", "İstanbul", "STRASSE stra\u00dfe \u1e9e", "ΣΑΣ σας", "Ǆ ǅ ǆ", "ﬁne ﬂower",
    "日本の桜", "中文提示词 一只猫", "한국어 프롬프트", "привет мир", "γειά σου", "مرحبا بالعالم", "שלום",
    "नमस्ते", "สวัสดี", "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "ｶﾀｶﾅ", "𝐛𝐨𝐥𝐝 𝓈𝒸𝓇𝒾𝓅𝓉", "Ⓐⓑⓒ", "z\u0351\u0345a\u036bl\u0352go",
    # emoji
    "🙂", "a cat 🐱 and a dog 🐶", "👩‍👩‍👧‍👦", "👍🏽", "🇯🇵🇺🇸", "❤️", "✨✨✨", "🔥 fire 🔥", "1️⃣", "🏳️‍🌈",
    # repeated characters
    "a" * 100, "ha" * 50, "!" * 80, "🙂" * 30, "loooooooooooooooong", "zzzzzzzzzzzzzzzz", "...." * 20,
    "- " * 40, "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm", "ab" * 64, "x" * 300,
    # typical SD prompts
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, blue eyes",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry",
    "a beautiful portrait of a woman with long flowing hair, intricate, elegant, highly detailed, digital "
    "painting, artstation, concept art, smooth, sharp focus, illustration, art by artgerm and greg rutkowski "
    "and alphonse mucha",
    "An astronaut riding a horse on Mars, photorealistic, 8k, octane render",
    "cyberpunk city at night, neon lights, rain, reflections, blade runner style, volumetric lighting, 35mm",
    "A watercolor painting of a fox in a snowy forest by Studio Ghibli",
]

SUBJECTS = ["a cat", "an old man", "a castle", "a dragon", "a girl", "a robot", "a lighthouse", "a forest",
            "a bowl of ramen", "a samurai", "a spaceship", "a cozy cabin", "a tiger", "an elf queen", "a city street"]
DETAILS = ["highly detailed", "intricate", "sharp focus", "8k uhd", "dslr", "soft lighting", "golden hour",
           "volumetric fog", "bokeh", "octane render", "unreal engine 5", "trending on artstation", "hdr",
           "film grain", "cinematic lighting", "depth of field", "studio lighting", "ray tracing", "4k",
           "photorealistic", "oil painting", "watercolor", "concept art", "anime style", "pixel art",
           "by greg rutkowski", "by alphonse mucha", "by makoto shinkai", "by wlop", "by James Gurney"]
STARTS = ["", "masterpiece, best quality, ", "(masterpiece:1.2), ", "RAW photo, ", "portrait of ", "close-up of "]

# Unicode blocks to draw random characters from (no surrogates: they cannot be UTF-8 encoded).
BLOCKS = [(0x20, 0x7E), (0xA0, 0xFF), (0x100, 0x17F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
          (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x2100, 0x218F),
          (0x2460, 0x24FF), (0x2500, 0x257F), (0x2600, 0x26FF), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
          (0xAC00, 0xD7A3), (0xFB00, 0xFB4F), (0xFE00, 0xFE0F), (0xFF00, 0xFFEF), (0x1D400, 0x1D7FF),
          (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x0, 0x1F), (0x7F, 0x9F)]


def generated_prompts(rng: random.Random) -> list[str]:
    prompts = []
    for _ in range(120):  # typical SD prompts, sometimes with weights and odd casing
        parts = [rng.choice(SUBJECTS)] + rng.sample(DETAILS, rng.randint(1, 8))
        parts = [f"({p}:{rng.choice(['0.8', '1.1', '1.3'])})" if rng.random() < 0.2 else p for p in parts]
        text = rng.choice(STARTS) + rng.choice([", ", ",", " , ", " "]).join(parts)
        prompts.append(text.upper() if rng.random() < 0.1 else text)
    for _ in range(12):  # long prompts, 80-250 tokens: truncation territory
        prompts.append(", ".join(rng.choice(DETAILS + SUBJECTS) for _ in range(rng.randint(30, 90))))
    for _ in range(100):  # random characters from many blocks, mixed with ascii words and spaces
        words = []
        for _ in range(rng.randint(1, 8)):
            lo, hi = rng.choice(BLOCKS)
            words.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
            if rng.random() < 0.3:
                words.append(rng.choice(DETAILS))
        prompts.append(rng.choice([" ", "", ", "]).join(words))
    for _ in range(30):  # mojibake: UTF-8 text read back as Latin-1 / Windows-1252
        text = rng.choice(["café crème brûlée", "naïve façade", "über straße", "日本の桜", "“quotes” don’t",
                           "привет", "señor niño", "Ωmega ≥ 5 °C", "emoji 🙂 here", "Ærøskøbing"])
        codec = rng.choice(["latin-1", "cp1252"])
        prompts.append(text.encode("utf-8").decode(codec, errors="ignore"))
    for _ in range(20):  # HTML-escaped prompts, once or twice
        text = html.escape(rng.choice(TRICKY + SUBJECTS), quote=True)
        prompts.append(html.escape(text) if rng.random() < 0.3 else text)
    return prompts


def derive_vocab_and_merges(tmp: Path) -> tuple[Path, Path, str]:
    """Write vocab.json and merges.txt as the hub's openai/clip-vit-large-patch14 has them."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]  # printable first, then the rest
    merges = gzip.open(MERGES_GZ, "rt", encoding="utf-8").read().split("\n")[1 : NUM_MERGES + 1]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(tokens)) == len(tokens) == 49408
    vocab_path, merges_path = tmp / "vocab.json", tmp / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path, hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def main() -> None:
    import ftfy
    import regex
    import transformers
    from transformers import CLIPTokenizer  # the Python (slow) one, not CLIPTokenizerFast

    if not transformers.__version__.startswith("4."):
        sys.exit(f"need transformers 4.x (the reference), found {transformers.__version__}")
    prompts = list(dict.fromkeys(TRICKY + generated_prompts(random.Random(1234))))
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path, vocab_sha = derive_vocab_and_merges(Path(tmp))
        tok = CLIPTokenizer(str(vocab_path), str(merges_path))
        assert tok.fix_text is not None, "ftfy must be installed: without it transformers uses BasicTokenizer"
        assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
        cases = {p: tok(p)["input_ids"] for p in prompts}

    header = {
        "generator": "tools/make_tokenizer_golden.py",
        "reference": f"transformers {transformers.__version__} CLIPTokenizer (Python), ftfy {ftfy.__version__}, "
                     f"regex {regex.__version__}, python {sys.version.split()[0]}",
        "transformers": transformers.__version__,
        "ftfy": ftfy.__version__,
        "merges_sha256": hashlib.sha256(MERGES_GZ.read_bytes()).hexdigest(),
        "vocab_sha256": vocab_sha,  # sha256 of the 49408 token strings joined by "\n", in id order
        "note": "ids = tokenizer(prompt)['input_ids']: BOS + ids + EOS, not truncated, not padded",
    }
    # One case per line, ASCII-escaped, so the file diffs well and invisible characters stay visible.
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
    body = ",\n".join(f"    {json.dumps(p)}: {json.dumps(ids, separators=(',', ':'))}" for p, ids in cases.items())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("{\n" + ",\n".join(lines) + ',\n  "cases": {\n' + body + "\n  }\n}\n", encoding="utf-8")
    long = sum(len(ids) > 77 for ids in cases.values())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {len(cases)} prompts, {long} longer than 77 tokens")


if __name__ == "__main__":
    main()
