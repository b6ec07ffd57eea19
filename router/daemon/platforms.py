"""The outbox's destinations: one client per platform Stellwerk answers or acts on.

Each client turns an :class:`~router.daemon.outbox.OutboundMessage` into the platform's own
request and sorts the answer into sent, :class:`~router.daemon.outbox.Transient` (connection
trouble, timeouts, 5xx, 429: retried) or :class:`~router.daemon.outbox.Permanent` (4xx:
shown to the agent). HTTP goes through aiohttp's client, mail through aiosmtplib.

What a re-send after a crash (``uncertain``) means per platform, since only some platforms
take an idempotency key:

- **Rocket.Chat**: ``chat.sendMessage`` takes the message's ``_id``; Stellwerk derives it from
  the idempotency key, and Rocket.Chat stores no second message under an id it has, so a
  re-send delivers exactly once. ``room.closeByUser`` answering ``error-room-already-closed``
  counts as done. ``room.forward`` has no key: a repeat may be refused (then it is shown).
- **Chatwoot**: no idempotency key, but a message's ``content_attributes`` are kept; Stellwerk
  puts ``stellwerk_key`` there and, before an uncertain re-send, lists the conversation's
  messages and sends only if none carries the key (exactly once; the listing is Chatwoot's
  latest page of messages, which holds the message when the re-send follows soon after).
  Assigning and setting the status are idempotent by nature.
- **Discourse**: assigning a topic (discourse-assign) to the user it is assigned to already
  is refused with "already assigned", which counts as done. Posts have no key. Discourse
  refuses a post identical to one the same user just made
  ("Body is too similar to what you recently posted", site setting ``unique_posts_mins``);
  after an uncertain attempt that refusal counts as delivered. With that setting at 0 a crash
  in the instant between Discourse's answer and our record can post twice (at least once).
- **WhatsApp, Messenger** (Graph API): no key; at least once. A crash between Meta's answer
  and our record re-sends the message (the customer may see it twice). Outside the messaging
  window the HTTP route refuses before anything is queued.
- **Mail**: SMTP has no key; at least once, but every attempt carries the same
  ``Message-ID``, so mail clients and archives that de-duplicate by Message-ID show it once.
"""

from __future__ import annotations

import hashlib
import string
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import aiohttp
import aiosmtplib
import msgspec

from router.daemon.config import (
    ChatwootSettings,
    DiscourseSettings,
    GraphSettings,
    MailSettings,
    OutboundSettings,
    RocketchatSettings,
)
from router.daemon.outbox import Destination, OutboundMessage, Permanent, Transient

_ALPHABET = string.ascii_letters + string.digits
_json = msgspec.json.Encoder()


