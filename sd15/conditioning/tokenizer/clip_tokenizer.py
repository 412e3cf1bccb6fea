"""CLIP byte-level BPE tokenizer, as Stable Diffusion 1.x was trained and run with.

The reference is transformers 4.x's *Python* `CLIPTokenizer` with ftfy installed (docs/architecture.md, "Numerics"):

    split out literal special tokens -> per piece: ftfy.fix_text, collapse whitespace, strip, lower-case
    -> CLIP word regex -> each word's UTF-8 bytes as printable stand-in characters -> BPE with a `</w>` word end

transformers 5 (no ftfy, NFC only) and OpenAI's SimpleTokenizer (html.unescape twice, no special-token
split) give different ids on some inputs, so tests hold this file to golden ids made by transformers 4.x.
Vocabulary and merges both come from OpenAI's `bpe_simple_vocab_16e6.txt.gz` bundled next to this file.
"""

import functools
import gzip
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import regex  # the stdlib `re` has no \p{L} / \p{N}, and its \s differs from the reference's
import torch

MERGES_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's vocabulary is 49408 = 256 byte symbols + the same 256 ending a word + merges + BOS + EOS,
# so only the first 49152 - 256 - 2 of the file's 262k merges are used.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
MAX_LENGTH = 77  # BOS + 75 prompt tokens + EOS: the text encoder's fixed context

