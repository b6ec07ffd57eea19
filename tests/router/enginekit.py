"""Helpers for engine tests: build a routing table from YAML text, make events, run commands."""

from __future__ import annotations

import textwrap
from typing import Any

from channels.contact_event import ContactEvent, Sender
from router.engine import Engine
from router.messages import Accept, Command, Complete, EventCmd, Login, OfferCmd
from rules.load import parse_routing
from rules.table import RoutingTable


def table(yaml_text: str) -> RoutingTable:
    """A routing table from (dedented) YAML text."""
    return parse_routing(textwrap.dedent(yaml_text), "test-routing.yaml")


def engine(yaml_text: str) -> Engine:
    return Engine(table(yaml_text))


def call(
    ident: str,
    *,
    phone: str | None = None,
    to: str | None = None,
    channel: str = "phone",
    text: str | None = None,
    kind: str = "new",
    email: str | None = None,
    handle: str | None = None,
    source: str = "generic",
    tags: tuple[str, ...] = (),
    end_reason: str | None = None,
) -> ContactEvent:
    """A ContactEvent with the given identity (``contact_id`` is ``generic:{ident}``)."""
    return ContactEvent(
        kind=kind,  # type: ignore[arg-type]
        contact_id=f"{source}:{ident}",
        channel=channel,  # type: ignore[arg-type]
        source=source,
        external_id=ident,
        thread_id=ident,
        sender=Sender(phone=phone, email=email, handle=handle),
        to=to,
        text=text,
        tags=tags,
        end_reason=end_reason,
    )


def offers(cmds: list[Command]) -> list[OfferCmd]:
    return [c for c in cmds if isinstance(c, OfferCmd)]


def events(cmds: list[Command], kind: str | None = None) -> list[EventCmd]:
    return [c for c in cmds if isinstance(c, EventCmd) and (kind is None or c.type == kind)]


def offered_to(cmds: list[Command]) -> list[tuple[str, str]]:
    """(contact_id, agent_id) of every offer in ``cmds``."""
    return [(o.contact_id, o.agent_id) for o in offers(cmds)]


def login_all(eng: Engine, ids: list[str], now: float = 0.0) -> list[Command]:
    out: list[Command] = []
    for agent_id in ids:
        out += eng.handle(Login(agent_id=agent_id), now)
    return out


def accept_and_complete(eng: Engine, offer: OfferCmd, now: float, handled: float) -> list[Any]:
    out: list[Command] = eng.handle(Accept(agent_id=offer.agent_id, offer_id=offer.offer_id), now)
    out += eng.handle(Complete(agent_id=offer.agent_id, contact_id=offer.contact_id), now + handled)
    return out
