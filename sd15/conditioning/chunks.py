"""A prompt text -> CLIP's 77-token chunks, with a weight per token and the embeddings to insert.

A1111's rules (`modules/sd_hijack_clip.py: tokenize_line`):
  - each weighted piece of the emphasis parse is tokenised on its own (so a weight change splits a word);
  - a chunk holds 75 tokens and goes through CLIP as BOS + tokens + EOS, padded with EOS; every chunk on
    its own (positions 0..76 in each), their outputs concatenated: 77, 154, 231, ... tokens in all;
  - when a chunk is full and the next token is not a comma, the tokens after the chunk's last comma move
    to the next chunk if there are at most `comma_backtrack` (A1111's default 20) of them;
  - BREAK closes the chunk (padding it); BREAK at the start, or twice, makes an all-padding chunk;
  - an embedding's n vectors count as n tokens and move whole to the next chunk if they do not fit;
  - the empty prompt is one chunk, BOS + EOS x 76.
A1111's quirk is kept too: when the comma backtrack moves an embedding's placeholders to the next chunk,
its insertion stays on the old chunk at the same offset (so the vectors overwrite that chunk's padding,
as far as they fit before its last position) and the moved placeholders stay token 0 ("!").
"""

from dataclasses import dataclass, field

from .embeddings import Embedding, EmbeddingTable, Embeddings
from .emphasis import BREAK, parse_emphasis
from .tokenizer import CLIPTokenizer

CHUNK = 75                      # prompt tokens per chunk; with BOS and EOS, CLIP's 77
COMMA_BACKTRACK = 20            # A1111's "comma_padding_backtrack" default
PLACEHOLDER = 0                 # the token id under an embedding's vectors (replaced before CLIP sees it)


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)       # 77 ids once closed
    weights: list[float] = field(default_factory=list)    # one per token
    inserts: list[tuple[int, Embedding]] = field(default_factory=list)   # (position in the 77, embedding)


@dataclass(frozen=True)
class Tokenized:
    chunks: tuple[Chunk, ...]
    token_count: int            # prompt tokens, as A1111's "x/75" counter counts them
    embeddings: tuple[Embedding, ...]   # the embeddings used, in order of first use


def empty_chunk(tokenizer: CLIPTokenizer) -> Chunk:
    """What A1111 pads a batch of prompts with: the encoding of "" (BOS, EOS x 76), weights 1."""
    return Chunk([tokenizer.bos_id] + [tokenizer.eos_id] * (CHUNK + 1), [1.0] * (CHUNK + 2), [])


def tokenize(text: str, tokenizer: CLIPTokenizer, embeddings: Embeddings | EmbeddingTable | None = None, *,
             emphasis: bool = True, comma_backtrack: int = COMMA_BACKTRACK) -> Tokenized:
    """`text` (no prompt-editing syntax left: see `editing`) as chunks. emphasis=False reads brackets
    and BREAK as plain text (A1111's emphasis mode "None")."""
    pieces = parse_emphasis(text) if emphasis else [(text, 1.0)]
    comma = tokenizer.vocab[",</w>"]
    chunks: list[Chunk] = []
    chunk, last_comma, count = Chunk(), -1, 0
    used: dict[str, Embedding] = {}
    match = embeddings.match if embeddings else None          # no embeddings: no lookup per token

    def close(is_last: bool = False) -> None:
        nonlocal chunk, last_comma, count
        count += len(chunk.tokens) if is_last else CHUNK
        pad = CHUNK - len(chunk.tokens)
        chunk.tokens = [tokenizer.bos_id] + chunk.tokens + [tokenizer.eos_id] * pad + [tokenizer.eos_id]
        chunk.weights = [1.0] + chunk.weights + [1.0] * pad + [1.0]
        chunk.inserts = [(offset + 1, e) for offset, e in chunk.inserts]      # past the BOS
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for piece, weight in pieces:
        if (piece, weight) == BREAK:
            close()
            continue
        ids = tokenizer.encode(piece) if piece else []
        pos = 0
        while pos < len(ids):
            token = ids[pos]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (comma_backtrack and len(chunk.tokens) == CHUNK and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1                          # move what follows the comma to the next chunk
                moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:], [])    # insertions stay (A1111)
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK:
                close()
            found = match(ids, pos) if match is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                pos += 1
                continue
            embedding, name_length = found
            n = len(embedding.vectors)
            if len(chunk.tokens) + n > CHUNK:
                close()
            chunk.inserts.append((len(chunk.tokens), embedding))
            chunk.tokens += [PLACEHOLDER] * n
            chunk.weights += [weight] * n
            used.setdefault(embedding.name, embedding)
            pos += name_length
    if chunk.tokens or not chunks:
        close(is_last=True)
    return Tokenized(tuple(chunks), count, tuple(used.values()))
