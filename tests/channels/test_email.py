"""The email decoder against the real samples and constructed fixtures (tests/fixtures/email)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.base import DecodeConfig, Rejected
from channels.contact_event import Attachment, ContactEvent
from channels.email import decode_email, reply_message_id, thread_of
from channels.email_text import html_to_text, trim_reply

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SAMPLES = FIXTURES / "samples" / "email"
CONSTRUCTED = FIXTURES / "email"
CONFIG = DecodeConfig()


def load(path: Path, config: DecodeConfig = CONFIG) -> ContactEvent:
    events = decode_email(path.read_bytes(), {}, config)
    assert len(events) == 1
    return events[0]


def epoch(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


# ------------------------------------------------------------------ real samples


def test_git_reply_decodes_encoded_words_and_joins_the_thread_root() -> None:
    event = load(SAMPLES / "reply-encoded-words.eml")
    root = "FECFDD4D-6EC3-4DE1-8A08-B4477345C4AA@habr.de"
    assert event.kind == "update"
    assert event.channel == "email" and event.source == "email"
    assert event.contact_id == f"email:{root}"
    assert event.external_id == root and event.thread_id == root
    assert event.attributes["message_id"] == "0E2B8DE3-1ABD-453F-BCAA-0D693ECA5987@habr.de"
    assert event.attributes["in_reply_to"] == "20120305115815.GA4550@sigill.intra.peff.net"
    assert event.sender.name == "René Haber"
    assert event.sender.email == "rene@habr.de"
    assert event.to == "peff@peff.net"
    assert event.subject == "Re: Bug: pull --rebase with é in name"
    assert event.occurred_at == epoch(2012, 3, 5, 12, 46, 39)  # 13:46:39 +0100


def test_git_reply_body_is_the_first_plain_part_in_latin1() -> None:
    event = load(SAMPLES / "reply-encoded-words.eml")
    assert event.text is not None
    assert event.text.startswith("GIT_AUTHOR_NAME='Ren'é Haber\nGIT_AUTHOR_EMAIL='rene@habr.de'")
    assert event.text.endswith("Doing a git rebase -i HEAD~5 or so works.")
    # the quoted history after the attachment is not the customer's new text
    assert "schrieb" not in event.text and "Peff" not in event.text


def test_git_reply_lists_the_attachment_with_its_decoded_size() -> None:
    event = load(SAMPLES / "reply-encoded-words.eml")
    # one 66-character hexdump line plus its newline (7bit, so decoded == encoded)
    assert event.attachments == (
        Attachment(filename="16b9441.commit", content_type="application/octet-stream", size=67),
    )


def test_mailing_list_precedence_bulk_is_tagged_bulk_not_auto_reply() -> None:
    event = load(SAMPLES / "reply-encoded-words.eml")
    assert event.tags == ("bulk",)
    assert event.attributes["list_id"] == "git.vger.kernel.org"


def test_multipart_encodings_picks_the_first_plain_text_part() -> None:
    event = load(SAMPLES / "multipart-encodings.eml")
    assert event.text == "This is a 7bit encoded message."
    assert event.kind == "new"
    assert event.sender.email == "barry@python.org"
    assert event.sender.name == "Barry Warsaw"
    assert event.to == "cravindogs@cravindogs.com"
    assert event.subject == "Lyrics"
    assert event.occurred_at == epoch(2001, 4, 20, 23, 35, 2)  # 19:35:02 -0400
    # text parts without a filename or attachment disposition are not attachments
    assert event.attachments == ()
    assert event.tags == ()


def test_message_without_any_id_gets_a_stable_generated_thread() -> None:
    first = load(SAMPLES / "multipart-encodings.eml")
    again = load(SAMPLES / "multipart-encodings.eml")
    assert first.external_id.startswith("generated-")
    assert first.external_id == again.external_id
    assert first.attributes["message_id"] == first.external_id
    other = (SAMPLES / "multipart-encodings.eml").read_bytes().replace(b"Lyrics", b"Other")
    assert decode_email(other, {}, CONFIG)[0].external_id != first.external_id


# ------------------------------------------------------------------ constructed fixtures


def test_html_only_mail_becomes_plain_text_with_umlauts() -> None:
    event = load(CONSTRUCTED / "html-only-de.eml")
    assert event.text == (
        "Hallo,\n\ndie Rechnung für März ist um 12,30 Euro zu hoch & doppelt.\nBitte prüfen."
    )
    assert event.sender.name == "Jürgen Müller"
    assert event.sender.email == "juergen.mueller@example.de"
    assert event.to == "service@stellwerk.example"
    assert event.subject == "Rechnung für März stimmt nicht"
    assert event.language == "de-DE"
    assert event.kind == "new"
    assert event.contact_id == "email:html-only-1@mail.example.de"


def test_quotes_attribution_and_signature_are_trimmed() -> None:
    event = load(CONSTRUCTED / "reply-quoted-signature.eml")
    assert event.text == "Danke, der Neustart hat nicht geholfen. Die LED blinkt weiter rot."
    assert event.sender.name == "Weber, Anna"
    assert event.thread_id == "ticket-4711-answer@stellwerk.example"
    assert event.kind == "update"
    assert event.occurred_at == epoch(2026, 3, 4, 18, 2, 11)  # "-0000" is read as UTC


def test_german_attribution_and_inline_quote_are_trimmed() -> None:
    event = load(CONSTRUCTED / "reply-german-inline.eml")
    assert event.text == "Die Vertragsnummer ist 12345."
    assert event.thread_id == "root-1@stellwerk.example"  # References wins over In-Reply-To
    assert event.attributes["message_id"] == "aw-3@crowd.example"


def test_auto_reply_is_tagged() -> None:
    event = load(CONSTRUCTED / "auto-reply.eml")
    assert event.tags == ("auto_reply",)
    assert event.thread_id == "ticket-99@stellwerk.example"


def test_delivery_report_is_tagged_bounce() -> None:
    event = load(CONSTRUCTED / "bounce-dsn.eml")
    assert event.tags == ("bounce",)
    assert event.sender.email == "mailer-daemon@mx.stellwerk.example"
    assert event.text == "The mail system could not deliver your message to <nobody@example.net>."


HEADERS = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: s\r\nMessage-ID: <m@x>\r\n"


@pytest.mark.parametrize(
    ("extra", "tags"),
    [
        (b"Auto-Submitted: auto-generated\r\n", ("auto_reply",)),
        (b"Auto-Submitted: no\r\n", ()),
        (b"X-Autorespond: vacation\r\n", ("auto_reply",)),
        (b"Precedence: junk\r\n", ("bulk",)),
        (b"Precedence: auto_reply\r\n", ("auto_reply",)),
    ],
)
def test_auto_reply_headers(extra: bytes, tags: tuple[str, ...]) -> None:
    event = decode_email(HEADERS + extra + b"\r\nhello\r\n", {}, CONFIG)[0]
    assert event.tags == tags


def test_missing_date_is_zero_and_broken_date_does_not_reject() -> None:
    assert decode_email(HEADERS + b"\r\nhi\r\n", {}, CONFIG)[0].occurred_at == 0.0
    broken = HEADERS + b"Date: next tuesday-ish\r\n\r\nhi\r\n"
    assert decode_email(broken, {}, CONFIG)[0].occurred_at == 0.0


def test_text_is_bounded_by_max_text() -> None:
    body = HEADERS + b"\r\n" + b"x" * 500 + b"\r\n"
    event = decode_email(body, {}, DecodeConfig(max_text=100))[0]
    assert event.text == "x" * 100


def test_unknown_charset_still_yields_text() -> None:
    body = (
        HEADERS
        + b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    )
    assert decode_email(body, {}, CONFIG)[0].text == "Grüße"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   \r\n",
        b"just a line of text without any header\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
        b"X-Random: 1\r\n\r\nno core header",
    ],
)
def test_not_an_email_is_rejected(body: bytes) -> None:
    with pytest.raises(Rejected) as caught:
        decode_email(body, {}, CONFIG)
    assert caught.value.reason == "not_email"
    assert caught.value.source == "email"


# ------------------------------------------------------------------ text helpers


def test_trim_keeps_a_mail_that_is_only_a_quote() -> None:
    assert trim_reply("> only quoted\n> text") == "> only quoted\n> text"


def test_crlf_mail_that_is_only_a_quote_keeps_it_with_plain_newlines() -> None:
    body = HEADERS + b"\r\n> line one\r\n> line two\r\n"
    assert decode_email(body, {}, CONFIG)[0].text == "> line one\n> line two"


def test_trim_keeps_ordinary_double_dash_prose() -> None:
    assert trim_reply("Preis -- wie besprochen -- ok") == "Preis -- wie besprochen -- ok"


def test_trim_cuts_outlook_original_message() -> None:
    text = "Bitte kündigen.\n\n-----Ursprüngliche Nachricht-----\nVon: Support\nBetreff: x"
    assert trim_reply(text) == "Bitte kündigen."


def test_html_to_text_drops_hidden_content_and_decodes_entities() -> None:
    html = "<div>A&amp;B</div><style>x{}</style><ul><li>eins</li><li>zwei</li></ul>"
    assert html_to_text(html) == "A&B\n\neins\n\nzwei"


def test_a_large_html_head_does_not_hide_the_body() -> None:
    html = "<html><head><style>" + "p{margin:0}" * 10_000 + "</style></head>"
    assert html_to_text(html + "<BODY><p>Kündigung bitte</p></BODY></html>") == "Kündigung bitte"


@pytest.mark.timeout(15)
@pytest.mark.parametrize("html", ["<a" * 200_000, "<!--" * 100_000, "<![CDATA[" * 50_000])
def test_pathological_html_is_read_in_bounded_time(html: str) -> None:
    # unbounded, html.parser needs minutes for these (its time is quadratic in them)
    assert isinstance(html_to_text(html), str)


@pytest.mark.timeout(15)
def test_pathological_attribution_lines_are_trimmed_in_bounded_time() -> None:
    text = "Hallo\n" + ("am" + " schrieb" * 40 + "\n") * 5000 + "am " + " schrieb" * 20_000
    assert trim_reply(text).startswith("Hallo\nam schrieb")


# ------------------------------------------------------------------ robustness


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "body",
    [
        # the legacy address parser recursed once per "(" and raised RecursionError
        b"From: " + b"(" * 20_000 + b"\r\nSubject: x\r\n\r\nb",
        # these took 18 s, 20 s and 10 s in the standard library's header parser, unbounded
        b"From: a@b\r\nSubject: " + b"=?utf-8?q?a?= " * 20_000 + b"\r\n\r\nb",
        b"From: a@b\r\nContent-Type: text/plain; " + b"a=b; " * 20_000 + b"\r\n\r\nb",
        b"From: a@b\r\nTo: " + b"\\\\" * 20_000 + b"\r\n\r\nb",
    ],
    ids=["from-parens", "subject-encoded-words", "content-type-params", "to-backslashes"],
)
def test_hostile_headers_decode_in_bounded_time(body: bytes) -> None:
    [event] = decode_email(body, {}, CONFIG)
    assert event.kind == "new"


def test_long_to_list_keeps_the_first_address() -> None:
    to = b", ".join(b"person%d@example.org" % i for i in range(2000))
    body = b"From: a@b.example\r\nTo: First <First@Example.org>, " + to + b"\r\n\r\nhi\r\n"
    assert decode_email(body, {}, CONFIG)[0].to == "first@example.org"


def _decodes_or_rejects(body: bytes) -> None:
    try:
        events = decode_email(body, {}, CONFIG)
    except Rejected as exc:
        assert exc.reason == "not_email"
        return
    assert len(events) == 1
    assert events[0].contact_id.startswith("email:")
    assert events[0].contact_id != "email:"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_decode_or_reject(body: bytes) -> None:
    _decodes_or_rejects(body)


REAL = [p.read_bytes() for p in sorted(SAMPLES.glob("*.eml")) + sorted(CONSTRUCTED.glob("*.eml"))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(REAL),
    st.integers(min_value=0, max_value=4000),
    st.lists(st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=8)), max_size=6),
)
def test_truncated_and_mutated_samples_decode_or_reject(
    sample: bytes, cut: int, edits: list[tuple[int, bytes]]
) -> None:
    body = bytearray(sample[: max(cut, 1)] if cut < len(sample) else sample)
    for position, junk in edits:
        at = position % (len(body) + 1)
        body[at : at + len(junk)] = junk
    _decodes_or_rejects(bytes(body))


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=80),
    st.text(max_size=80),
    st.text(max_size=200),
)
def test_arbitrary_header_values_never_crash(sender: str, subject: str, refs: str) -> None:
    def clean(value: str) -> str:
        return value.replace("\r", " ").replace("\n", " ")

    body = (
        f"From: {clean(sender)}\r\nSubject: {clean(subject)}\r\nReferences: {clean(refs)}\r\n"
        f"Date: {clean(subject)}\r\n\r\nbody\r\n"
    ).encode("utf-8", "surrogateescape")
    _decodes_or_rejects(body)


# ------------------------------------------------------------------ parts without a charset

UNDECLARED = "Mein DSL ist seit gestern gestört. Grüße, Jürgen Müller – danke!"


def undeclared(body: bytes, content_type: str = "text/plain") -> bytes:
    """A mail as swaks and many scripts send it: 8-bit body, no charset parameter."""
    return (
        b"From: Juergen <j@example.org>\r\nTo: support@example.com\r\n"
        b"Subject: Stoerung\r\nMessage-ID: <u1@example.org>\r\n"
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body + b"\r\n"
    )


def text_of(raw: bytes) -> str:
    events = decode_email(raw, {}, CONFIG)
    assert events[0].text is not None
    return events[0].text


def test_a_body_without_charset_is_utf8_when_it_is_valid_utf8() -> None:
    assert text_of(undeclared(UNDECLARED.encode("utf-8"))) == UNDECLARED


def test_a_body_without_charset_that_is_not_utf8_is_windows_1252() -> None:
    assert text_of(undeclared(UNDECLARED.encode("cp1252"))) == UNDECLARED


def test_no_byte_is_dropped_even_where_windows_1252_has_no_character() -> None:
    # 0x81 and 0x8d are undefined in Windows-1252: Latin-1 keeps them as U+0081 / U+008D.
    text = text_of(undeclared("Grüße ".encode("cp1252") + b"\x81\x8d ok"))
    assert text == "Grüße \x81\x8d ok"


def test_a_declared_us_ascii_part_with_8bit_bytes_is_not_garbled() -> None:
    raw = undeclared(UNDECLARED.encode("utf-8"), 'text/plain; charset="us-ascii"')
    assert text_of(raw) == UNDECLARED


def test_a_declared_charset_is_still_obeyed() -> None:
    text = "Grüße aus Köln, 20 €"
    raw = undeclared(text.encode("iso-8859-15"), "text/plain; charset=iso-8859-15")
    assert text_of(raw) == text


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"))))
def test_any_utf8_text_without_charset_comes_through(body: str) -> None:
    from channels.email import decode_undeclared

    assert decode_undeclared(body.encode("utf-8")) == body


@given(st.binary())
def test_undeclared_bytes_never_lose_a_character(raw: bytes) -> None:
    from channels.email import decode_undeclared

    # One character per byte for anything not UTF-8: nothing replaced, nothing dropped.
    text = decode_undeclared(raw)
    assert "\ufffd" not in text or "\ufffd".encode() in raw
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert len(text) == len(raw)


def test_raw_8bit_headers_are_decoded_and_the_event_encodes() -> None:
    """SMTPUTF8 mail (RFC 6532) and careless scripts put raw UTF-8 into headers."""
    import msgspec

    raw = (
        "From: Jürgen Müller <j.mueller@example.org>\r\nTo: support@example.com\r\n"
        "Subject: Störung seit gestern\r\nMessage-ID: <r8@example.org>\r\n"
        "Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\nGrüße\r\n"
        "--b\r\nContent-Type: text/plain\r\n"
        'Content-Disposition: attachment; filename="Übersicht.txt"\r\n\r\n'
        "x\r\n--b--\r\n"
    ).encode()
    (event,) = decode_email(raw, {}, CONFIG)
    assert event.sender.name == "Jürgen Müller"
    assert event.subject == "Störung seit gestern"
    assert event.attachments[0].filename == "Übersicht.txt"
    msgspec.json.encode(event)  # no lone surrogates left in any field
    latin = raw.decode("utf-8").encode("cp1252")
    (event,) = decode_email(latin, {}, CONFIG)
    assert event.sender.name == "Jürgen Müller" and event.text == "Grüße"


# ---- Stellwerk's own replies name their thread ------------------------------------------------

_MSG_ID_TEXT = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_characters="<>"),
    min_size=1,
    max_size=120,
)


@given(root=_MSG_ID_TEXT, key=st.text(max_size=50))
def test_a_reply_message_id_names_its_thread_root(root: str, key: str) -> None:
    made = reply_message_id(root, key, "beispiel-telekom.de")
    assert thread_of(made) == root
    assert made == reply_message_id(root, key, "beispiel-telekom.de")  # stable per key
    assert not any(c in made for c in "<> \t\r\n")


def test_an_answer_to_our_reply_joins_the_root_even_without_references() -> None:
    ours = reply_message_id("question-1@kunde.example", "reply:email:x:anna:1", "example.net")
    mail = (
        "From: kunde@kunde.example\r\nTo: support@example.net\r\nSubject: Re: Frage\r\n"
        f"Message-ID: <answer-2@kunde.example>\r\nIn-Reply-To: <{ours}>\r\n\r\nDanke!\r\n"
    ).encode()
    (event,) = decode_email(mail, {}, CONFIG)
    assert event.contact_id == "email:question-1@kunde.example"
    assert event.kind == "update" and event.attributes["in_reply_to"] == ours
    # Someone else's id that merely looks similar is left alone.
    assert thread_of("stw.notbase32!.0123456789ab@x") is None
