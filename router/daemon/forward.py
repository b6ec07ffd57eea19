"""Mail forward mode: agents who work in their own mail client (``outbound.mail.forward``).

- :class:`MailForward`, a :class:`~router.daemon.sinks.CommandSink`: when a mail contact is
  assigned to an agent listed in ``forward.agents``, the conversation so far is forwarded to
  that agent's own mailbox through the outbox (destination ``mail``, action ``forward``), and so
  is every later message of the customer while the agent holds the contact. The forward comes
  from the queue's mailbox and carries ``Reply-To: desk+TOKEN@domain`` (``reply_address`` with
  a token), so the agent just answers it.
- :class:`ForwardTokens`: a token names one issued record ``{key_prefix}forward:{nonce}``
  (the contact and the agent, kept ``ttl`` seconds) and carries an HMAC-SHA256 of nonce,
  contact and agent under ``secret``: without the secret no valid token can be made, and one
  that expired names nothing. 32 characters of lower-case base32, so the address stays within
  the 64 characters SMTP allows a local part and survives mail systems that lower-case it.
- :class:`ForwardAnswers`, used by the SMTP listener (:mod:`router.daemon.smtp`): a recipient
  ``desk+TOKEN@...`` is checked at ``RCPT`` time (``550 5.7.1`` for a forged, unknown or
  expired token, or a contact the agent no longer holds; logged as ``forward.refused``); the
  message's text, without the quoted forward, then goes out to the customer as that agent's
  reply (:meth:`router.daemon.replies.Outbound.reply`: the same headers, threading and outbox
  as a reply from the desk), queued once per Message-ID of the agent's answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from channels.base import DecodeConfig, Rejected
from channels.email import decode_email
from router.daemon.config import MailSettings
from router.daemon.journal import JournalUnavailable
from router.daemon.outbox import OutboundMessage, Outbox
from router.daemon.replies import ConversationFacts, Outbound, Refusal
from router.daemon.transcripts import TranscriptStore
from router.events import ContactAssigned, ContactUpdated
from router.messages import Command, EventCmd

if TYPE_CHECKING:
    from router.daemon.http import AppState
    from router.engine import Engine

log = structlog.get_logger("stellwerk.forward")

_TOKEN = re.compile(r"[a-z2-7]{32}")
_HELD = ("assigned", "wrap_up")


def _b32(data: bytes, size: int) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()[:size]


class ForwardRefused(Exception):
    """A reply address that does not stand for a contact its agent holds."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


