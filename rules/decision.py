"""What the rules see of a customer, and what they decide about a contact."""

from __future__ import annotations

import msgspec

from rules.schema import Escalation


class CustomerView(msgspec.Struct, frozen=True, kw_only=True):
    """The customer as routing conditions see it (``customer.expert``, ``customer.vip`` ...).

    ``contacts`` is how many earlier contacts the customer has in their history.
    """

    id: str = ""
    known: bool = False
    expert: bool = False
    expert_level: int = 0
    vip: bool = False
    contacts: int = 0


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of routing one contact: the first matching rule's settings.

    ``queue`` is None only when ``reject`` is set (the contact is refused, e.g. as spam).
    """

    rule: str
    queue: str | None
    priority: int = 0
    skills: dict[str, int] = msgspec.field(default_factory=dict)
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    escalate: tuple[Escalation, ...] = ()
    crowd_first: float | None = None
    reject: str | None = None
