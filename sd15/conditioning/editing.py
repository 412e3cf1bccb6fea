"""A1111's prompt editing and alternation: a prompt -> the texts it stands for, step by step.

    prompt_schedule("a [b:c:3] d", steps=10)   ->  [(3, "a b d"), (10, "a c d")]
    prompt_schedule("[a|b] x", steps=4)        ->  [(1, "a x"), (2, "b x"), (3, "a x"), (4, "b x")]

Each entry is (last step, text): sampler step s (0-based) uses the first entry whose last step is >= s,
so `[a:b:3]` is `a` for steps 0..3 and `b` after (A1111's rule; four steps of `a`, not three).
`[from:to:when]` switches text, `[to:when]` adds text, `[from::when]` removes it; `when` with a `.` is a
fraction of the steps, otherwise a step; `[a|b|c]` cycles a, b, c, ... from step 1 (so step 0 and step 1
both use `a`). Constructs nest. Emphasis brackets are left in the texts for `emphasis` to read.

The grammar is A1111's (`modules/prompt_parser.py`, a lark grammar):

    start:       (prompt | any of "[", "]", "(", ")", ":" as text)*
    prompt:      (emphasized | scheduled | alternate | plain | whitespace)*
    emphasized:  "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
    scheduled:   "[" [prompt ":"] prompt ":" [ws] NUMBER [ws] "]"
    alternate:   "[" prompt ("|" [prompt])+ "]"
    plain:       (any character but \\ [ ] ( ) : |, or \\ and any character but a newline)+

written here as a small recursive-descent parser (where a bracket could be a construct or plain text,
the construct is taken, as A1111's parser does). A prompt the grammar cannot parse (a `|` outside any
alternation, a trailing lone backslash) is used as it is, for every step, as in A1111.
"""

import re
from dataclasses import dataclass

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
_STRAY = re.compile(r"[\[\]():]")          # one character at a time: the next may start a construct


@dataclass(frozen=True)
class Scheduled:
    before: "tuple | None"          # None: `[to:when]` (nothing before)
    after: tuple
    when: str                       # the number as written: "3", "0.5"


@dataclass(frozen=True)
class Alternate:
    options: tuple                  # each a tuple of nodes, or None for an empty option after a "|"


class Stray(str):
    """A bracket or colon at the top level that no construct took: text."""


class _Fail(Exception):
    pass


class _Parser:
    """Nodes are str (text as written), Scheduled, Alternate; a prompt is a tuple of nodes."""

    def __init__(self, text: str):
        self.text = text

    def start(self) -> tuple:
        nodes, pos = [], 0
        while pos < len(self.text):
            pos_before = pos
            part, pos = self.prompt(pos)
            nodes += part
            m = _STRAY.match(self.text, pos)
            if m:                               # brackets and colons no construct took: text
                nodes.append(Stray(m[0]))
                pos = m.end()
            elif pos == pos_before:
                raise _Fail(pos)                # "|" or a lone trailing backslash: not in the grammar
        return tuple(nodes)

    def prompt(self, pos: int) -> tuple[tuple, int]:
        """As many prompt elements as parse from pos (possibly none)."""
        nodes = []
        while pos < len(self.text):
            ch = self.text[pos]
            if ch in "([":
                try:
                    node, pos = self.bracket(pos)
                except _Fail:
                    break
                nodes += node
                continue
            m = _PLAIN.match(self.text, pos)
            if not m:
                break
            nodes.append(m[0])
            pos = m.end()
        return tuple(nodes), pos

    def expect(self, pos: int, ch: str) -> int:
        if pos < len(self.text) and self.text[pos] == ch:
            return pos + 1
        raise _Fail(pos)

    def bracket(self, pos: int) -> tuple[list, int]:
        """A construct starting at "(" or "[": emphasized, scheduled or alternate."""
        if self.text[pos] == "(":
            first, p = self.prompt(pos + 1)
            if p < len(self.text) and self.text[p] == ":":
                second, p = self.prompt(p + 1)
                return ["(", *first, ":", *second, ")"], self.expect(p, ")")
            return ["(", *first, ")"], self.expect(p, ")")
        first, p = self.prompt(pos + 1)
        nxt = self.text[p] if p < len(self.text) else ""
        if nxt == "]":
            return ["[", *first, "]"], p + 1
        if nxt == "|":
            options = [first]
            while p < len(self.text) and self.text[p] == "|":
                option, p = self.prompt(p + 1)
                options.append(option or None)
            return [Alternate(tuple(options))], self.expect(p, "]")
        if nxt != ":":
            raise _Fail(p)
        m = _NUMBER.match(self.text, p + 1)             # [to:when]
        second, q = self.prompt(p + 1)
        if q < len(self.text) and self.text[q] == ":":  # [from:to:when]
            n = _NUMBER.match(self.text, q + 1)
            if n:
                return [Scheduled(first, second, n[1])], n.end()
        if m:
            return [Scheduled(None, first, m[1])], m.end()
        raise _Fail(p)


def parse(prompt: str) -> tuple | None:
    """The prompt's syntax tree, or None where the grammar does not parse it."""
    try:
        return _Parser(prompt).start()
    except _Fail:
        return None


def _switch_steps(nodes, steps: int, found: set) -> None:
    for node in nodes or ():
        if isinstance(node, Scheduled):
            v = float(node.when)
            when = min(steps, int(v * steps if "." in node.when else v))
            if when >= 1:
                found.add(when)
            _switch_steps(node.before, steps, found)
            _switch_steps(node.after, steps, found)
        elif isinstance(node, Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _switch_steps(option, steps, found)


def _text_at(nodes, step: int, steps: int) -> str:
    out = []
    for node in nodes or ():
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            v = float(node.when)
            when = min(steps, int(v * steps if "." in node.when else v))
            out.append(_text_at(node.before, step, steps) if step <= when else _text_at(node.after, step, steps))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text), ...] for a run of `steps` steps (see the module docstring)."""
    try:
        tree = parse(prompt)
        if tree is None:
            return [(steps, prompt)]
        found = {steps}
        _switch_steps(tree, steps, found)
        return [(t, _text_at(tree, t, steps)) for t in sorted(found)]
    except RecursionError:
        raise ValueError(f"prompt nests brackets too deeply to read ({prompt[:40]!r}...)") from None
    except OverflowError:
        raise ValueError(f"prompt {prompt[:60]!r}: a prompt-editing step is too large a number") from None


def entry_at(schedule, step: int):
    """What 0-based sampler step `step` uses of [(last step, value), ...]: the first entry whose last step
    is >= step (A1111's `reconstruct_cond_batch`)."""
    return next((value for last, value in schedule if step <= last), schedule[-1][1])

