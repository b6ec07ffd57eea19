"""The routing file's schema: msgspec Structs, unknown fields refused.

A routing file (``config/routing.yaml``) declares skills, the capacity model, queues, agents,
crowd experts and the ordered rules. Structural validation happens here when msgspec converts
the YAML; semantic validation (queue and skill references, expressions, the default rule) is in
:mod:`rules.load`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from channels.contact_event import Channel

#: the disposition of a contact a supervisor released from a stuck agent (always known).
RELEASED_BY_SUPERVISOR = "released_by_supervisor"

Strategy = Literal["longest_idle", "most_skilled", "least_occupied", "round_robin"]


class Sla(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Service level target: answer ``percent`` % of contacts within ``seconds``."""

    seconds: float = 20.0
    percent: float = 80.0


class CapacityModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The shared capacity budget: each channel costs ``cost[channel]`` of an agent's ``budget``.

    With the defaults one call (60) blocks everything, three chats (3 x 20) or five emails
    (5 x 12) fill an agent, and mixes in between are allowed. Per-channel limits on the agent
    apply on top of the budget.
    """

    budget: int = 60
    cost: dict[Channel, int] = msgspec.field(
        default_factory=lambda: {"phone": 60, "chat": 20, "email": 12, "social": 12}
    )


class Defaults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Engine-wide defaults; queues may override ``offer_timeout`` and ``wrap_up``."""

    offer_timeout: float = 20.0
    max_missed_offers: int = 3
    reject_cooldown: float = 300.0
    preferred_agent_seconds: float = 3600.0
    wrap_up: float = 0.0
    history_length: int = 10
    #: how long a customer with nothing open is remembered after their last contact.
    customer_retention: float = 30 * 86400.0


class Announcement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A recording played to a held caller every ``every`` seconds (``media`` in the PBX's own
    terms, e.g. Asterisk ``sound:queue-periodic-announce``, a FreeSWITCH file path, a URL)."""

    media: str
    every: float


class Queue(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A skill queue. ``skills`` maps a skill name to the minimum proficiency (1-5) required.

    Telephony: ``phone_offer`` says what an offer of a call means. ``phone`` (default): the
    offer *is* the agent's phone ringing (answer = accept, busy/declined = reject, no answer =
    the offer expires). ``desktop``: the agent accepts on the desktop first and is rung then.
    A held caller hears the PBX's music-on-hold class ``music_class`` and, if set, the
    ``announcement`` every so often.
    """

    skills: dict[str, int] = msgspec.field(default_factory=dict)
    channels: tuple[Channel, ...] = ("phone", "email", "chat", "social")
    weight: float = 1.0
    sla: Sla = msgspec.field(default_factory=Sla)
    max_wait: float | None = None
    max_length: int | None = None
    overflow: str | None = None
    wrap_up: float | None = None
    offer_timeout: float | None = None
    strategy: Strategy = "longest_idle"
    description: str = ""
    phone_offer: Literal["phone", "desktop"] = "phone"
    music_class: str = "default"
    announcement: Announcement | None = None


class Endpoints(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An agent's phone, per telephony system (each optional; shapes checked by rules.load).

    ``asterisk``: a channel technology and resource, ``PJSIP/1001``. ``freeswitch``: a dial
    string, ``user/1001@default`` or ``sofia/internal/1001@pbx.example.com``. ``twilio``:
    ``client:anna``, an E.164 number ``+4930123456`` or a SIP URI ``sip:anna@example.com``.
    """

    asterisk: str | None = None
    freeswitch: str | None = None
    twilio: str | None = None


class AgentAccounts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The agent's own accounts on the platforms Stellwerk acts on for it.

    ``chatwoot``: the agent's numeric user id in Chatwoot (conversations are assigned to it);
    ``rocketchat``: the agent's Rocket.Chat user id (``_id``, not the user name; rooms are
    forwarded to it); ``discourse``: the agent's Discourse user name (topic assignment).
    """

    chatwoot: int | None = None
    rocketchat: str | None = None
    discourse: str | None = None


class Agent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An agent. ``capacity`` is the per-channel limit of simultaneous contacts (0: never).

    ``endpoints`` names the agent's phone on each telephony system; ``accounts`` maps the agent
    to its user on chat and community platforms.
    """

    id: str
    name: str = ""
    skills: dict[str, int] = msgspec.field(default_factory=dict)
    capacity: dict[Channel, int] = msgspec.field(
        default_factory=lambda: {"phone": 1, "chat": 3, "email": 5, "social": 5}
    )
    budget: int | None = None
    accounts: AgentAccounts = msgspec.field(default_factory=AgentAccounts)
    endpoints: Endpoints = msgspec.field(default_factory=Endpoints)


class Expert(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A crowd member (champion, community expert, field expert) and the keys that find them."""

    id: str
    name: str = ""
    level: int = 1
    skills: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    handles: tuple[str, ...] = ()


class Escalation(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One step of an escalation plan, ``after`` seconds of waiting (from arrival).

    ``skills`` replaces the contact's extra skill requirements (use lower proficiencies or
    fewer skills to widen the pool); ``queue`` moves the contact, keeping its wait;
    ``priority`` raises it.
    """

    after: float
    skills: dict[str, int] | None = None
    queue: str | None = None
    priority: int | None = None


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A routing rule: the first whose ``when`` holds decides (``when`` absent: always holds)."""

    name: str
    when: str | None = None
    queue: str | None = None
    priority: int = 0
    skills: dict[str, int] = msgspec.field(default_factory=dict)
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    escalate: tuple[Escalation, ...] = ()
    crowd_first: float | None = None
    reject: str | None = None
    default: bool = False


class RoutingFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole routing file."""

    version: int = 1
    timezone: str = "UTC"
    defaults: Defaults = msgspec.field(default_factory=Defaults)
    capacity: CapacityModel = msgspec.field(default_factory=CapacityModel)
    skills: tuple[str, ...] = ()
    queues: dict[str, Queue] = msgspec.field(default_factory=dict)
    agents: tuple[Agent, ...] = ()
    experts: tuple[Expert, ...] = ()
    experts_file: str | None = None
    #: the reasons an agent may give for ``away`` (code -> label shown on the desk); empty:
    #: any reason is taken, as before the list existed.
    away_reasons: dict[str, str] = msgspec.field(default_factory=dict)
    #: the outcomes an agent may complete a contact with (code -> label); see
    #: :data:`RELEASED_BY_SUPERVISOR` for the one built in.
    dispositions: dict[str, str] = msgspec.field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