class ForwardTokens:
    """Issue and check the tokens of reply addresses (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, key_prefix: str, mail: MailSettings) -> None:
        assert mail.forward is not None
        self.redis = redis
        self.prefix = f"{key_prefix}forward:"
        self.settings = mail.forward
        local, _, domain = self.settings.reply_address.partition("@")
        self.local = local.lower()
        self.domain = domain.lower()
        self._secret = self.settings.secret.encode()

    def _mac(self, nonce: str, contact_id: str, agent_id: str) -> str:
        signed = f"{nonce}\n{contact_id}\n{agent_id}".encode()
        return _b32(hmac.new(self._secret, signed, hashlib.sha256).digest(), 16)

    def address(self, token: str) -> str:
        """The reply address carrying ``token``."""
        return f"{self.local}+{token}@{self.domain}"

    def token_of(self, address: str) -> str | None:
        """The token part of ``address`` when it is one of the reply addresses, else None
        (mail for anyone else goes to intake as usual)."""
        local, _, domain = address.strip().strip("<>").lower().rpartition("@")
        base, plus, token = local.partition("+")
        if domain != self.domain or base != self.local or not plus:
            return None
        return token

    async def issue(self, key: str, contact_id: str, agent_id: str) -> str:
        """The token for one forward (the same for the same outbox ``key``)."""
        nonce = _b32(hmac.new(self._secret, b"nonce\n" + key.encode(), hashlib.sha256).digest(), 16)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                record = {"contact_id": contact_id, "agent_id": agent_id}
                pipe.hset(self.prefix + nonce, mapping=record)
                pipe.expire(self.prefix + nonce, int(self.settings.ttl))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return nonce + self._mac(nonce, contact_id, agent_id)

    async def check(self, token: str) -> tuple[str, str]:
        """The (contact, agent) ``token`` stands for; :class:`ForwardRefused` if none."""
        if not _TOKEN.fullmatch(token):
            raise ForwardRefused("malformed", "this reply address was not made by Stellwerk")
        nonce, mac = token[:16], token[16:]
        try:
            raw = await self.redis.hgetall(self.prefix + nonce)  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        record = {k.decode(): v.decode() for k, v in raw.items()}
        if "contact_id" not in record:
            raise ForwardRefused(
                "expired", "this reply address is unknown or expired; answer from the desk"
            )
        contact_id, agent_id = record["contact_id"], record["agent_id"]
        if not hmac.compare_digest(mac, self._mac(nonce, contact_id, agent_id)):
            raise ForwardRefused("forged", "this reply address was not made by Stellwerk")
        return contact_id, agent_id


def _sender(mail: MailSettings, queue: str, facts: dict[str, str]) -> str:
    return mail.mailboxes.get(queue) or facts.get("to") or mail.from_address or ""


class MailForward:
    """Forward agents' mail contacts to their own mailboxes (see the module docstring)."""

    def __init__(
        self,
        outbox: Outbox,
        facts: ConversationFacts,
        transcripts: TranscriptStore,
        tokens: ForwardTokens,
        mail: MailSettings,
    ) -> None:
        assert mail.forward is not None
        self.outbox = outbox
        self.facts = facts
        self.transcripts = transcripts
        self.tokens = tokens
        self.mail = mail
        self.agents = mail.forward.agents

    async def restored(self, engine: Engine) -> None:
        known = {a.id for a in engine.table.file.agents}
        for agent_id in sorted(set(self.agents) - known):
            log.warning("forward.unknown_agent", agent_id=agent_id)

    async def submit(self, cmds: Sequence[Command]) -> None:
        for cmd in cmds:
            if not isinstance(cmd, EventCmd):
                continue
            event = cmd.event
            if not isinstance(event, ContactAssigned | ContactUpdated) or event.source != "email":
                continue
            agent_id = event.agent_id
            if agent_id is None or agent_id not in self.agents:
                continue
            if isinstance(event, ContactAssigned):
                msg = await self._forward(event, agent_id, whole=True)
            elif event.state in _HELD:
                msg = await self._forward(event, agent_id, whole=False)
            else:
                continue
            if msg is not None:
                # Redis down raises JournalUnavailable: the router hands us the decision again.
                await self.outbox.append(msg)

    async def _forward(
        self, event: ContactAssigned | ContactUpdated, agent_id: str, *, whole: bool
    ) -> OutboundMessage | None:
        contact_id = event.contact_id
        at = event.at
        key = f"forward:{contact_id}:{agent_id}:{at!r}"
        facts = await self.facts.get(contact_id)
        sender = _sender(self.mail, event.queue or "", facts)
        if not sender:
            log.warning("forward.no_mailbox", contact_id=contact_id)
            return None
        messages = await self.transcripts.read(contact_id)
        if not whole:
            messages = [m for m in messages if not m.staff][-1:]
        parts = []
        for m in messages:
            who = m.sender.name or m.sender.email or ""
            if m.sender.email and m.sender.name:
                who = f"{m.sender.name} <{m.sender.email}>"
            parts.append(f"{who}{' (you)' if m.reply_key else ''}:\n\n{m.text or ''}".strip())
        if not parts:
            parts.append("(the message is not kept by Stellwerk; see the desk)")
        token = await self.tokens.issue(key, contact_id, agent_id)
        body = (
            "Answer this mail to reply to the customer: your answer goes out from "
            f"{sender} in the same thread.\n\n" + "\n\n---\n\n".join(parts) + "\n"
        )
        subject = facts.get("subject") or ""
        domain = sender.rpartition("@")[2] or "stellwerk.invalid"
        return OutboundMessage(
            key=key,
            destination="mail",
            action="forward",
            contact_id=contact_id,
            agent_id=agent_id,
            body=body,
            params={
                "to": self.agents[agent_id],
                "from": sender,
                "reply_to": self.tokens.address(token),
                "subject": f"Fwd: {subject}".strip(),
                "message_id": f"stw-fwd.{hashlib.sha256(key.encode()).hexdigest()[:20]}@{domain}",
            },
            created_at=at,
        )


