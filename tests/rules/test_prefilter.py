"""The pre-checks never hide a match: a pattern's required literal is in every text the
pattern matches (on the folded text for case-insensitive patterns), and patterns pooled into
one search match a text exactly when one of them does."""

from __future__ import annotations

import re
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from rules.prefilter import any_literal, any_of, fold, required_literals, scoped


def test_fold_knows_every_non_ascii_character_re_matches_to_an_ascii_letter() -> None:
    ascii_letter = re.compile("(?i)[a-z]").fullmatch
    for cp in range(128, sys.maxunicode + 1):
        c = chr(cp)
        if ascii_letter(c):
            # Whatever letter re says it matches, the folded character is that letter.
            letter = next(x for x in "abcdefghijklmnopqrstuvwxyz" if re.fullmatch(f"(?i){x}", c))
            assert fold(c) == letter, hex(cp)


pieces = st.sampled_from(
    [
        "a",
        "b",
        "K",
        "s",
        "i",
        "ü",
        " ",
        "-",
        "\\.",
        "\\b",
        "\\d",
        "x*",
        "y?",
        "z+",
        "(?:ab)?",
        "[ab]",
        ".",
        "^",
        "$",
        "|",
        "c{2}",
        "\\w+",
        "(k|s)",
        "é",
    ]
)
patterns = st.tuples(st.sampled_from(["", "(?i)", "(?m)", "(?is)"]), st.lists(pieces, max_size=6))
texts = st.text(alphabet=st.sampled_from("abKksSiIüÜ -.1xyzcé\nſıİK"), max_size=12)


@settings(max_examples=400, deadline=None)
@given(pattern=patterns, text=texts)
def test_every_match_contains_the_required_literal(
    pattern: tuple[str, list[str]], text: str
) -> None:
    source = pattern[0] + "".join(pattern[1])
    try:
        compiled = re.compile(source)
    except re.error:
        return
    found = required_literals(source)
    if found is None or compiled.search(text) is None:
        return
    literals, icase = found
    assert any(literal in (fold(text) if icase else text) for literal in literals)


def test_keywords_give_their_literals() -> None:
    assert required_literals(r"(?i)stichwort1\b") == (("stichwort1",), True)
    assert required_literals(r"\bStorno") == (("Storno",), False)
    assert required_literals("colou?r") == (("colo",), False)
    assert required_literals("(?i)Storno|Kündigung") == (("storno", "k"), True)
    assert required_literals("storno|can(cel)") is None
    assert required_literals("storno|x*") is None
    assert required_literals("(?x) s t o r n o") is None


@settings(max_examples=400, deadline=None)
@given(members=st.lists(patterns, min_size=1, max_size=4), text=texts)
def test_pooled_patterns_match_exactly_when_one_of_them_does(
    members: list[tuple[str, list[str]]], text: str
) -> None:
    sources = []
    for flags, parts in members:
        try:
            re.compile(flags + "".join(parts))
        except re.error:
            continue
        sources.append(flags + "".join(parts))
    pieces = [p for p in map(scoped, sources) if p is not None]
    if not pieces:
        return
    pooled = any_of(pieces).search(text) is not None
    alone = any(re.search(src, text) for src in sources if scoped(src) is not None)
    assert pooled == alone


def test_patterns_with_group_references_or_verbose_mode_are_not_pooled() -> None:
    # Joined to others their group numbers would shift, or a comment would swallow the rest.
    assert scoped(r"(a)\1") is None
    assert scoped(r"(?P<x>a)(?P=x)") is None
    assert scoped("(?x) a  # comment") is None
    assert scoped("(?i)storno|kündig") == "(?i:storno|kündig)"


@given(literals=st.lists(st.text("ab.*|", min_size=1, max_size=3), min_size=1), text=texts)
def test_pooled_literals_are_found_as_the_in_operator_finds_them(
    literals: list[str], text: str
) -> None:
    found = any_literal(literals).search(text) is not None
    assert found == any(literal in text for literal in literals)
