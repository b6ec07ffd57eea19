"""Engine events for tests that feed consumers by hand: give the fields the test is about,
the others get plain values (a chat contact ``x`` without a queue, first time routed...)."""

from __future__ import annotations

from typing import Any, get_args

import msgspec

from router.events import EngineEvent
from router.messages import EventCmd

_BY_TYPE = {cls.__struct_config__.tag: cls for cls in get_args(EngineEvent)}
_PLAIN: dict[str, Any] = {
    "at": 0.0,
    "contact_id": "x",
    "channel": "chat",
    "source": "test",
    "queue": None,
    "priority": 0,
    "expert": False,
    "expert_id": None,
    "crowd": False,
    "customer_id": "c1",
    "agent_id": "a1",
    "offer_id": "o1",
    "waited": 0.0,
    "reason": None,
    "rule": "r",
    "first": True,
    "handled": 0.0,
    "outcome": "done",
    "disposition": None,
    "wrap_up": 0.0,
    "missed": 1,
    "until": 0.0,
    "state": "queued",
    "previous": "available",
    "from_state": "queued",
    "by": None,
    "by_expert": None,
    "to": "q",
    "step": 1,
    "keys": (),
    "merged": (),
}


def event_cmd(kind: str, **fields: Any) -> EventCmd:
    """An :class:`EventCmd` carrying a ``kind`` event with ``fields`` (the rest plain)."""
    cls = _BY_TYPE[kind]
    needed = {f.name: _PLAIN[f.name] for f in msgspec.structs.fields(cls) if f.required}
    return EventCmd(event=cls(**{**needed, **fields}))
