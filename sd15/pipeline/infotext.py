"""A1111's "infotext": the settings text that travels in a PNG's `parameters` chunk, written and read.

    prompt (any number of lines)
    Negative prompt: negative (any number of lines; the line is left out when there is none)
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, ...

A value containing `,`, `:` or a newline is written as a JSON string, as A1111 does (and, so that it
reads back as written, one containing `"` or with spaces at either end); everything else as is.
Reading follows A1111's own parser: trailing blank lines are ignored, the last line holds the settings
when at least three `Key: value` pairs are found in it (text between pairs that is no pair is skipped,
as A1111's `findall` skips it), and the prompt runs up to a line starting `Negative prompt:`. A flat
JSON object as a value (the civitai extension's `Hashes: {...}`) is read whole. Windows line endings
are read as newlines. What the fields mean is the request's business (`request.py`); this module only
knows the format.
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

NEGATIVE = "Negative prompt:"
# A key starts with a word character and may hold spaces, '-' and '/' ("Schedule type", "ControlNet 0");
# a value is a JSON string, a flat JSON object, or runs to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|\{[^{}]*\}|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class Infotext:
    prompt: str
    negative_prompt: str = ""
    fields: dict[str, str] = field(default_factory=dict)    # key -> value text (unquoted), in written order


def quote(value: object) -> str:
    text = str(value)
    plain = not any(c in text for c in ',:\n"') and text == text.strip()
    return text if plain else json.dumps(text, ensure_ascii=False)


def format_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """The text A1111, ComfyUI, civitai and friends read back. Fields whose value is None are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def _pairs(line: str) -> list[tuple[str, str]]:
    pairs = []
    for m in _PAIR.finditer(line):
        key, value = m[1].strip(), m[2].strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass                                   # A1111 keeps such a value as written
        pairs.append((key, value))
    return pairs


def parse_infotext(text: str) -> Infotext:
    """Prompt, negative prompt and settings of an infotext written by sd15, A1111 or a compatible tool."""
    if not isinstance(text, str):
        raise ValueError(f"an infotext is text, got {type(text).__name__}")
    lines = text.replace("\r\n", "\n").rstrip().split("\n")
    pairs = _pairs(lines[-1]) if lines else []
    if len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if not in_negative and line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].removeprefix(" ")
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt), "\n".join(negative), dict(pairs))
