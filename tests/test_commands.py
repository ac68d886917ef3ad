"""The command grammar (gdoid/commands.py): IOS abbreviations, ambiguity, roles."""

from __future__ import annotations

import pytest

from gdoid import commands
from gdoid.commands import (
    COMMANDS,
    Keyword,
    Match,
    ParseError,
    is_read_only,
    match,
    parse,
    wrong_role,
)


def words(line: str) -> list[str]:
    return line.split()


def _parsed(line: str) -> Match:
    m = parse(line.split())
    assert isinstance(m, Match), m
    return m


@pytest.mark.parametrize(
    ("line", "command", "params"),
    [
        ("sh cry gdoi fea gm-rem", commands.SHOW_FEATURE, {"feature": "gm-removal"}),
        ("sh cry gdoi fea po", commands.SHOW_FEATURE, {"feature": "policy-replace"}),
        ("sh cry gdoi fea", commands.SHOW_FEATURE, {}),
        (
            "sh cry gdoi fea gm-removal gr GET",
            commands.SHOW_FEATURE_GROUP_AFTER,
            {"feature": "gm-removal", "group": "GET"},
        ),
        (
            "sh cry gdoi gr GET fea p",
            commands.SHOW_FEATURE,
            {"group": "GET", "feature": "policy-replace"},
        ),
        ("s c gd k mem", commands.SHOW_KS_MEMBERS, {}),
        ("sh cry gdoi gr Branch-1 ks m", commands.SHOW_KS_MEMBERS, {"group": "Branch-1"}),
        ("sh cry gdoi ks co", commands.SHOW_KS_COOP, {}),
        ("sh cry gdoi ks rep", commands.SHOW_KS_REPLAY, {}),
        ("sh cry gdoi ks", commands.SHOW_KS, {}),
        ("sh gdoid c", commands.SHOW_COUNTERS, {}),
        ("sh gdoid h", commands.SHOW_HEALTH, {}),
        ("cl cry gd ks mem now", commands.CLEAR_KS_MEMBERS, {}),
        ("cry gd ks gr GET rek rep", commands.KS_REKEY, {"group": "GET"}),
        ("sh cry ip sa", commands.SHOW_IPSEC_SA, {}),
        ("sh cry gdoi gm rep", commands.SHOW_GM_REPLAY, {}),
        ("sh cry gdoi gm", commands.SHOW_GM, {}),
        ("cl cry gd gr GET", commands.CLEAR_GM, {"group": "GET"}),
        ("SHOW CRYPTO GDOI", commands.SHOW_GDOI, {}),  # keywords are case-insensitive
        ("rel", commands.RELOAD, {}),
    ],
)
def test_every_keyword_abbreviates_to_a_unique_prefix(
    line: str, command: commands.Command, params: dict[str, str]
) -> None:
    m = _parsed(line)
    assert (m.command, m.params) == (command, params)


def test_flags_are_the_keywords_spelled_out() -> None:
    assert "now" in _parsed("cl cry gd ks mem n").keywords
    assert "now" not in _parsed("cl cry gd ks mem").keywords
    assert "replace-now" in _parsed("cry gd ks rek r").keywords


@pytest.mark.parametrize(
    "line",
    [
        "sh cry gdoi g",  # group, gm
        "sh cry gdoi fea g",  # gm-removal, group
        "c",  # clear, crypto
    ],
)
def test_a_prefix_of_several_keywords_is_ambiguous(line: str) -> None:
    assert parse(line.split()) == ParseError(f'% Ambiguous command: "{line}"')


def test_ambiguity_is_reported_at_the_first_ambiguous_word() -> None:
    assert parse(words("sh cry gdoi g GET ks")) == ParseError(
        '% Ambiguous command: "sh cry gdoi g"'
    )


def test_an_exact_keyword_wins_over_longer_ones_it_prefixes() -> None:
    # "gm" is a keyword and a prefix of "gm-removal": after "feature" only the latter fits.
    assert _parsed("sh cry gdoi gm").command == commands.SHOW_GM
    assert _parsed("sh cry gdoi fea gm").params == {"feature": "gm-removal"}


def test_parameters_keep_their_case_and_take_any_word() -> None:
    assert _parsed("sh cry gdoi gr ks ks mem").params == {"group": "ks"}
    assert _parsed("sh cry gdoi gr g").params == {"group": "g"}  # a value, not ambiguous


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sh cry", "% Incomplete command."),
        ("sh cry gdoi gr", "% Incomplete command."),
        ("show bogus", "% Invalid input: show bogus"),
        ("sh cry gdoi fea removal", "% Invalid input: sh cry gdoi fea removal"),
        ("reload now", "% Invalid input: reload now"),
    ],
)
def test_incomplete_and_invalid(line: str, message: str) -> None:
    assert parse(line.split()) == ParseError(message)


def test_every_command_is_reachable_spelled_out() -> None:
    for c in COMMANDS:
        for seq in c.sequences():
            words = [el.choices[0] if isinstance(el, Keyword) else "X" for el in seq]
            m = parse(words)
            assert isinstance(m, Match) and m.command == c, (c.pattern, words, m)


def test_match_one_pattern() -> None:
    assert match(words("sh cry gdoi gr GET ks mem"), commands.SHOW_KS_MEMBERS.pattern) == {
        "group": "GET"
    }
    assert match(words("cl cry gd ks mem now"), commands.CLEAR_KS_MEMBERS.pattern) == {"now": "yes"}
    assert match(words("sh cry gdoi"), commands.SHOW_KS_MEMBERS.pattern) is None


def test_read_only_is_show_however_abbreviated() -> None:
    assert is_read_only(["s", "c", "g"]) and is_read_only(["SH"])
    assert not is_read_only(["clear", "crypto", "gdoi"])
    assert not is_read_only(["shx"]) and not is_read_only([])


def test_wrong_role_names_the_other_daemon() -> None:
    assert wrong_role(words("sh cry ip sa"), "ks") == (
        '% "sh cry ip sa" is a group-member command; this is a key server'
    )
    assert wrong_role(words("cl cry gd ks mem"), "gm") == (
        '% "cl cry gd ks mem" is a key-server command; this is a group member'
    )
    assert wrong_role(words("sh cry gdoi fea"), "gm") is None  # both roles serve it
    assert wrong_role(words("sh cry gdoi ks"), "ks") is None
