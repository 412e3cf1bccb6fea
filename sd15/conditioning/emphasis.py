"""A1111's emphasis syntax: a prompt -> [(text, weight), ...], with BREAK markers.

    parse_emphasis("a (red:1.3) [car]")   ->  [("a ", 1.0), ("red", 1.3), (" ", 1.0), ("car", 1/1.1)]

The rules (A1111's "Original" emphasis, `modules/prompt_parser.py: parse_prompt_attention`):
  `(x)` multiplies x's weight by 1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies it by 1.3; nesting
  multiplies (`((x))` = 1.21). `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters. A closer without
  its opener, `:1.3)` without `(`, and a lone `:` are text; an opener never closed weighs everything
  after it (×1.1 or ÷1.1). `BREAK` (upper case, a word of its own) ends a 75-token chunk: it becomes
  (BREAK, -1), and inside brackets its marker weight is multiplied like any other, so there it is the
  word "break". Neighbouring pieces of equal weight are merged; the empty prompt is [("", 1.0)].
"""

import re

BREAK = ("BREAK", -1.0)
ROUND, SQUARE = 1.1, 1 / 1.1

# One token of the syntax: an escape, a lone backslash, an opener, ":weight)", a closer, a run of plain
# text, or a lone colon.
_TOKEN = re.compile(r"""\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:""")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    pieces: list[list] = []               # [text, weight], weights multiplied in place as brackets close
    round_open: list[int] = []            # where each open "(" began, as an index into pieces
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKEN.finditer(text):
        token, weight = m[0], m[1]
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _weight(weight, text))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


def _weight(value: str, prompt: str) -> float:
    try:
        return float(value)
    except ValueError:      # "1.2.3" matches the pattern but is no number (A1111 fails with a traceback here)
        raise ValueError(f"prompt {prompt!r}: emphasis weight {value!r} is not a number") from None
