"""Community and social decoders: Discourse webhooks and X API v2 posts.

A community topic (or an X conversation) is one contact: ``contact_id`` is
``discourse:{topic_id}`` / ``x:{conversation_id}``, the id of the single post goes into
``attributes["post_id"]``. The topic's first post (or the conversation's root post) starts the
contact (``new``); every later post is an ``update`` of it, because the router has to see that a
community question got an answer, and from whom (crowd member, staff, or the asker again).

Discourse (``decode_discourse``)
    The event comes from the ``X-Discourse-Event`` header, which Discourse always sends: a
    delivery without it is rejected (``missing_field``); with ``stellwerk normalize`` pass it as
    ``--header 'X-Discourse-Event: post_created'``. ``topic_created`` and ``post_created`` are
    decoded; every other event (``ping``, ``post_edited``, ``user_created``, ...) returns ``[]``.
    Discourse sends both ``topic_created`` and ``post_created`` (post 1) for a new topic; both are
    ``new`` for the same contact id, which the router treats as one contact. Posts of type 3
    (small action: "closed the topic", ...) and 4 (staff whisper, invisible to the asker) are not
    answers and return ``[]``. The text is the post's ``raw`` Markdown where the payload has it,
    else its ``cooked`` HTML turned into plain text. The signature
    ``X-Discourse-Event-Signature: sha256=<hex HMAC-SHA256 of the body>`` is checked when
    ``config.secrets["discourse"]`` is set.

X (``decode_x``)
    An X API v2 posts payload: ``{"data": {...}}`` or ``{"data": [...]}``, optionally with
    ``includes.users``. One event per post. ``sender.handle`` is ``x:{author_id}`` (the numeric
    id, because user names can be changed and the router keys expert identities on the handle);
    the user name, when ``includes.users`` gives it, goes into ``attributes["username"]`` and the
    display name into ``sender.name``. X escapes ``&``, ``<`` and ``>`` in post text as HTML
    entities; they are unescaped. ``lang`` ``und`` (undetermined) becomes no language. When
    ``config.secrets["x"]`` (the app's consumer secret) is set, the Account Activity signature
    ``X-Twitter-Webhooks-Signature: sha256=<base64 HMAC-SHA256 of the body>`` is checked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
from html.parser import HTMLParser
from typing import Any

from channels.base import DecodeConfig, Headers, Rejected
from channels.common import (
    bound_text,
    check_hmac_sha256_hex,
    field,
    header,
    load_json_object,
    opt,
    opt_str,
    parse_timestamp,
)
from channels.contact_event import ContactEvent, Sender

DISCOURSE = "discourse"
X = "x"

# Discourse post types that are not something a customer or the crowd said to the customer.
_SMALL_ACTION = 3
_WHISPER = 4


def decode_discourse(body: bytes, headers: Headers, config: DecodeConfig) -> list[ContactEvent]:
    """Decode one Discourse webhook delivery (see the module docstring for the mapping)."""
    secret = config.secrets.get(DISCOURSE)
    if secret:
        check_hmac_sha256_hex(
            body, secret, header(headers, "X-Discourse-Event-Signature"), DISCOURSE
        )
    payload = load_json_object(body, DISCOURSE)
    event = header(headers, "X-Discourse-Event")
    if not event:
        raise Rejected(DISCOURSE, "missing_field", "header X-Discourse-Event is missing")
    event = event.strip()
    if event == "topic_created":
        return [_discourse_topic(payload, config)]
    if event == "post_created":
        return _discourse_post(payload, config)
    return []


def _discourse_topic(payload: dict[str, Any], config: DecodeConfig) -> ContactEvent:
    topic = field(payload, "topic", source=DISCOURSE, kind=dict)
    topic_id = _id_str(field(topic, "id", source=DISCOURSE, kind=(int, str)), DISCOURSE, "topic.id")
    author = opt(topic, "created_by")
    username = opt_str(author, "username")
    attributes: dict[str, str] = {}
    _put(attributes, "user_id", opt(author, "id"))
    _put(attributes, "archetype", opt(topic, "archetype"))
    return ContactEvent(
        kind="new",
        contact_id=f"{DISCOURSE}:{topic_id}",
        channel="social",
        source=DISCOURSE,
        external_id=topic_id,
        thread_id=topic_id,
        sender=Sender(
            handle=f"{DISCOURSE}:{username}" if username else None,
            name=opt_str(author, "name"),
        ),
        to=opt_str(topic, "category_slug") or opt_str(topic, "category_id"),
        subject=bound_text(opt_str(topic, "title"), config.max_text),
        tags=_discourse_tags(opt(topic, "tags")),
        attributes=attributes,
        occurred_at=_occurred_at(opt(topic, "created_at"), DISCOURSE),
    )


def _discourse_post(payload: dict[str, Any], config: DecodeConfig) -> list[ContactEvent]:
    post = field(payload, "post", source=DISCOURSE, kind=dict)
    post_type = opt(post, "post_type")
    if post_type in (_SMALL_ACTION, _WHISPER):
        return []
    topic_id = _id_str(
        field(post, "topic_id", source=DISCOURSE, kind=(int, str)), DISCOURSE, "post.topic_id"
    )
    post_id = _id_str(field(post, "id", source=DISCOURSE, kind=(int, str)), DISCOURSE, "post.id")
    post_number = opt(post, "post_number")
    username = opt_str(post, "username")
    attributes = {"post_id": post_id}
    for name in ("post_number", "reply_to_post_number", "user_id", "trust_level"):
        _put(attributes, name, opt(post, name))
    for name in ("staff", "moderator", "admin"):
        _put(attributes, name, opt(post, name))
    _put(attributes, "archetype", opt(post, "topic_archetype"))
    raw = opt_str(post, "raw")
    text = raw if raw is not None else _html_to_text(opt_str(post, "cooked"))
    return [
        ContactEvent(
            kind="new" if post_number == 1 else "update",
            contact_id=f"{DISCOURSE}:{topic_id}",
            channel="social",
            source=DISCOURSE,
            external_id=topic_id,
            thread_id=topic_id,
            sender=Sender(
                handle=f"{DISCOURSE}:{username}" if username else None,
                name=opt_str(post, "name") or opt_str(post, "display_username"),
            ),
            to=opt_str(post, "category_slug") or opt_str(post, "category_id"),
            subject=bound_text(opt_str(post, "topic_title"), config.max_text),
            text=bound_text(text, config.max_text),
            attributes=attributes,
            occurred_at=_occurred_at(opt(post, "created_at"), DISCOURSE),
        )
    ]


def _discourse_tags(raw: Any) -> tuple[str, ...]:
    # Older Discourse sends tag names, newer ones tag objects with a "name".
    if not isinstance(raw, list):
        return ()
    names = (t if isinstance(t, str) else opt_str(t, "name") for t in raw)
    return tuple(n for n in names if n)


def decode_x(body: bytes, headers: Headers, config: DecodeConfig) -> list[ContactEvent]:
    """Decode an X API v2 posts payload into one event per post."""
    secret = config.secrets.get(X)
    if secret:
        _check_x_signature(body, secret, header(headers, "X-Twitter-Webhooks-Signature"))
    payload = load_json_object(body, X)
    data = payload.get("data")
    if isinstance(data, dict):
        posts: list[Any] = [data]
    elif isinstance(data, list):
        posts = data
    else:
        raise Rejected(X, "missing_field", "data is missing or not an object or list")
    users = _x_users(opt(payload, "includes", "users"))
    return [_x_post(post, index, users, config) for index, post in enumerate(posts)]


def _x_post(
    post: Any, index: int, users: dict[str, dict[str, Any]], config: DecodeConfig
) -> ContactEvent:
    if not isinstance(post, dict):
        raise Rejected(X, "bad_shape", f"data[{index}] is not an object")
    post_id = _id_str(opt(post, "id"), X, f"data[{index}].id")
    conversation_id = opt_str(post, "conversation_id") or post_id
    author_id = opt_str(post, "author_id")
    user = users.get(author_id, {}) if author_id else {}
    attributes = {"post_id": post_id}
    _put(attributes, "in_reply_to_user_id", opt(post, "in_reply_to_user_id"))
    _put(attributes, "username", opt(user, "username"))
    references = opt(post, "referenced_tweets")
    for ref in references if isinstance(references, list) else ():
        if opt(ref, "type") == "replied_to":
            _put(attributes, "replied_to_post_id", opt(ref, "id"))
    text = opt_str(post, "text")
    language = opt_str(post, "lang")
    return ContactEvent(
        kind="new" if conversation_id == post_id else "update",
        contact_id=f"{X}:{conversation_id}",
        channel="social",
        source=X,
        external_id=conversation_id,
        thread_id=conversation_id,
        sender=Sender(
            handle=f"{X}:{author_id}" if author_id else None,
            name=opt_str(user, "name"),
        ),
        text=bound_text(html.unescape(text) if text else None, config.max_text),
        language=None if language == "und" else language,
        attributes=attributes,
        occurred_at=_occurred_at(opt(post, "created_at"), X),
    )


def _x_users(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, list):
        return {}
    return {uid: user for user in raw if isinstance(user, dict) and (uid := opt_str(user, "id"))}


def _check_x_signature(body: bytes, secret: str, given: str | None) -> None:
    if not given:
        raise Rejected(X, "bad_signature", "signature header missing")
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    expected = "sha256=" + base64.b64encode(digest).decode()
    if not hmac.compare_digest(expected.encode(), given.strip().encode()):
        raise Rejected(X, "bad_signature", "signature does not match the body")


def _id_str(value: Any, source: str, name: str) -> str:
    text = (
        str(value).strip() if isinstance(value, int | str) and not isinstance(value, bool) else ""
    )
    if not text:
        raise Rejected(source, "missing_field", f"{name} is missing, empty or not an id")
    return text


def _put(attributes: dict[str, str], name: str, value: Any) -> None:
    """Store a scalar as a string attribute (booleans as ``true``/``false``); skip the rest."""
    if isinstance(value, bool):
        attributes[name] = "true" if value else "false"
    elif isinstance(value, int | float | str) and value != "":
        attributes[name] = str(value)


def _occurred_at(value: Any, source: str) -> float:
    # Both platforms omit created_at only when asked to (X needs tweet.fields=created_at);
    # then there is no source time and the router uses its own receive time.
    return 0.0 if value is None else parse_timestamp(value, source)


_BLOCK_TAGS = frozenset(
    {"p", "div", "br", "li", "ul", "ol", "blockquote", "pre", "aside", "tr", "hr"}
    | {"h1", "h2", "h3", "h4", "h5", "h6"}
)


class _TextExtractor(HTMLParser):
    """Plain text of Discourse's cooked HTML: text nodes, a line break per block element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _html_to_text(cooked: str | None) -> str | None:
    if cooked is None:
        return None
    parser = _TextExtractor()
    parser.feed(cooked)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)
