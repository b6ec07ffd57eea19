"""The crowd experts the engine knows: who they are, how to recognise them, how active they are.

Experts come from the routing file (and its experts file) and from runtime edits through the
admin API (engine inputs ``UpsertExpert`` / ``RemoveExpert``), which win over the file until the
expert is removed. Their records live in the engine state, so the journal and the snapshots in
Redis persist them, activity included. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from channels.contact_event import ContactEvent
from router.events import ExpertRemoved, ExpertUpdated
from router.messages import Command, EventCmd, RefusedCmd
from router.state import EngineState, ExpertRec
from rules.identity import email_key, handle_key, phone_key
from rules.schema import Expert
from rules.table import RoutingTable, expert_keys

DAY = 86_400.0


class ExpertRegistry:
    """The experts in an engine state, with an index from identity key to expert."""

    def __init__(self, state: EngineState) -> None:
        self._state = state
        self._by_key: dict[str, str] = {}

    def sync_file(self, table: RoutingTable) -> None:
        """Take the routing file's experts; runtime (admin API) edits keep precedence."""
        experts = self._state.experts
        in_file = set()
        for expert in table.experts:
            in_file.add(expert.id)
            rec = experts.get(expert.id)
            if rec is None:
                rec = experts[expert.id] = ExpertRec(id=expert.id)
            elif rec.origin != "file":
                continue
            rec.name, rec.level = expert.name, expert.level
            rec.skills, rec.keys = list(expert.skills), list(expert_keys(expert))
            rec.removed = False
        for rec in experts.values():
            if rec.origin == "file" and rec.id not in in_file:
                rec.removed = True  # gone from the file: keep its record, stop recognising it
        self._index()

    def _index(self) -> None:
        self._by_key = {}
        for rec in self._state.experts.values():
            if not rec.removed:
                for key in rec.keys:
                    self._by_key.setdefault(key, rec.id)

    def find(self, keys: Iterable[str]) -> ExpertRec | None:
        """The expert any of these identity keys belongs to, if any."""
        for key in keys:
            expert_id = self._by_key.get(key)
            if expert_id is not None:
                return self._state.experts[expert_id]
        return None

    def upsert(self, expert: Expert, now: float) -> Command:
        """Add or change an expert at runtime."""
        keys = [phone_key(p) for p in expert.phones] + [email_key(e) for e in expert.emails]
        keys += [k for h in expert.handles if (k := handle_key(h)) is not None]
        rec = self._state.experts.get(expert.id) or ExpertRec(id=expert.id)
        self._state.experts[expert.id] = rec
        rec.name, rec.level, rec.skills, rec.keys = (
            expert.name,
            expert.level,
            list(expert.skills),
            keys,
        )
        rec.origin, rec.removed = "api", False
        self._index()
        return EventCmd(event=ExpertUpdated(at=now, expert_id=rec.id, keys=tuple(keys)))

    def remove(self, expert_id: str, now: float) -> Command:
        """Stop recognising an expert (also one from the routing file, until re-added)."""
        rec = self._state.experts.get(expert_id)
        if rec is None or rec.removed:
            return RefusedCmd(agent_id=None, reason="unknown_expert", detail=expert_id)
        rec.origin, rec.removed = "api", True
        self._index()
        return EventCmd(event=ExpertRemoved(at=now, expert_id=expert_id))

    def is_answer(self, expert: ExpertRec, event: ContactEvent) -> bool:
        """Is an expert's reply in a community thread an answer, i.e. not in their own thread?

        A thread the engine never saw (started before Stellwerk, or by someone who never wrote
        to us) is taken as someone else's: experts rarely reply to nobody.
        """
        st = self._state
        contact = st.contacts.get(event.contact_id)
        if contact is not None:
            return contact.expert_id != expert.id
        done = st.finished.get(event.contact_id)
        if done is None:
            return True
        own = {st.keys.get(k) for k in expert.keys}
        return done[3] not in own

    def report(self, now: float) -> dict[str, Any]:
        """The crowd's health as a community manager needs it: who was active when, who never
        answered, answers per expert, and the waits and outcomes of the experts' own contacts."""
        rows = []
        summary = dict.fromkeys(
            ("experts", "active_day", "active_week", "inactive", "never_seen", "never_answered"), 0
        )
        for rec in self._state.experts.values():
            if rec.removed:
                continue
            activity = _activity(rec.last_seen, now)
            summary["experts"] += 1
            summary[activity] += 1
            summary["never_answered"] += rec.answers == 0
            rows.append(
                {
                    "id": rec.id,
                    "name": rec.name,
                    "level": rec.level,
                    "skills": rec.skills,
                    "origin": rec.origin,
                    "activity": activity,
                    "last_seen": rec.last_seen,
                    "answers": rec.answers,
                    "last_answer": rec.last_answer,
                    "contacts": rec.contacts,
                    "answered": rec.answered,
                    "abandoned": rec.abandoned,
                    "mean_wait": rec.wait_total / rec.answered if rec.answered else None,
                    "max_wait": rec.wait_max if rec.answered else None,
                }
            )
        return {"summary": summary, "experts": rows}


def _activity(last_seen: float | None, now: float) -> str:
    if last_seen is None:
        return "never_seen"
    if last_seen >= now - DAY:
        return "active_day"
    if last_seen >= now - 7 * DAY:
        return "active_week"
    return "inactive"
