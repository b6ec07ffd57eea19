"""The keyword pre-check never hides a match: a pattern's required literal is in every text
the pattern matches (on the folded text for case-insensitive patterns)."""

from __future__ import annotations

import re
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from rules.prefilter import fold, required_literals


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
