"""IOS-style command words: patterns with abbreviations, parameters and optional parts.

``match("sh cry gdoi gr GET ks mem".split(), "show crypto gdoi [group <group>] ks members")``
returns ``{"group": "GET"}``; a word may be abbreviated to any unique prefix
the way IOS allows, as long as it is not shorter than two letters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN = re.compile(r"\[|\]|<[a-z_-]+>|[^\s\[\]]+")


def _parse(pattern: str) -> list[object]:
    stack: list[list[object]] = [[]]
    for tok in _TOKEN.findall(pattern):
        if tok == "[":
            stack.append([])
        elif tok == "]":
            group = stack.pop()
            stack[-1].append(("opt", group))
        else:
            stack[-1].append(tok)
    assert len(stack) == 1, f"unbalanced pattern {pattern!r}"
    return stack[0]


def _word_matches(word: str, literal: str) -> bool:
    word = word.lower()
    return word == literal or (len(word) >= 2 and literal.startswith(word))


def _match(items: list[object], words: Sequence[str], params: dict[str, str]) -> dict[str, str] | None:
    if not items:
        return params if not words else None
    head, rest = items[0], items[1:]
    if isinstance(head, tuple):  # optional group: try with it, then without
        with_it = _match(list(head[1]) + rest, words, dict(params))
        if with_it is not None:
            return with_it
        return _match(rest, words, params)
    assert isinstance(head, str)
    if not words:
        return None
    if head.startswith("<"):
        return _match(rest, words[1:], {**params, head[1:-1]: words[0]})
    if head.startswith("[") is False and not _word_matches(words[0], head):
        return None
    flags = {**params}
    if head in ("now", "replace-now"):
        flags[head] = "yes"
    return _match(rest, words[1:], flags)


def match(words: Sequence[str], pattern: str) -> dict[str, str] | None:
    return _match(_parse(pattern), list(words), {})


def is_read_only(words: Sequence[str]) -> bool:
    """The one place that tells control commands that only read (``show ...``) from
    those that change state (``clear ...``, ``crypto gdoi ks rekey``, ``reload``).

    Anything that is not a ``show`` command counts as changing, including input
    that matches no command at all: an unknown word must never widen access.
    """
    return bool(words) and _word_matches(words[0], "show")


# Commands only one role serves: the other role names the right daemon instead of
# answering "% Invalid input" (a newcomer's likeliest mistake is the wrong socket).
KS_ONLY_COMMANDS = (
    "show crypto gdoi [group <group>] ks members",
    "show crypto gdoi [group <group>] ks coop",
    "show crypto gdoi [group <group>] ks replay",
    "show crypto gdoi [group <group>] ks",
    "show crypto gdoi [group <group>] feature <feature>",
    "show crypto gdoi feature <feature> [group <group>]",
    "show gdoid counters",
    "clear crypto gdoi [group <group>] ks members [now]",
    "crypto gdoi ks [group <group>] rekey [replace-now]",
)
GM_ONLY_COMMANDS = (
    "show crypto ipsec sa",
    "show crypto gdoi [group <group>] gm replay",
    "show crypto gdoi [group <group>] gm",
    "clear crypto gdoi [group <group>]",
)


def wrong_role(words: Sequence[str], role: str) -> str | None:
    """The refusal for a command of the other role (``role`` is "ks" or "gm"), else None."""
    other, this, patterns = (
        ("key-server", "a group member", KS_ONLY_COMMANDS)
        if role == "gm"
        else ("group-member", "a key server", GM_ONLY_COMMANDS)
    )
    if any(match(words, p) is not None for p in patterns):
        return f'% "{" ".join(words)}" is a {other} command; this is {this}'
    return None