def rocketchat_message_id(key: str) -> str:
    """A Rocket.Chat message ``_id`` (17 letters and digits, like its own) for an outbox key."""
    number = int.from_bytes(hashlib.sha256(key.encode()).digest(), "big")
    chars = []
    for _ in range(17):
        number, digit = divmod(number, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def _platform_error(body: Any) -> str:
    """The error sentence in a platform's JSON error body (each has its own shape)."""
    if isinstance(body, dict):
        for name in ("error", "message", "errors", "detail"):
            value = body.get(name)
            if isinstance(value, dict):  # Graph: {"error": {"message": ..., "code": ...}}
                return str(value.get("message") or value)
            if isinstance(value, list) and value:
                return "; ".join(str(v) for v in value)
            if value:
                return str(value)
    return str(body)[:300] if body else ""


class HttpPlatform:
    """Shared request handling of the HTTP platforms."""

    name = "http"

    def __init__(self, session: aiohttp.ClientSession, timeout: float) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def request(
        self, method: str, url: str, headers: dict[str, str], body: Any = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON or None); 2xx and 4xx come back, the rest raises Transient."""
        try:
            async with self.session.request(
                method,
                url,
                data=None if body is None else _json.encode(body),
                headers={**headers, **({"Content-Type": "application/json"} if body else {})},
                timeout=self.timeout,
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
            raise Transient(f"{self.name}: cannot connect: {exc}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # The request may have reached the platform before the connection broke.
            raise Transient(f"{self.name}: {type(exc).__name__}: {exc}", uncertain=True) from None
        try:
            decoded = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            decoded = raw.decode("utf-8", "replace")[:300]
        if status == 429 or status >= 500:
            raise Transient(
                f"{self.name}: HTTP {status}: {_platform_error(decoded)}", uncertain=status >= 500
            )
        return status, decoded

    def refuse(self, status: int, body: Any) -> Permanent:
        reason = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(status, "refused")
        return Permanent(reason, f"{self.name}: HTTP {status}: {_platform_error(body)}")


class Chatwoot(HttpPlatform):
    """Chatwoot's application API (``api_access_token`` header; conversation display ids)."""

    name = "chatwoot"

    def __init__(self, session: aiohttp.ClientSession, settings: ChatwootSettings) -> None:
        super().__init__(session, settings.timeout)
        self.settings = settings
        self.headers = {"api_access_token": settings.api_token}

    def _url(self, conversation_id: str, what: str) -> str:
        base = self.settings.url.rstrip("/")
        account = self.settings.account_id
        return f"{base}/api/v1/accounts/{account}/conversations/{conversation_id}/{what}"

    async def deliver(self, msg: OutboundMessage, *, uncertain: bool) -> str:
        conversation = msg.params["conversation_id"]
        if msg.action == "assign":
            body: dict[str, Any] = {"assignee_id": int(msg.params["assignee_id"])}
            status, answer = await self.request(
                "POST", self._url(conversation, "assignments"), self.headers, body
            )
        elif msg.action == "resolve":
            url = self._url(conversation, "toggle_status")
            status, answer = await self.request("POST", url, self.headers, {"status": "resolved"})
        elif msg.action == "message":
            if uncertain:
                found = await self._posted(conversation, msg.key)
                if found is not None:
                    return found
            body = {
                "content": msg.body,
                "message_type": "outgoing",
                "private": False,
                "content_attributes": {"stellwerk_key": msg.key},
            }
            status, answer = await self.request(
                "POST", self._url(conversation, "messages"), self.headers, body
            )
        else:
            raise Permanent("unsupported", f"chatwoot cannot {msg.action!r}")
        if status >= 300:
            raise self.refuse(status, answer)
        return str(answer.get("id", "")) if isinstance(answer, dict) else ""

    async def _posted(self, conversation: str, key: str) -> str | None:
        """The id of a message in the conversation that carries ``key``, if there is one."""
        url = self._url(conversation, "messages")
        status, answer = await self.request("GET", url, self.headers)
        if status >= 300:
            raise self.refuse(status, answer)
        items = answer.get("payload") if isinstance(answer, dict) else None
        for item in items if isinstance(items, list) else ():
            attributes = item.get("content_attributes") if isinstance(item, dict) else None
            if isinstance(attributes, dict) and attributes.get("stellwerk_key") == key:
                return str(item.get("id", ""))
        return None


class Rocketchat(HttpPlatform):
    """Rocket.Chat's REST API (``X-Auth-Token`` / ``X-User-Id``)."""

    name = "rocketchat"

    def __init__(self, session: aiohttp.ClientSession, settings: RocketchatSettings) -> None:
        super().__init__(session, settings.timeout)
        self.settings = settings
        self.headers = {"X-Auth-Token": settings.auth_token, "X-User-Id": settings.user_id}

    async def deliver(self, msg: OutboundMessage, *, uncertain: bool) -> str:
        base = self.settings.url.rstrip("/") + "/api/v1/"
        room = msg.params["room_id"]
        if msg.action == "forward":
            body: dict[str, Any] = {"roomId": room, "userId": msg.params["user_id"]}
            status, answer = await self.request(
                "POST", base + "livechat/room.forward", self.headers, body
            )
        elif msg.action == "close":
            status, answer = await self.request(
                "POST", base + "livechat/room.closeByUser", self.headers, {"rid": room}
            )
            if status == 400 and _platform_error(answer) == "error-room-already-closed":
                return room  # closed already (by us before a crash, or by the visitor)
        elif msg.action == "message":
            message_id = rocketchat_message_id(msg.key)
            body = {"message": {"_id": message_id, "rid": room, "msg": msg.body}}
            status, answer = await self.request(
                "POST", base + "chat.sendMessage", self.headers, body
            )
            if status < 300:
                return message_id
        else:
            raise Permanent("unsupported", f"rocketchat cannot {msg.action!r}")
        if status >= 300:
            raise self.refuse(status, answer)
        return room


class Discourse(HttpPlatform):
    """Discourse's API (``Api-Key`` / ``Api-Username``): posts as the staff account."""

    name = "discourse"

    def __init__(self, session: aiohttp.ClientSession, settings: DiscourseSettings) -> None:
        super().__init__(session, settings.timeout)
        self.settings = settings
        self.headers = {"Api-Key": settings.api_key, "Api-Username": settings.api_username}

    async def deliver(self, msg: OutboundMessage, *, uncertain: bool) -> str:
        if msg.action == "assign":
            return await self._assign(msg)
        if msg.action != "message":
            raise Permanent("unsupported", f"discourse cannot {msg.action!r}")
        body = {"topic_id": int(msg.params["topic_id"]), "raw": msg.body}
        status, answer = await self.request(
            "POST", self.settings.url.rstrip("/") + "/posts.json", self.headers, body
        )
        if status >= 300:
            error = _platform_error(answer)
            if uncertain and status == 422 and "too similar" in error:
                return ""  # our own earlier attempt got through (see the module docstring)
            raise self.refuse(status, answer)
        return str(answer.get("id", "")) if isinstance(answer, dict) else ""

    async def _assign(self, msg: OutboundMessage) -> str:
        """discourse-assign: ``PUT /assign/assign`` (target_id, target_type, username)."""
        body = {
            "target_id": int(msg.params["topic_id"]),
            "target_type": "Topic",
            "username": msg.params["username"],
        }
        url = self.settings.url.rstrip("/") + "/assign/assign.json"
        status, answer = await self.request("PUT", url, self.headers, body)
        if status >= 300:
            if status == 400 and "already assigned" in _platform_error(answer):
                return msg.params["topic_id"]  # the state we want holds already
            raise self.refuse(status, answer)
        return msg.params["topic_id"]


# Graph API error codes that are worth retrying: throttling and temporary unavailability.
_GRAPH_TRANSIENT = frozenset({1, 2, 4, 17, 32, 613, 80007, 130429, 131016, 131048, 131056})
# Outside the customer-service window (WhatsApp 131047; Messenger 10 with subcode 2018278).
_GRAPH_WINDOW = frozenset({131047, 2018278})


class Graph(HttpPlatform):
    """WhatsApp Cloud API and Messenger Send API replies (``Authorization: Bearer``)."""

    def __init__(
        self, session: aiohttp.ClientSession, settings: GraphSettings, *, product: str
    ) -> None:
        super().__init__(session, settings.timeout)
        self.name = product
        self.settings = settings
        self.headers = {"Authorization": f"Bearer {settings.access_token}"}

    async def deliver(self, msg: OutboundMessage, *, uncertain: bool) -> str:
        if msg.action != "message":
            raise Permanent("unsupported", f"{self.name} cannot {msg.action!r}")
        base = f"{self.settings.url.rstrip('/')}/{self.settings.version}"
        body: dict[str, Any]
        if self.name == "whatsapp":
            url = f"{base}/{msg.params['phone_number_id']}/messages"
            body = {
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": msg.params["to"],
                "type": "text",
                "text": {"preview_url": False, "body": msg.body},
            }
        else:
            url = f"{base}/me/messages"
            body = {
                "recipient": {"id": msg.params["to"]},
                "messaging_type": "RESPONSE",
                "message": {"text": msg.body},
            }
        status, answer = await self.request("POST", url, self.headers, body)
        if status >= 300:
            error = answer.get("error") if isinstance(answer, dict) else None
            codes = set()
            if isinstance(error, dict):
                codes = {error.get("code"), error.get("error_subcode")}
            if codes & _GRAPH_TRANSIENT:
                raise Transient(f"{self.name}: {_platform_error(answer)}")
            if codes & _GRAPH_WINDOW:
                raise Permanent("outside_messaging_window", _platform_error(answer))
            raise self.refuse(status, answer)
        if isinstance(answer, dict):
            if self.name == "whatsapp":
                messages = answer.get("messages")
                if isinstance(messages, list) and messages and isinstance(messages[0], dict):
                    return str(messages[0].get("id", ""))
            return str(answer.get("message_id", ""))
        return ""


class Mail:
    """Replies (and forward mode's forwards) over an SMTP relay (aiosmtplib), headers prepared
    by the reply path (:mod:`router.daemon.replies`, :mod:`router.daemon.forward`)."""

    name = "mail"

    def __init__(self, settings: MailSettings) -> None:
        self.settings = settings

    def build(self, msg: OutboundMessage) -> EmailMessage:
        """The reply as an RFC 5322 message; the same bytes-to-be on every attempt."""
        p = msg.params
        mail = EmailMessage()
        mail["From"] = p["from"]
        mail["To"] = p["to"]
        mail["Subject"] = p.get("subject") or "Re:"
        mail["Date"] = formatdate(msg.created_at or None, usegmt=True)
        mail["Message-ID"] = f"<{p['message_id']}>"
        if p.get("in_reply_to"):
            mail["In-Reply-To"] = f"<{p['in_reply_to']}>"
        if p.get("references"):
            mail["References"] = " ".join(f"<{i}>" for i in p["references"].split())
        if p.get("reply_to"):
            mail["Reply-To"] = p["reply_to"]  # forward mode: the agent's answer comes back
        mail["Auto-Submitted"] = "no"
        mail.set_content(msg.body)
        return mail

    async def deliver(self, msg: OutboundMessage, *, uncertain: bool) -> str:
        if msg.action not in ("message", "forward"):
            raise Permanent("unsupported", f"mail cannot {msg.action!r}")
        s = self.settings
        try:
            await aiosmtplib.send(
                self.build(msg),
                hostname=s.host,
                port=s.port,
                username=s.username,
                password=s.password,
                use_tls=s.security == "tls",
                start_tls=s.security == "starttls",
                timeout=s.timeout,
            )
        except aiosmtplib.SMTPResponseException as exc:
            detail = f"mail: relay answered {exc.code} {exc.message}"
            if 500 <= exc.code < 600:
                raise Permanent("refused", detail) from None
            raise Transient(detail) from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise Transient(f"mail: {type(exc).__name__}: {exc}", uncertain=True) from None
        return msg.params["message_id"]


def destinations(
    settings: OutboundSettings, session: aiohttp.ClientSession
) -> dict[str, Destination]:
    """A client for every platform that has a settings section."""
    found: dict[str, Destination] = {}
    if settings.mail is not None:
        found["mail"] = Mail(settings.mail)
    if settings.chatwoot is not None:
        found["chatwoot"] = Chatwoot(session, settings.chatwoot)
    if settings.rocketchat is not None:
        found["rocketchat"] = Rocketchat(session, settings.rocketchat)
    if settings.discourse is not None:
        found["discourse"] = Discourse(session, settings.discourse)
    if settings.whatsapp is not None:
        found["whatsapp"] = Graph(session, settings.whatsapp, product="whatsapp")
    if settings.messenger is not None:
        found["messenger"] = Graph(session, settings.messenger, product="messenger")
    return found
