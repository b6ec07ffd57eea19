"""The contact and agent lifecycles as explicit transition tables.

Every state change in the engine goes through :func:`contact_transition` or
:func:`agent_transition`; a change that is not in the table raises :class:`IllegalTransition`
instead of being ignored, so a bug shows up as an error and not as an agent silently stuck in a
state (the most common complaint about other ACDs).
"""

from __future__ import annotations

from typing import Literal

ContactState = Literal[
    "received",
    "crowd_window",
    "queued",
    "offered",
    "assigned",
    "wrap_up",
    "done",
    "abandoned",
    "answered_by_crowd",
    "rejected",
]
AgentState = Literal["offline", "available", "away", "wrap_up", "not_responding"]

#: Contact states after which a contact is finished and leaves the engine.
FINAL_CONTACT_STATES: frozenset[ContactState] = frozenset(
    {"done", "abandoned", "answered_by_crowd", "rejected"}
)

CONTACT_TRANSITIONS: dict[ContactState, frozenset[ContactState]] = {
    "received": frozenset({"crowd_window", "queued", "rejected"}),
    # The community backstop: the crowd answers, the asker gives up, or the window ends.
    "crowd_window": frozenset({"queued", "answered_by_crowd", "abandoned"}),
    # queued -> rejected: overflowed into a full queue with no overflow target.
    "queued": frozenset({"offered", "abandoned", "answered_by_crowd", "rejected"}),
    # offered -> queued: expired (RONA), rejected, or the agent logged out / went away.
    "offered": frozenset({"assigned", "queued", "abandoned", "answered_by_crowd"}),
    # assigned -> queued: the agent logged out with the contact still open.
    "assigned": frozenset({"wrap_up", "done", "queued"}),
    "wrap_up": frozenset({"done"}),
    "done": frozenset(),
    "abandoned": frozenset(),
    "answered_by_crowd": frozenset(),
    "rejected": frozenset(),
}

AGENT_TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    "offline": frozenset({"available", "away"}),
    "available": frozenset({"away", "offline", "wrap_up", "not_responding"}),
    # away -> away: a new reason (break, meeting, training ...).
    "away": frozenset({"available", "offline", "away"}),
    "wrap_up": frozenset({"available", "away", "offline"}),
    "not_responding": frozenset({"available", "away", "offline"}),
}


class IllegalTransition(Exception):
    """A lifecycle change that the transition table does not allow."""

    def __init__(self, what: str, ident: str, old: str, new: str) -> None:
        self.what, self.ident, self.old, self.new = what, ident, old, new
        super().__init__(f"{what} {ident}: illegal transition {old} -> {new}")


def contact_transition(contact_id: str, old: ContactState, new: ContactState) -> ContactState:
    """Return ``new`` if a contact may go from ``old`` to ``new``, else raise."""
    if new not in CONTACT_TRANSITIONS[old]:
        raise IllegalTransition("contact", contact_id, old, new)
    return new


def agent_transition(agent_id: str, old: AgentState, new: AgentState) -> AgentState:
    """Return ``new`` if an agent may go from ``old`` to ``new``, else raise."""
    if new not in AGENT_TRANSITIONS[old]:
        raise IllegalTransition("agent", agent_id, old, new)
    return new
