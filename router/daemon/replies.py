"""Answering where the conversation lives: agents' replies, and routing decisions carried out
on the platforms, all through the outbox (:mod:`router.daemon.outbox`).

- :class:`PlatformSink`, a :class:`~router.daemon.sinks.CommandSink`: on ``contact.assigned``
  the Chatwoot conversation is assigned to the agent's Chatwoot user and the Rocket.Chat room is
  forwarded to the agent's Rocket.Chat user (``agents[].accounts`` in the routing file); on
  ``contact.completed`` the Chatwoot conversation is resolved and the Rocket.Chat room closed
  (``room.closeByUser``), unless the platform itself ended it; with ``discourse.assign`` the
  community topic is assigned to the agent's Discourse user (discourse-assign). Idempotency
  keys are built from the decision (action, contact, engine time), so a decision the router
  replays after a crash is queued once.
- :class:`ConversationFacts` follows the journal and keeps, per contact, what a reply needs
  and the engine does not hold: the customer's address, the mail thread's Message-IDs, the
  time of the customer's last message (the WhatsApp/Messenger window), platform ids.
- The HTTP routes (:func:`add_outbound_routes`): ``POST /v1/contacts/{id}/messages`` with
  ``{"text": ...}`` (role ``agent``, only for a contact assigned to that agent) queues the
  reply: ``202`` with its key once it is in the outbox; an ``Idempotency-Key`` header makes a
  retried request queue it once. ``GET /v1/contacts/{id}/messages`` lists the contact's
  outbound messages and actions with their state (``queued``, ``sending``, ``retrying`` with
  the last error, ``sent``, ``failed`` with the platform's reason): what the desk shows.
- :class:`Outbound` tells its ``watchers`` about every changed status record and its
  ``replied`` observers about every newly queued reply (the desk's live feed and transcript).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from channels.contact_event import ContactEvent
from channels.email import reply_message_id
from router.daemon import auth, openapi
from router.daemon.config import OutboundSettings
from router.daemon.journal import ContactEntry, Journal, JournalUnavailable
from router.daemon.outbox import OutboundMessage, Outbox
from router.events import ContactAssigned, ContactCompleted
from router.messages import Command, EventCmd

if TYPE_CHECKING:
    from router.daemon.http import AppState
    from router.engine import Engine

log = structlog.get_logger("stellwerk.replies")

#: the channel sources an agent can answer through, and the outbox destination of each.
REPLY_DESTINATIONS = {
    "email": "mail",
    "chatwoot": "chatwoot",
    "rocketchat": "rocketchat",
    "discourse": "discourse",
    "whatsapp": "whatsapp",
    "messenger": "messenger",
}
FACTS_TTL = 30 * 86400
MAX_REFERENCES = 20
MAX_TEXT = 20_000
_json = msgspec.json.Encoder()


# ---- what the journal says about each conversation ----------------------------------------------


class ConversationFacts:
    """Per contact, what replies need, kept in Redis from the journal (see module docstring)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.redis: aioredis.Redis = journal.redis
        self.prefix = journal.keys.prefix

    def key(self, contact_id: str) -> str:
        return f"{self.prefix}conv:{contact_id}"

    @property
    def position_key(self) -> str:
        return f"{self.prefix}conv:position"

    async def get(self, contact_id: str) -> dict[str, str]:
        """The facts about ``contact_id`` (empty when none were recorded)."""
        try:
            raw = await self.redis.hgetall(self.key(contact_id))  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def record(self, event: ContactEvent, at: float) -> None:
        """Take in one journaled contact event."""
        if event.kind == "end":
            return
        if event.channel == "social" and event.kind != "new":
            return  # later posts are the crowd's or ours; the topic's first post is the asker
        if event.attributes.get("staff") == "true":
            return
        key = self.key(event.contact_id)
        fields: dict[str, str] = {
            "source": event.source,
            "external_id": event.external_id,
            "last_inbound_at": repr(at),
        }
        message_id = event.attributes.get("message_id") or event.attributes.get("post_id")
        if message_id:
            fields["last_message_id"] = message_id
        for name in ("phone_number_id", "account_id", "inbox_id"):
            if name in event.attributes:
                fields[name] = event.attributes[name]
        first = {
            "to": event.to,
            "subject": event.subject,
            "email": event.sender.email,
            "handle": event.sender.handle,
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            for name, value in first.items():
                if value:
                    pipe.hsetnx(key, name, value)
            if event.channel == "email" and message_id:
                pipe.hget(key, "references")
            pipe.expire(key, FACTS_TTL)
            results = await pipe.execute()
        if event.channel == "email" and message_id:
            known = results[-2]
            chain = known.decode().split() if known else [event.external_id]
            if message_id not in chain:
                chain.append(message_id)
            # The thread's root stays first: it is what the customer's answer is matched on.
            kept = [chain[0], *chain[1:][-(MAX_REFERENCES - 1) :]]
            await self.redis.hset(key, "references", " ".join(kept))  # type: ignore[misc]

    async def follow(self, active: asyncio.Event) -> None:
        """Read the journal while ``active`` is set (this daemon holds the outbox lease)."""
        while True:
            await active.wait()
            position = await self.redis.get(self.position_key)
            last = position.decode() if position else "0-0"
            while active.is_set():
                rows = await self.journal.read_after(last, 500, 256)
                for entry_id, entry in rows:
                    if isinstance(entry, ContactEntry):
                        await self.record(entry.event, entry.at)
                    last = entry_id
                if rows:
                    await self.redis.set(self.position_key, last)


# ---- routing decisions carried out on the platforms ---------------------------------------------


class PlatformSink:
    """Assign/forward on accept, resolve/close on completion (see the module docstring)."""

    def __init__(self, outbox: Outbox, settings: OutboundSettings) -> None:
        self.outbox = outbox
        self.settings = settings
        self._engine: Engine | None = None

    async def restored(self, engine: Engine) -> None:
        self._engine = engine

    async def submit(self, cmds: Sequence[Command]) -> None:
        for cmd in cmds:
            if isinstance(cmd, EventCmd) and isinstance(
                cmd.event, ContactAssigned | ContactCompleted
            ):
                msg = self._action(cmd.event)
                if msg is not None:
                    # Redis down raises JournalUnavailable: the router starts over from its
                    # snapshot and hands us the same decision again, so nothing is lost.
                    await self.outbox.append(msg)

    def _account(self, agent_id: str, platform: str) -> str | None:
        """The agent's user on ``platform`` (its ``accounts``); None, logged, without one."""
        accounts = None
        if self._engine is not None:
            for agent in self._engine.table.file.agents:
                if agent.id == agent_id:
                    accounts = agent.accounts
                    break
        user = getattr(accounts, platform, None)
        if user is None:
            log.warning("outbound.no_account", platform=platform, agent_id=agent_id)
            return None
        return str(user)

    def _action(self, event: ContactAssigned | ContactCompleted) -> OutboundMessage | None:
        source = event.source
        contact_id = event.contact_id
        agent_id = event.agent_id
        external = contact_id.partition(":")[2]
        at = event.at
        assigned = isinstance(event, ContactAssigned)
        ended = isinstance(event, ContactCompleted) and event.outcome.startswith("ended:")
        if source == "chatwoot" and self.settings.chatwoot is not None:
            if assigned:
                user = self._account(agent_id, "chatwoot")
                if user is None:
                    return None
                action, params = "assign", {"conversation_id": external, "assignee_id": user}
            elif ended:
                return None  # Chatwoot resolved it itself
            else:
                action, params = "resolve", {"conversation_id": external}
        elif source == "rocketchat" and self.settings.rocketchat is not None:
            if assigned:
                user = self._account(agent_id, "rocketchat")
                if user is None:
                    return None
                action, params = "forward", {"room_id": external, "user_id": user}
            elif ended:
                return None  # the room was closed in Rocket.Chat
            else:
                action, params = "close", {"room_id": external}
        elif (
            source == "discourse"
            and assigned
            and self.settings.discourse is not None
            and self.settings.discourse.assign
        ):
            user = self._account(agent_id, "discourse")
            if user is None:
                return None
            action, params = "assign", {"topic_id": external, "username": user}
        else:
            return None
        return OutboundMessage(
            key=f"{action}:{contact_id}:{at!r}",
            destination=source,
            action=action,
            contact_id=contact_id,
            agent_id=agent_id or None,
            params=params,
            created_at=at,
        )


# ---- the agent's reply --------------------------------------------------------------------------


class Refusal(Exception):
    """A reply that cannot be queued: HTTP ``status``, ``error`` slug, ``detail`` sentence."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        self.status = status
        self.error = error
        self.detail = detail
        super().__init__(detail)


class ReplyBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /v1/contacts/{id}/messages``."""

    text: str


_REPLY = msgspec.json.Decoder(ReplyBody)
_IDEMPOTENCY = re.compile(r"[A-Za-z0-9._:-]{1,100}")


class Outbound:
    """Replies and platform actions: the outbox, the conversation facts, the settings."""

    def __init__(
        self,
        outbox: Outbox,
        facts: ConversationFacts,
        settings: OutboundSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.facts = facts
        self.settings = settings
        self.sink = PlatformSink(outbox, settings)
        self._clock = clock
        #: called with every changed status record (the desk's live feed registers here).
        self.watchers: list[Callable[[dict[str, Any]], Awaitable[None]]] = []
        #: called with each newly queued reply and the engine's info of its contact (the desk
        #: puts it into the conversation's transcript here).
        self.replied: list[Callable[[OutboundMessage, dict[str, Any]], Awaitable[None]]] = []

    def answerable(self) -> list[str]:
        """The contact sources an agent can answer through this daemon (their platform is set
        up), e.g. ``["email", "chatwoot"]``."""
        return [
            source
            for source, destination in REPLY_DESTINATIONS.items()
            if getattr(self.settings, destination) is not None
        ]

    async def notify(self, record: dict[str, Any]) -> None:
        """Tell every watcher about a changed status record (a failing one is logged)."""
        for watcher in list(self.watchers):
            try:
                await watcher(record)
            except Exception as exc:
                log.warning("outbound.watcher_failed", error=str(exc), key=record.get("key"))

    async def run(self, stopping: asyncio.Event) -> None:
        """The outbox workers and the journal follower, while this daemon holds the lease."""
        follower = asyncio.create_task(self.facts.follow(self.outbox.sending), name="conv-facts")
        try:
            await self.outbox.run(stopping)
        finally:
            follower.cancel()
            # Bounded: redis-py may swallow a cancel that lands in a blocking read; the
            # follower then stops on its own when ``sending`` is cleared.
            await asyncio.wait([follower], timeout=2.0)
            if follower.done() and not follower.cancelled():
                with contextlib.suppress(RedisError, OSError, JournalUnavailable):
                    follower.result()

    async def reply(
        self, contact: dict[str, Any], agent_id: str, text: str, request_key: str | None
    ) -> tuple[OutboundMessage, bool]:
        """Queue ``agent_id``'s reply in ``contact`` (the engine's contact info)."""
        contact_id = str(contact["contact_id"])
        source, _, external = contact_id.partition(":")
        destination = REPLY_DESTINATIONS.get(source)
        if destination is None:
            raise Refusal(422, "unsupported_channel", f"Stellwerk cannot answer {source} contacts")
        if getattr(self.settings, destination) is None:
            raise Refusal(
                503, "not_configured", f"no outbound.{destination} settings: replies are off"
            )
        facts = await self.facts.get(contact_id)
        now = self._clock()
        params: dict[str, str]
        if destination in ("whatsapp", "messenger"):
            params = self._graph_params(destination, external, facts, now)
        elif destination == "mail":
            params = self._mail_params(contact, external, facts, request_key or "")
        elif destination == "chatwoot":
            params = {"conversation_id": external}
        elif destination == "rocketchat":
            params = {"room_id": external}
        else:
            params = {"topic_id": external}
        key = f"reply:{contact_id}:{agent_id}:{request_key or uuid.uuid4().hex}"
        if destination == "mail":
            domain = params["from"].rpartition("@")[2] or "stellwerk.invalid"
            params["message_id"] = reply_message_id(external, key, domain)
        msg = OutboundMessage(
            key=key,
            destination=destination,
            action="message",
            contact_id=contact_id,
            agent_id=agent_id,
            body=text,
            params=params,
            created_at=now,
        )
        added = await self.outbox.append(msg)
        if added:
            for observer in list(self.replied):
                try:
                    await observer(msg, contact)
                except Exception as exc:  # the reply is queued; showing it is a courtesy
                    log.warning("outbound.reply_observer_failed", key=key, error=str(exc))
        return msg, added

    def _graph_params(
        self, destination: str, external: str, facts: dict[str, str], now: float
    ) -> dict[str, str]:
        settings = getattr(self.settings, destination)
        last = float(facts.get("last_inbound_at") or 0)
        if not last or now - last > settings.window:
            hours = settings.window / 3600
            since = f"{(now - last) / 3600:.1f} h ago" if last else "never"
            raise Refusal(
                409,
                "outside_messaging_window",
                f"the customer last wrote {since}; {destination} allows free replies only "
                f"within {hours:g} h of the customer's last message (a template message is "
                "needed, which Stellwerk does not send)",
            )
        params = {"to": external}
        if destination == "whatsapp":
            phone_number_id = facts.get("phone_number_id")
            if not phone_number_id:
                raise Refusal(409, "unknown_number", "the business number the customer wrote to")
            params["phone_number_id"] = phone_number_id
        return params

    def _mail_params(
        self, contact: dict[str, Any], root: str, facts: dict[str, str], request_key: str
    ) -> dict[str, str]:
        mail = self.settings.mail
        assert mail is not None
        to = facts.get("email")
        if not to:
            raise Refusal(503, "conversation_unknown", "the customer's address is not known yet")
        sender = (
            mail.mailboxes.get(str(contact.get("queue") or ""))
            or facts.get("to")
            or mail.from_address
        )
        if not sender:
            raise Refusal(503, "not_configured", "no mailbox to send from (outbound.mail)")
        subject = facts.get("subject") or ""
        if not subject.lower().startswith("re:"):
            subject = f"Re: {subject}".strip()
        references = facts.get("references") or root
        return {
            "to": to,
            "from": sender,
            "subject": subject,
            "in_reply_to": facts.get("last_message_id") or root,
            "references": references,
        }


# ---- HTTP ---------------------------------------------------------------------------------------

OUTBOUND = web.AppKey("outbound", Outbound)


def _reply(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, body=_json.encode(payload), content_type="application/json")


def _error(status: int, error: str, detail: str) -> web.Response:
    return _reply(status, {"error": error, "detail": detail})


def _answer(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_OUTBOUND_ITEM = {
    "type": "object",
    "description": "state: queued, sending, retrying (error: the last one), sent, failed",
    "properties": {
        "key": {"type": "string"},
        "destination": {"type": "string"},
        "action": {"type": "string"},
        "state": {"type": "string"},
        "attempts": {"type": "integer"},
        "error": {"type": "string"},
        "remote_id": {"type": "string"},
    },
}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/contacts/{contact_id}/messages": {
        "parameters": [
            {
                "name": "contact_id",
                "in": "path",
                "required": True,
                "description": "e.g. chatwoot:42 or email:<thread root Message-ID>",
                "schema": {"type": "string", "minLength": 1},
            }
        ],
        "post": {
            "summary": "The assigned agent's reply, queued in the outbox and sent where the "
            "conversation lives (mail, Chatwoot, Rocket.Chat, Discourse, WhatsApp, Messenger)",
            "x-stellwerk-access": "agent",
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,100}$"},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["text"],
                            "additionalProperties": False,
                            "properties": {"text": {"type": "string", "minLength": 1}},
                        }
                    }
                },
            },
            "responses": {
                "202": {
                    "description": "in the outbox; status says how far it got",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["key", "duplicate"],
                                "properties": {
                                    "key": {"type": "string"},
                                    "duplicate": {"type": "boolean"},
                                    "status": _OUTBOUND_ITEM,
                                },
                            }
                        }
                    },
                },
                "400": _answer("bad input, with the reason"),
                "401": _answer("no or an unknown bearer token"),
                "403": _answer("not an agent's token"),
                "404": _answer("no such contact, or not this agent's"),
                "409": _answer("not assigned, or outside the messaging window"),
                "422": _answer("a channel Stellwerk cannot answer"),
                "429": _answer("rate limited; see Retry-After"),
                "503": _answer("not configured, not routing, or Redis unavailable; retry"),
            },
        },
        "get": {
            "summary": "The contact's outbound messages and platform actions with their state",
            "x-stellwerk-access": "supervisor or agent",
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "oldest first",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "messages": {"type": "array", "items": _OUTBOUND_ITEM}
                                },
                            }
                        }
                    },
                },
                "401": _answer("no or an unknown bearer token"),
                "403": _answer("the token's role may not do this"),
                "404": _answer("an agent asking about a contact not its own"),
                "429": _answer("rate limited; see Retry-After"),
                "503": _answer("Redis unavailable; retry"),
            },
        },
    }
}


