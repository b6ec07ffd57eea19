"""Turning an email body into the text a router rule should see.

Two jobs: HTML to plain text (with the standard library's :mod:`html.parser`, for mails that
have no text/plain part) and trimming what the customer did not write in this message: quoted
replies and signatures. Both are heuristics; they err on the side of keeping text, because a
rule that misses a word is worse than a rule that sees a line of quote.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

# Tags after which a reader sees a line break; without them "<p>a</p><p>b</p>" would become "ab".
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "footer",
        "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol",
        "p", "pre", "section", "table", "td", "th", "tr", "ul",
    }
)  # fmt: skip
# Content that is never shown to a reader.
_HIDDEN_TAGS = frozenset({"head", "script", "style", "template", "title"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0
        self._quoted = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden += 1
        elif tag == "blockquote":
            # Mail clients put the quoted original in a blockquote; mark it like "> " text so
            # that the same trimming removes it.
            self._quoted += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden = max(0, self._hidden - 1)
        elif tag == "blockquote":
            self._quoted = max(0, self._quoted - 1)
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        if self._quoted:
            lines = data.split("\n")
            data = "\n".join("> " + line if line.strip() else line for line in lines)
        self.parts.append(data)


# html.parser needs time quadratic in the length of some malformed input ("<a<a<a...",
# "<!--<!--..."): about 1 s for 30 000 such characters here, 80 s for 400 000. So the <head>
# (Outlook puts tens of kilobytes of style there) is skipped and only the first MAX_HTML
# characters of the body are read: a customer's words come first, and the text is cut to
# max_text (4 000 by default) afterwards anyway.
MAX_HTML = 30_000


def html_to_text(html: str) -> str:
    """The visible text of an HTML mail body, one line per block, blank runs squeezed.

    Only the first :data:`MAX_HTML` characters from ``<body`` on (or from the start, without a
    body tag) are read.
    """
    body_at = html.lower().find("<body")
    if body_at > 0:
        html = html[body_at:]
    parser = _TextExtractor()
    parser.feed(html[:MAX_HTML])
    parser.close()
    lines: list[str] = []
    for raw in "".join(parser.parts).split("\n"):
        line = " ".join(raw.split())  # HTML collapses runs of white space, so do we
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()


# "On Mon, 5 Mar 2012, Jeff King wrote:" (often wrapped over two lines), "Am 05.03.2012 um
# 12:58 schrieb Jeff King:", "Le 5 mars 2012 à 12:58, Jeff King a écrit :".
_ATTRIBUTION = re.compile(
    r"^(?:on\s.+\swrote|am\s.+\sschrieb.*|le\s.+\sa\s+écrit)\s*:\s*$", re.IGNORECASE
)
# Outlook and friends quote without ">" but after a separator line.
_FORWARD_SEPARATOR = re.compile(
    r"^-{2,}\s*(?:original message|ursprüngliche nachricht|message d'origine)\s*-{2,}$",
    re.IGNORECASE,
)


def _is_attribution(text: str) -> bool:
    # The endswith test first: it rules out almost every line, and on the rest the regex's
    # backtracking ends at the final colon instead of trying every "wrote"/"schrieb".
    return text.endswith(":") and _ATTRIBUTION.match(text) is not None


def _cut_index(lines: list[str]) -> int:
    """Index of the first line that starts quoted history or a signature; len(lines) if none."""
    for i, line in enumerate(lines):
        stripped = line.strip()
        # RFC 3676 signature separator "-- " (mailers often lose the trailing space)
        if stripped == "--" and line.startswith("--"):
            return i
        if _FORWARD_SEPARATOR.match(stripped) or _is_attribution(stripped):
            return i
        # Gmail wraps a long attribution: "On Wed, ... Support" / "<addr> wrote:"
        wrapped = i + 1 < len(lines) and stripped.lower().startswith(("on ", "am ", "le "))
        if wrapped and _is_attribution(stripped + " " + lines[i + 1].strip()):
            return i
    return len(lines)


def trim_reply(text: str) -> str:
    """``text`` without quoted lines, the attribution line above them, and the signature.

    Everything from an attribution ("On ... wrote:", "Am ... schrieb ...:"), a forwarded-
    message separator or a ``-- `` signature line onwards is dropped, as are lines starting
    with ``>``. If nothing would remain (a mail that is only a quote), the text is returned
    untrimmed: losing the whole message is worse than keeping a quote.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    kept = [line for line in lines[: _cut_index(lines)] if not line.lstrip().startswith(">")]
    trimmed = "\n".join(kept).strip()
    # Squeeze the blank lines that removed quotes leave behind.
    trimmed = re.sub(r"\n{3,}", "\n\n", trimmed)
    return trimmed if trimmed else text.strip()
