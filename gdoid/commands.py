"""IOS-style command words: the one grammar of every control command, with abbreviations.

Each :class:`Command` is a pattern of keywords, ``<parameters>``, ``[optional parts]``
and keyword choices ``<name:a|b>``.  :func:`parse` reads a command line against the
whole grammar the way the IOS parser does: a word selects the keyword it spells
exactly, else the one keyword it is a prefix of among those possible at that position
(``sh cry gdoi fea gm-rem`` is ``show crypto gdoi feature gm-removal``); a prefix of
several gives ``% Ambiguous command: "..."``, a line that stops early
``% Incomplete command.``, a word that fits nothing ``% Invalid input: ...``.

The grammar is the same for both daemons, so an abbreviation means the same thing on
a KS and a GM; a command of the other role gets a refusal that names the right daemon
(:func:`wrong_role`, a newcomer's likeliest mistake is the wrong socket).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gdoid.showtext import FEATURE_NAMES

Role = Literal["ks", "gm", "both"]

_TOKEN = re.compile(r"\[|\]|<[a-z_-]+(?::[a-z|-]+)?>|[^\s\[\]]+")


@dataclass(frozen=True)
class Keyword:
    """One of ``choices``; with a ``name``, the choice made is also a parameter."""

    choices: tuple[str, ...]
    name: str | None = None


@dataclass(frozen=True)
class Param:
    name: str


_Element = Keyword | Param


@dataclass(frozen=True)
class Command:
    pattern: str
    role: Role

    def sequences(self) -> list[tuple[_Element, ...]]:
        """Every linear form of the pattern (each optional part present or not)."""
        return _expand(_parse_pattern(self.pattern))


@dataclass(frozen=True)
class Match:
    command: Command
    params: dict[str, str] = field(default_factory=dict)
    keywords: tuple[str, ...] = ()  # the keywords matched, spelled out, in order


@dataclass(frozen=True)
class ParseError:
    """Why a line is no command: ``message`` is what the console prints."""

    message: str


# --- the grammar -------------------------------------------------------------------------

_FEATURE = f"<feature:{'|'.join(FEATURE_NAMES)}>"

SHOW_KS_MEMBERS = Command("show crypto gdoi [group <group>] ks members", "ks")
SHOW_KS_COOP = Command("show crypto gdoi [group <group>] ks coop", "ks")
SHOW_KS_REPLAY = Command("show crypto gdoi [group <group>] ks replay", "ks")
SHOW_KS = Command("show crypto gdoi [group <group>] ks", "ks")
SHOW_COUNTERS = Command("show gdoid counters", "ks")
CLEAR_KS_MEMBERS = Command("clear crypto gdoi [group <group>] ks members [now]", "ks")
KS_REKEY = Command("crypto gdoi ks [group <group>] rekey [replace-now]", "ks")

SHOW_IPSEC_SA = Command("show crypto ipsec sa", "gm")
SHOW_GM_REPLAY = Command("show crypto gdoi [group <group>] gm replay", "gm")
SHOW_GM = Command("show crypto gdoi [group <group>] gm", "gm")
CLEAR_GM = Command("clear crypto gdoi [group <group>]", "gm")

SHOW_GDOI = Command("show crypto gdoi [group <group>]", "both")
SHOW_FEATURE = Command(f"show crypto gdoi [group <group>] feature [{_FEATURE}]", "both")
SHOW_FEATURE_GROUP_AFTER = Command(f"show crypto gdoi feature [{_FEATURE}] group <group>", "both")
SHOW_HEALTH = Command("show gdoid health", "both")
RELOAD = Command("reload", "both")

# In order of preference when a line completes more than one.
COMMANDS: tuple[Command, ...] = (
    SHOW_KS_MEMBERS, SHOW_KS_COOP, SHOW_KS_REPLAY, SHOW_KS, SHOW_COUNTERS, CLEAR_KS_MEMBERS, KS_REKEY,
    SHOW_IPSEC_SA, SHOW_GM_REPLAY, SHOW_GM, CLEAR_GM,
    SHOW_GDOI, SHOW_FEATURE, SHOW_FEATURE_GROUP_AFTER, SHOW_HEALTH, RELOAD,
)  # fmt: skip
KS_ONLY_COMMANDS = tuple(c.pattern for c in COMMANDS if c.role == "ks")
GM_ONLY_COMMANDS = tuple(c.pattern for c in COMMANDS if c.role == "gm")
BOTH_ROLES_COMMANDS = tuple(c.pattern for c in COMMANDS if c.role == "both")


# --- patterns ----------------------------------------------------------------------------

_Node = _Element | tuple[str, list["_Node"]]  # ("opt", parts) for an optional part


def _parse_pattern(pattern: str) -> list[_Node]:
    stack: list[list[_Node]] = [[]]
    for tok in _TOKEN.findall(pattern):
        if tok == "[":
            stack.append([])
        elif tok == "]":
            group = stack.pop()
            stack[-1].append(("opt", group))
        elif tok.startswith("<") and ":" in tok:
            name, choices = tok[1:-1].split(":")
            stack[-1].append(Keyword(tuple(choices.split("|")), name))
        elif tok.startswith("<"):
            stack[-1].append(Param(tok[1:-1]))
        else:
            stack[-1].append(Keyword((tok,)))
    if len(stack) != 1:
        raise ValueError(f"unbalanced pattern {pattern!r}")
    return stack[0]


def _expand(nodes: list[_Node]) -> list[tuple[_Element, ...]]:
    forms: list[list[tuple[_Element, ...]]] = []
    for node in nodes:
        if isinstance(node, tuple):
            forms.append([(), *_expand(node[1])])
        else:
            forms.append([(node,)])
    return [tuple(itertools.chain.from_iterable(p)) for p in itertools.product(*forms)]


@dataclass(frozen=True)
class _State:
    order: int  # the command's place in the grammar
    command: Command
    seq: tuple[_Element, ...]
    pos: int = 0
    params: tuple[tuple[str, str], ...] = ()
    keywords: tuple[str, ...] = ()

    @property
    def next(self) -> _Element | None:
        return self.seq[self.pos] if self.pos < len(self.seq) else None


def _start(commands: Sequence[Command]) -> Iterator[_State]:
    for i, c in enumerate(commands):
        for seq in c.sequences():
            yield _State(i, c, seq)


def _resolve(word: str, keywords: set[str]) -> set[str] | None:
    """The keyword ``word`` selects (an exact spelling wins, else a unique prefix), as a set
    of at most one; None when it is a prefix of several."""
    w = word.lower()
    if w in keywords:
        return {w}
    found = {k for k in keywords if k.startswith(w)}
    return found if len(found) <= 1 else None


def parse(words: Sequence[str], commands: Sequence[Command] = COMMANDS) -> Match | ParseError:
    """The command ``words`` spell, with its parameters, or the IOS error for them."""
    states = list(_start(commands))
    for i, word in enumerate(words):
        live = [s for s in states if s.next is not None]
        keywords = {k for s in live if isinstance(s.next, Keyword) for k in s.next.choices}
        chosen = _resolve(word, keywords)
        if chosen is None:
            if not any(isinstance(s.next, Param) for s in live):
                return ParseError(f'% Ambiguous command: "{" ".join(words[: i + 1])}"')
            chosen = set()  # not a keyword, then: a parameter's value
        states = []
        for s in live:
            el = s.next
            if isinstance(el, Param):
                states.append(_advance(s, (el.name, word), None))
            elif isinstance(el, Keyword):
                hit = next((k for k in el.choices if k in chosen), None)
                if hit is not None:
                    states.append(_advance(s, (el.name, hit) if el.name else None, hit))
        if not states:
            return ParseError(f"% Invalid input: {' '.join(words)}")
    done = [s for s in states if s.next is None]
    if not done:
        return ParseError("% Incomplete command.")
    best = min(done, key=lambda s: s.order)
    return Match(best.command, dict(best.params), best.keywords)


def _advance(s: _State, param: tuple[str, str] | None, keyword: str | None) -> _State:
    return _State(
        s.order, s.command, s.seq, s.pos + 1,
        s.params + ((param,) if param else ()),
        s.keywords + ((keyword,) if keyword else ()),
    )  # fmt: skip


def match(words: Sequence[str], pattern: str) -> dict[str, str] | None:
    """The parameters of ``words`` read as this one pattern (abbreviations as in :func:`parse`),
    with ``now`` / ``replace-now`` set to "yes" when given; None if they are not it."""
    m = parse(words, (Command(pattern, "both"),))
    if isinstance(m, ParseError):
        return None
    flags = {k: "yes" for k in m.keywords if k in ("now", "replace-now")}
    return {**m.params, **flags}


def is_read_only(words: Sequence[str]) -> bool:
    """The one place that tells control commands that only read (``show ...``) from
    those that change state (``clear ...``, ``crypto gdoi ks rekey``, ``reload``).

    Anything that is not a ``show`` command counts as changing, including input
    that matches no command at all: an unknown word must never widen access.
    """
    if not words:
        return False
    first = {c.pattern.split()[0] for c in COMMANDS}
    return _resolve(words[0], first) == {"show"}


def wrong_role(words: Sequence[str], role: str) -> str | None:
    """The refusal for a command of the other role (``role`` is "ks" or "gm"), else None."""
    m = parse(words)
    if isinstance(m, ParseError) or m.command.role in ("both", role):
        return None
    other, this = (
        ("key-server", "a group member") if role == "gm" else ("group-member", "a key server")
    )
    return f'% "{" ".join(words)}" is a {other} command; this is {this}'


def for_role(words: Sequence[str], role: Literal["ks", "gm"]) -> Match | ParseError:
    """:func:`parse`, with a command of the other role refused as :func:`wrong_role` says."""
    m = parse(words)
    if isinstance(m, Match) and m.command.role not in ("both", role):
        refusal = wrong_role(words, role)
        assert refusal is not None
        return ParseError(refusal)
    return m