# A literal special token in the prompt is one token; the text around it is cleaned on its own
# (the reference splits on its added tokens before it ever calls ftfy). Case-sensitive, as there.
_SPECIAL_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE = regex.compile(r"\s+")
# CLIP's word pattern: special tokens, English contractions, letter runs, single digits, other-symbol runs.
# Whitespace matches nothing, so it only separates words. The flag is the reference's; text is lower-case anyway.
_WORD = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def byte_symbols() -> list[str]:
    """Byte value -> the character that stands for it inside BPE.

    BPE works on strings, and the merges file must not contain spaces or control characters, so
    the 188 printable Latin-1 bytes stand for themselves and the other 68 get chr(256), chr(257), ...
    in byte order. Sorted by code point these are also the first 256 vocabulary entries.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, next_extra = [], 256
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(next_extra))
            next_extra += 1
    return symbols


def clean(text: str) -> str:
    """The reference's text cleaning: fix mojibake/entities/odd unicode, collapse whitespace, lower-case.

    Printable ASCII without "&" is what most prompts are, and ftfy leaves it as it is (everything it
    fixes needs non-ASCII text, an HTML entity, or a control character), so it skips ftfy: the slow half
    of tokenising, paid once per weighted piece of a prompt."""
    if not (text.isascii() and text.isprintable() and "&" not in text):
        import ftfy  # here, not at the top: its import costs ~0.05 s, and most prompts never need it
        text = ftfy.fix_text(text)
    return _WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """`tok("a cat")` -> LongTensor [1, 77]; `tok.encode("a cat")` -> ids without BOS/EOS, not truncated."""

    bos_id = VOCAB_SIZE - 2  # 49406
    eos_id = VOCAB_SIZE - 1  # 49407, also the padding id: SD 1.x pads with EOS, not with 0
    max_length = MAX_LENGTH

    def __init__(self, merges_file: str | Path = MERGES_FILE, word_cache_size: int = 1 << 16):
        merges = _read_merges(Path(merges_file))
        self._byte_symbol = byte_symbols()
        self._symbol_byte = {symbol: byte for byte, symbol in enumerate(self._byte_symbol)}
        base = sorted(self._byte_symbol)
        # Each merge adds the joined pair as one new token, in merge order.
        self.tokens = base + [s + "</w>" for s in base] + ["".join(pair) for pair in merges] + [BOS, EOS]
        self.vocab = {token: i for i, token in enumerate(self.tokens)}
        if len(self.vocab) != VOCAB_SIZE:
            raise ValueError(f"{merges_file}: merges give {len(self.vocab)} distinct tokens, CLIP needs "
                             f"{VOCAB_SIZE}; use OpenAI's bpe_simple_vocab_16e6.txt.gz")
        self._rank = {pair: rank for rank, pair in enumerate(merges)}  # lower rank merges first
        # Prompts repeat the same words endlessly; BPE per word is the slow part, so remember it.
        self._word_ids = functools.lru_cache(maxsize=word_cache_size)(self._bpe)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and not truncated."""
        ids = []
        for segment in self._segments(text):
            for word in _WORD.findall(segment):
                ids += self._word_ids(word)
        return ids

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """LongTensor [B, 77]: BOS, at most 75 ids, EOS, then EOS padding (what SD 1.x's text encoder saw)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = []
        for prompt in prompts:
            ids = [self.bos_id, *self.encode(prompt)[: self.max_length - 2], self.eos_id]
            rows.append(ids + [self.eos_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.max_length)

    def truncation(self, prompt: str) -> str:
        """The part of `prompt` that `__call__` cuts off (in cleaned, lower-case form); "" if it all fits.

        Whole words are given as the cleaned prompt spells them; a word the cut splits contributes
        only its dropped pieces.
        """
        room = self.max_length - 2
        dropped = []
        for segment in self._segments(prompt):
            for match in _WORD.finditer(segment):
                ids = self._word_ids(match[0])
                if room >= len(ids):
                    room -= len(ids)
                elif room > 0:
                    dropped.append(self.decode(ids[room:]))
                    room = 0
                else:  # keep the space that separated the word (segments are separate words too)
                    spaced = match.start() == 0 or segment[match.start() - 1] == " "
                    dropped.append(" " + match[0] if spaced else match[0])
        return "".join(dropped).strip()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`: every `</w>` becomes a space. Bytes a cut split in the middle of a
        character decode to U+FFFD. Special tokens are skipped, or shown as words of their own."""
        data = bytearray()
        for i in ids:
            i = int(i)  # accept tensor elements too
            if i in (self.bos_id, self.eos_id):
                if not skip_special_tokens:
                    data += self.tokens[i].encode() + b" "
                continue
            token = self.tokens[i]
            word_end = token.endswith("</w>")
            data += bytes(self._symbol_byte[c] for c in token.removesuffix("</w>"))
            if word_end:
                data += b" "
        return data.decode("utf-8", errors="replace").strip()

    def _segments(self, text: str) -> Iterator[str]:
        """`text` as the reference feeds it to the word regex: each literal special token as it is,
        the text between them cleaned on its own (the reference splits on them before calling ftfy)."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
        for n, part in enumerate(_SPECIAL_SPLIT.split(text)):
            if n % 2:  # odd parts are the special tokens the split kept; the word regex keeps them whole
                yield part
            elif part:
                yield clean(part)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one regex word: its UTF-8 bytes as symbols, the last one marked as the word end,
        then repeatedly merge every occurrence of the adjacent pair with the lowest merge rank."""
        if word in (BOS, EOS):  # lower-casing can spell a special token, e.g. "<|EndOfText|>"
            return (self.vocab[word],)
        symbols = [self._byte_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:])
            best = min(pairs, key=lambda pair: self._rank.get(pair, NUM_MERGES))
            if best not in self._rank:
                break
            merged, i = [], 0
            while i < len(symbols):  # left to right, so "a a a" merges the first two
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.vocab[s] for s in symbols)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """The first NUM_MERGES merge pairs of a (gzipped) CLIP merges file; line 1 is a version header."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = list(itertools.islice(f, 1, NUM_MERGES + 1))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the CLIP merges file {path}: {e}") from e
    merges = [tuple(line.split()) for line in lines]
    if len(merges) < NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{path} is not a CLIP merges file (needs {NUM_MERGES} lines 'a b' after a header); "
                         f"use OpenAI's bpe_simple_vocab_16e6.txt.gz")
    return merges
