"""A cheap pre-check for regular-expression conditions: the literal text a match must contain.

Most regular expressions in routing files are keywords (``text ~ "(?i)kündig"``,
``subject ~ "\\bstorno"``): a match needs a literal run of characters, and a C-level substring
test (``"storno" in subject``) rules the rule out for nearly every contact at a fraction of a
search's cost. Only when the literal is there is the expression itself searched, so the result
is exactly the expression's.

:func:`required_literal` is deliberately conservative: it reads only the pattern's leading part
(up to the first group, class or alternation), and gives up (None) on anything it does not
understand, so a literal it returns is one every match contains. Case-insensitive patterns
are compared on :func:`fold`-ed text.
"""

from __future__ import annotations

import re
import string

#: The non-ASCII characters Python's ``re`` matches against an ASCII letter with IGNORECASE
#: (found by trying every code point; tests/rules/test_prefilter.py checks it again), mapped
#: to that letter, so ``fold`` keeps every case-insensitive match of an ASCII literal.
_TO_ASCII = {0x130: "i", 0x131: "i", 0x17F: "s", 0x212A: "k"}
_FLAGS = re.compile(r"\(\?([aimsu]+)\)")
# Characters that stand for themselves in a pattern outside a class.
_PLAIN = frozenset(string.ascii_letters + string.digits + " _-@:/,;'\"!%&=<>~`#")
_ZERO_WIDTH = frozenset("bBAZ")
_QUANTIFIERS = frozenset("*?{")


def fold(text: str) -> str:
    """``text`` for a substring test against a lower-case ASCII literal of a (?i) pattern."""
    if text.isascii():
        return text.lower()
    return text.translate(_TO_ASCII).lower()


def required_literal(pattern: str) -> tuple[str, bool] | None:
    """The longest literal every match of ``pattern`` contains, and whether it is
    compared case-insensitively (then it is lower case); None when none is certain.

    >>> required_literal(r"(?i)stichwort1\\b")
    ('stichwort1', True)
    >>> required_literal(r"\\bstorno|cancel") is None
    True
    """
    flags = ""
    rest = pattern
    while (m := _FLAGS.match(rest)) is not None:
        flags += m.group(1)
        rest = rest[m.end() :]
    if "|" in rest:
        return None  # an alternative anywhere may avoid any literal
    icase = "i" in flags
    runs: list[str] = []
    run: list[str] = []
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch in _PLAIN or (not ch.isascii() and not icase):
            run.append(ch)  # a non-ASCII character is never special; exact without (?i)
            i += 1
        elif ch == "\\" and i + 1 < len(rest):
            nxt = rest[i + 1]
            if nxt in _ZERO_WIDTH:
                runs.append("".join(run))  # \b between letters: both sides still needed
                run = []
            elif not nxt.isalnum() and nxt.isascii():
                run.append(nxt)  # an escaped punctuation character stands for itself
            else:
                break  # \d, \w, \1 ...: stop reading
            i += 2
        elif ch == "^":
            runs.append("".join(run))  # zero-width, like \A
            run = []
            i += 1
        elif ch in _QUANTIFIERS:
            if run:
                run.pop()  # the character before may be absent
            break
        elif ch == "+":
            break  # the character before is there at least once: keep it, stop reading
        else:
            break  # a group, a class, ".", "^", "$": stop reading
    runs.append("".join(run))
    best = max(runs, key=len)
    if not best:
        return None
    return (best.lower(), True) if icase else (best, False)