class ForwardAnswers:
    """The SMTP listener's side: reply addresses checked at RCPT, answers queued at DATA."""

    def __init__(
        self, tokens: ForwardTokens, outbound: Outbound, state: AppState, config: DecodeConfig
    ) -> None:
        self.tokens = tokens
        self.outbound = outbound
        self.state = state
        self.config = config

    def token_of(self, address: str) -> str | None:
        """See :meth:`ForwardTokens.token_of`."""
        return self.tokens.token_of(address)

    def _held(self, contact_id: str, agent_id: str) -> dict[str, Any]:
        view = self.state.view
        if view is None:
            raise JournalUnavailable("this daemon does not route now")
        info = view.contact_info(contact_id)
        if info is None or info.get("agent_id") != agent_id or info.get("state") not in _HELD:
            raise ForwardRefused(
                "stale",
                "this conversation is no longer yours in Stellwerk (completed or given to "
                "someone else); nothing was sent",
            )
        return info

    async def check(self, token: str) -> tuple[str, str]:
        """The (contact, agent) of a reply address; raises :class:`ForwardRefused` or
        :class:`JournalUnavailable`."""
        contact_id, agent_id = await self.tokens.check(token)
        self._held(contact_id, agent_id)
        return contact_id, agent_id

    async def answer(self, target: tuple[str, str], raw: bytes) -> str:
        """Queue the agent's answer in ``raw`` to the customer; the SMTP reply line."""
        contact_id, agent_id = target
        try:
            (event,) = decode_email(raw, {}, self.config)
        except (Rejected, ValueError) as exc:
            return f"554 5.6.0 Not a mail Stellwerk can read: {' '.join(str(exc).split())[:150]}"
        if {"bounce", "auto_reply", "bulk"} & set(event.tags):
            # An out-of-office answer or a bounce must never reach the customer.
            log.warning("forward.refused", reason="automatic", contact_id=contact_id, at="data")
            return "550 5.7.1 Automatic answers (out of office, bounces) are not sent on"
        text = (event.text or "").strip()
        if not text:
            return "554 5.6.0 The answer has no text above the quoted mail; nothing was sent"
        message_id = event.attributes.get("message_id", "")
        request_key = "mail-" + hashlib.sha256(message_id.encode()).hexdigest()[:32]
        try:
            info = self._held(contact_id, agent_id)
            msg, added = await self.outbound.reply(info, agent_id, text, request_key)
        except ForwardRefused as exc:
            log.warning("forward.refused", reason=exc.reason, contact_id=contact_id, at="data")
            return f"550 5.7.1 {exc.detail}"
        except Refusal as exc:
            log.warning("forward.refused", reason=exc.error, contact_id=contact_id, at="data")
            if exc.status >= 500:
                return f"451 4.3.0 {exc.detail}; try again later"
            return f"550 5.7.1 {' '.join(exc.detail.split())[:200]}"
        except JournalUnavailable:
            return "451 4.3.0 Temporary failure: the journal is unavailable, try again later"
        log.info(
            "forward.answer_queued",
            contact_id=contact_id,
            agent_id=agent_id,
            key=msg.key,
            duplicate=not added,
        )
        return "250 2.0.0 OK: your answer goes to the customer"
