"""The inbound SMTP listener (aiosmtpd): a mail server delivers customer mail to it.

Each message's raw bytes (``envelope.original_content``, exactly as received) go to the shared
:class:`~router.daemon.intake.Intake` as source ``email``; the reply code follows the journal:

- ``250 2.0.0 OK`` only after the event is in the journal (the sender may drop its copy);
- ``451 4.3.0`` when the journal (Redis) is down: a temporary failure, the sending server keeps
  the message and retries later, so nothing is lost;
- ``554 5.6.0`` for a message that cannot become a contact (it is in the dead-letter stream
  with the reason); retrying would not change that.

With forward mode on (:mod:`router.daemon.forward`), a recipient that is one of the reply
addresses is an agent's answer, not customer mail: its token is checked at ``RCPT`` (``550
5.7.1`` when it is forged, expired or the agent no longer holds the contact), it must be the
message's only recipient (others get ``452 4.5.3`` and are sent again in a transaction of
their own), and at ``DATA`` the answer is queued to the customer instead of journaled.

The server runs on the daemon's own event loop (``loop.create_server`` with aiosmtpd's SMTP
protocol) rather than in aiosmtpd's ``Controller`` thread, so the handler awaits the journal's
Redis client on the loop that owns it.
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from typing import TYPE_CHECKING, Any

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from router.daemon.config import parse_addr
from router.daemon.forward import ForwardRefused
from router.daemon.intake import Intake
from router.daemon.journal import JournalUnavailable
from router.daemon.metrics import Metrics

if TYPE_CHECKING:
    from router.daemon.forward import ForwardAnswers

log = structlog.get_logger("stellwerk.smtp")

SOURCE = "email"
DEFAULT_MAX_MESSAGE = 10 * 1024 * 1024


class IntakeHandler:
    """aiosmtpd handler: every recipient is accepted (but forward mode's reply addresses are
    checked); DATA is journalled before ``250``."""

    def __init__(
        self, intake: Intake, metrics: Metrics, forward: ForwardAnswers | None = None
    ) -> None:
        self.intake = intake
        self.metrics = metrics
        self.forward = forward
        # The (contact, agent) of the envelopes addressed to a reply address (weakly: an
        # envelope of a connection that went away must not leave anything behind).
        self._answers: weakref.WeakKeyDictionary[Envelope, tuple[str, str]] = (
            weakref.WeakKeyDictionary()
        )

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept a recipient; a reply address only alone and with a valid token."""
        token = self.forward.token_of(address) if self.forward is not None else None
        if token is None:
            if envelope in self._answers:
                return "452 4.5.3 An answer to a reply address goes alone; send this one apart"
            envelope.rcpt_tos.append(address)
            return "250 OK"
        assert self.forward is not None
        if envelope.rcpt_tos:
            return "452 4.5.3 An answer to a reply address goes alone; send this one apart"
        try:
            target = await self.forward.check(token)
        except ForwardRefused as exc:
            log.warning(
                "forward.refused",
                reason=exc.reason,
                at="rcpt",
                mail_from=envelope.mail_from,
                peer=_peer(session.peer),
            )
            self.metrics.observe_ingress("smtp", "rejected")
            return f"550 5.7.1 {exc.detail}"
        except JournalUnavailable:
            return "451 4.3.0 Temporary failure: try again later"
        self._answers[envelope] = target
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Journal the message; the reply code tells the sending server what to do with it."""
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # only with decode_data=True, which we never set
            raw = raw.encode("utf-8", "surrogateescape")
        answer = self._answers.pop(envelope, None)
        if answer is not None and self.forward is not None:
            return await self.forward.answer(answer, bytes(raw))
        peer = session.peer
        headers = {
            # What the transport knows; kept with dead letters for inspection.
            "x-smtp-mail-from": envelope.mail_from or "",
            "x-smtp-rcpt-to": ", ".join(envelope.rcpt_tos),
            "x-smtp-helo": session.host_name or "",
            "x-smtp-peer": _peer(peer),
        }
        try:
            outcome = await self.intake.accept(SOURCE, bytes(raw), headers)
        except JournalUnavailable:
            self.metrics.observe_ingress("smtp", "unavailable")
            log.warning(
                "smtp.not_accepted", reason="journal_unavailable", peer=headers["x-smtp-peer"]
            )
            return "451 4.3.0 Temporary failure: the journal is unavailable, try again later"
        if outcome.reason is not None:
            self.metrics.observe_ingress("smtp", "rejected")
            # One line only: a CR/LF in the detail would break the SMTP reply.
            detail = " ".join(outcome.detail.split())[:200]
            return f"554 5.6.0 Message rejected: {outcome.reason}" + (
                f" ({detail})" if detail else ""
            )
        self.metrics.observe_ingress("smtp", "accepted")
        return "250 2.0.0 OK: queued for routing"


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")


async def start_smtp(
    intake: Intake,
    metrics: Metrics,
    addr: str,
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE,
    hostname: str | None = None,
    forward: ForwardAnswers | None = None,
) -> asyncio.Server:
    """Listen on ``addr`` (``host:port``) on the running loop; close with ``server.close()``.

    ``hostname`` is the name in the greeting; resolved once here, because aiosmtpd would
    otherwise look up the FQDN (a DNS query) for every connection.
    """
    loop = asyncio.get_running_loop()
    host, port = parse_addr(addr)
    handler = IntakeHandler(intake, metrics, forward)
    name = hostname or socket.gethostname()

    def protocol() -> SMTP:
        return SMTP(
            handler,
            data_size_limit=max_message_size,
            enable_SMTPUTF8=True,
            hostname=name,
            ident="Stellwerk ESMTP",
            loop=loop,
        )

    return await loop.create_server(protocol, host, port, reuse_address=True)