def add_outbound_routes(app: web.Application, state: AppState) -> None:
    """Register the reply routes with their access (:mod:`router.daemon.auth`).

    Sending needs role ``agent`` and a contact assigned to that very agent (the agent id comes
    from the token, never from the request); a contact that is not the agent's answers 404 like
    an unknown one. Reading the outbound list: a supervisor, or the contact's agent.
    """

    async def send(request: web.Request) -> web.Response:
        principal = auth.require_agent(request)
        outbound = request.app.get(OUTBOUND)
        if outbound is None:
            return _error(503, "not_configured", "outbound messaging is not running")
        if state.view is None:
            return _error(503, "not_routing", state.not_routing())
        contact_id = request.match_info["contact_id"]
        try:
            body = _REPLY.decode(await request.read())
        except msgspec.DecodeError as exc:
            return _error(400, "bad_message", f'expected {{"text": "..."}}: {exc}')
        text = body.text.strip()
        if not text or len(text) > MAX_TEXT:
            return _error(400, "bad_message", f"text must be 1 to {MAX_TEXT} characters")
        request_key = request.headers.get("Idempotency-Key")
        if request_key is not None and not _IDEMPOTENCY.fullmatch(request_key):
            return _error(400, "bad_idempotency_key", "1-100 of A-Z a-z 0-9 . _ : -")
        info = state.view.contact_info(contact_id)
        if info is not None and info.get("agent_id") != principal.agent_id:
            auth.audit_refusal(request, "not_your_contact", principal, contact_id=contact_id)
            info = None
        if info is None:
            return _error(404, "unknown_contact", f"no contact {contact_id!r}")
        if info.get("state") not in ("assigned", "wrap_up"):
            return _error(
                409, "not_assigned", f"contact {contact_id!r} is {info.get('state')}, not assigned"
            )
        assert principal.agent_id is not None
        try:
            msg, added = await outbound.reply(info, principal.agent_id, text, request_key)
        except Refusal as exc:
            return _error(exc.status, exc.error, exc.detail)
        except JournalUnavailable as exc:
            return _error(503, "journal_unavailable", str(exc) or "Redis is unreachable; retry")
        record = await outbound.outbox.status(msg.key)
        return _reply(202, {"key": msg.key, "duplicate": not added, "status": record})

    async def listing(request: web.Request) -> web.Response:
        principal = auth.require(request, ("supervisor", "agent"))
        outbound = request.app.get(OUTBOUND)
        if outbound is None:
            # Not a passing outage (503 would invite retries): this daemon has no replies.
            return _error(404, "not_configured", "outbound messaging is not set up")
        contact_id = request.match_info["contact_id"]
        if principal.role == "agent":
            info = state.view.contact_info(contact_id) if state.view is not None else None
            if info is None or info.get("agent_id") != principal.agent_id:
                auth.audit_refusal(request, "not_your_contact", principal, contact_id=contact_id)
                return _error(404, "unknown_contact", f"no contact {contact_id!r}")
        try:
            found = await outbound.outbox.for_contact(contact_id)
        except JournalUnavailable as exc:
            return _error(503, "journal_unavailable", str(exc))
        return _reply(200, {"messages": found})

    openapi.document_paths(app, OPENAPI_PATHS)
    auth.add_routes(
        app,
        [
            (web.post("/v1/contacts/{contact_id}/messages", send), "agent"),
            # a supervisor, or the agent of that contact (checked in the handler)
            (web.get("/v1/contacts/{contact_id}/messages", listing), "self"),
        ],
    )
