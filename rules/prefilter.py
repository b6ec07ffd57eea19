"""A cheap pre-check for regular-expression conditions: the literal text a match must contain.

Most regular expressions in routing files are keywords (``text ~ "(?i)kündig"``,
``subject ~ "\\bstorno"``): a match needs a literal run of characters, and a C-level substring
test (``"storno" in subject``) rules the rule out for nearly every contact at a fraction of a
search's cost. Only when the literal is there is the expression itself searched, so the result
is exactly the expression's.

:func:`required_literals` is deliberately conservative: it reads only the pattern's leading part
(up to the first group, class or alternation), and gives up (None) on anything it does not
understand, so every match contains one of the literals it returns. Case-insensitive patterns
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


def required_literals(pattern: str) -> tuple[tuple[str, ...], bool] | None:
    """Literals one of which every match of ``pattern`` contains, and whether they are
    compared case-insensitively (then they are lower case); None when that is not certain.

    A top-level alternation of plain alternatives (``(?i)kündig|storno``) gives one literal
    per alternative; anything else gives at most one.

    >>> required_literals(r"(?i)stichwort1\\b")
    (('stichwort1',), True)
    >>> required_literals(r"(?i)rechnung|vertrag")
    (('rechnung', 'vertrag'), True)
    >>> required_literals(r"storno|.*") is None
    True
    """
    flags = ""
    rest = pattern
    while (m := _FLAGS.match(rest)) is not None:
        flags += m.group(1)
        rest = rest[m.end() :]
    icase = "i" in flags
    if "|" in rest:
        if any(c in rest for c in "()[]\\"):
            return None  # "|" may be inside a group or escaped: not a plain list
        found = [_leading_literal(alt, icase) for alt in rest.split("|")]
        if not all(found):
            return None  # an alternative without a literal may match anything
        literals = tuple(f for f in found if f)
    else:
        literal = _leading_literal(rest, icase)
        if not literal:
            return None
        literals = (literal,)
    return (tuple(lit.lower() for lit in literals), True) if icase else (literals, False)


def _leading_literal(rest: str, icase: bool) -> str:
    """The longest literal run in the pattern's leading part (no flags, no alternation)."""
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
    return max(runs, key=len)


# A global flag group at the start (``(?i)``), which becomes a scoped group when combined.
_LEADING_FLAGS = re.compile(r"\(\?([aiLmsux]+)\)")
# Group numbers and names shift or clash when patterns are joined: such patterns stay alone.
_REFERENCES = re.compile(r"\\[0-9]|\\g|\(\?P[=<]|\(\?<|\(\?\(")


def scoped(pattern: str) -> str | None:
    """``pattern`` as a self-contained alternative of a larger expression, such that a search
    of the alternation finds a match exactly when one of its patterns has one; None when that
    is not certain (back-references, named groups, verbose mode) or it does not compile.

    >>> scoped(r"(?i)^\\s*(kein|nie)")
    '(?i:^\\\\s*(kein|nie))'
    """
    flags = ""
    rest = pattern
    while (m := _LEADING_FLAGS.match(rest)) is not None:
        flags += m.group(1)
        rest = rest[m.end() :]
    if "x" in flags or "L" in flags or _REFERENCES.search(rest):
        return None
    piece = f"(?{flags}:{rest})" if flags else f"(?:{rest})"
    try:
        re.compile(piece)
    except re.error:
        return None
    return piece


def any_of(pieces: list[str]) -> re.Pattern[str]:
    """One expression that matches where any of the :func:`scoped` ``pieces`` does."""
    return re.compile("|".join(dict.fromkeys(pieces)))


def any_literal(literals: list[str]) -> re.Pattern[str]:
    """One expression that matches where any of ``literals`` occurs (exact, as ``in``)."""
    return re.compile("|".join(re.escape(lit) for lit in dict.fromkeys(literals)))
