"""One customer across channels: identity keys resolved to a customer, and their history.

A key is ``phone:+4930...``, ``email:...`` or ``handle:source:user`` (see
:mod:`rules.identity`). Keys a contact carries together are linked to one customer; the admin
API links keys by hand (engine input ``LinkKeys``). The records live in the engine state, so
the journal and the snapshots in Redis persist them. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from router.events import CustomerLinked
from router.messages import Command, EventCmd, RefusedCmd
from router.state import (
    Changes,
    ContactRec,
    CustomerRec,
    EngineState,
    ExpertRec,
    HistoryItem,
    moved,
)
from rules.identity import email_key, handle_key, phone_key

#: The least recent customers are forgotten in bursts: once every this many look-ups, up to
#: twice as many of them. Not a little on every look-up: the table is a dict kept in order of
#: the last contact, and CPython finds the first entry of a dict that is deleted from at the
#: front by skipping every deleted slot before it, until the dict next resizes. One look at the
#: oldest per contact cost 30 µs at 100,000 customers and 60 µs at a million, more than the
#: rest of the routing decision; one scan per burst costs that once.
FORGET_EVERY = 16


class CustomerDirectory:
    """The customers in an engine state, kept in order of their last contact."""

    def __init__(self, state: EngineState, changes: Changes | None = None) -> None:
        self._state = state
        # The changes a delta snapshot writes (see router.state.Changes).
        self._changes = changes if changes is not None else Changes()
        # Look-ups since the last burst of forgetting (see FORGET_EVERY).
        self._since_forget = 0

    def resolve(
        self,
        contact_id: str,
        keys: tuple[str, ...],
        expert: ExpertRec | None,
        now: float,
        retention: float,
    ) -> CustomerRec:
        """Find or create the customer behind a contact's identity keys; link its keys.

        The least recent customers with nothing open are forgotten after ``retention``
        seconds, in small bursts (:data:`FORGET_EVERY`), so a daemon that runs for months keeps
        its memory and snapshots bounded without a pause.
        """
        st = self._state
        self._forget(now - retention)
        customer: CustomerRec | None = None
        for key in keys:
            cid = st.keys.get(key)
            if cid is not None:
                customer = st.customers[cid]
                break
        if customer is None:
            st.seq += 1
            if expert is not None:
                cid = f"expert:{expert.id}"
            elif keys:
                cid = f"c{st.seq}"
            else:
                # Nobody to recognise (withheld number): a customer for this contact only.
                cid = f"anon:{contact_id}"
            customer = st.customers.get(cid) or CustomerRec(id=cid)
        # Move to the most recent end.
        st.customers.pop(customer.id, None)
        st.customers[customer.id] = customer
        moved(self._changes.customers, customer.id)
        customer.last_seen = now
        customer.open += 1
        new_keys = [key for key in dict.fromkeys(keys) if key not in st.keys]
        if new_keys:
            for key in new_keys:
                st.keys[key] = customer.id
                self._changes.keys[key] = True
            # A list of the exact size: an appended-to list keeps spare slots, and a backlog of
            # a million customers pays for them.
            customer.keys = [*customer.keys, *new_keys]
        return customer

    def _forget(self, horizon: float) -> None:
        self._since_forget += 1
        if self._since_forget < FORGET_EVERY:
            return
        self._since_forget = 0
        customers = self._state.customers
        gone: list[CustomerRec] = []
        for oldest in customers.values():  # one scan of the front (see FORGET_EVERY)
            if len(gone) == 2 * FORGET_EVERY or oldest.open > 0 or oldest.last_seen >= horizon:
                break
            gone.append(oldest)
        for oldest in gone:
            del customers[oldest.id]
            moved(self._changes.customers, oldest.id)
            for key in oldest.keys:
                if self._state.keys.get(key) == oldest.id:
                    del self._state.keys[key]
                    self._changes.keys[key] = True

    def closed(self, contact: ContactRec) -> None:
        """A contact of this customer is finished; a customer nobody can recognise goes."""
        customer = self._state.customers.get(contact.customer_id)
        if customer is not None:
            customer.open -= 1
            if not customer.keys:
                del self._state.customers[customer.id]
                moved(self._changes.customers, customer.id)
            else:
                self._changes.customers.setdefault(customer.id, False)

    def remember(self, contact: ContactRec, subject: str | None, now: float, limit: int) -> None:
        """Add a new contact (with its event's ``subject``) to its customer's history (at most
        ``limit`` entries kept)."""
        customer = self._state.customers[contact.customer_id]
        item = HistoryItem(
            contact_id=contact.id,
            channel=contact.channel,
            source=contact.source,
            at=now,
            subject=subject,
            queue=contact.queue,
        )
        # A new list of the exact size (see ``resolve``), of the latest ``limit`` entries.
        kept = customer.history[len(customer.history) - limit + 1 :] if limit > 1 else []
        customer.history = [*kept, item]
        self._changes.customers.setdefault(customer.id, False)

    def update_history(self, contact: ContactRec, **changes: Any) -> None:
        """Update the contact's (latest) entry in its customer's history."""
        customer = self._state.customers.get(contact.customer_id)
        if customer is None:
            return
        self._changes.customers.setdefault(customer.id, False)
        entries = customer.history
        if entries and entries[-1].contact_id == contact.id:  # its own entry is the latest
            for name, value in changes.items():
                setattr(entries[-1], name, value)
            return
        for item in reversed(entries):
            if item.contact_id == contact.id:
                for name, value in changes.items():
                    setattr(item, name, value)
                return

    def link(self, raw_keys: Iterable[str], now: float, history_length: int) -> Command:
        """Merge the customers behind ``raw_keys`` into one, and bind every key to it."""
        keys = []
        for raw in raw_keys:
            key = normalise_key(raw)
            if key is None:
                return RefusedCmd(agent_id=None, reason="bad_identity_key", detail=raw)
            keys.append(key)
        st = self._state
        found = list(dict.fromkeys(st.keys[k] for k in keys if k in st.keys))
        # An expert's record is the one to keep: their id is what the reports know.
        found.sort(key=lambda cid: not cid.startswith("expert:"))
        if found:
            target = st.customers[found[0]]
        else:
            st.seq += 1
            target = st.customers[f"c{st.seq}"] = CustomerRec(id=f"c{st.seq}", last_seen=now)
        changes = self._changes
        if found:
            changes.customers.setdefault(target.id, False)
        else:
            moved(changes.customers, target.id)
        for cid in found[1:]:
            other = st.customers.pop(cid)
            moved(changes.customers, cid)
            target.history = sorted(target.history + other.history, key=lambda h: h.at)
            del target.history[: max(0, len(target.history) - history_length)]
            target.open += other.open
            target.vip = target.vip or other.vip
            target.last_seen = max(target.last_seen, other.last_seen)
            if other.last_agent is not None and other.last_agent_at > target.last_agent_at:
                target.last_agent, target.last_agent_at = other.last_agent, other.last_agent_at
            for key in other.keys:
                st.keys[key] = target.id
                changes.keys[key] = True
                target.keys.append(key)
            for contact in st.contacts.values():
                if contact.customer_id == cid:
                    contact.customer_id = target.id
                    changes.contacts.setdefault(contact.id, False)
        for key in keys:
            if st.keys.get(key) != target.id:
                st.keys[key] = target.id
                changes.keys[key] = True
                target.keys.append(key)
        return EventCmd(
            event=CustomerLinked(
                at=now, customer_id=target.id, keys=tuple(target.keys), merged=tuple(found[1:])
            )
        )

    def info(
        self, ref: str, expert_for: Callable[[Iterable[str]], ExpertRec | None]
    ) -> dict[str, Any] | None:
        """A customer by id or by identity key: keys, whether an expert, recent contacts."""
        st = self._state
        key = normalise_key(ref) if ":" in ref else None
        customer = st.customers.get(ref) or st.customers.get(st.keys.get(key or "", ""))
        if customer is None:
            return None
        expert = expert_for(customer.keys)
        return {
            "customer_id": customer.id,
            "keys": list(customer.keys),
            "expert_id": expert.id if expert is not None else None,
            "vip": customer.vip,
            "open": customer.open,
            "last_agent": customer.last_agent,
            "history": [msgspec.structs.asdict(h) for h in reversed(customer.history)],
        }


def history(customer: CustomerRec, current: str) -> list[dict[str, Any]]:
    """The customer's other contacts, most recent first, as plain dicts for an offer.

    Only the latest entry with the current contact's id is the contact itself; earlier ones
    are the same conversation's completed rounds (a chat reopened days later) and are history.
    """
    entries = customer.history
    if len(entries) == 1 and entries[0].contact_id == current:
        return []  # a first contact (the usual case): no history to hand out
    items = list(reversed(entries))
    for i, item in enumerate(items):
        if item.contact_id == current:
            del items[i]
            break
    return [msgspec.structs.asdict(item) for item in items]


def normalise_key(raw: str) -> str | None:
    """``phone:030 123456`` -> ``phone:+4930123456`` and so on; None for an unknown kind."""
    kind, _, value = raw.partition(":")
    if not value.strip():
        return None
    if kind == "phone":
        return phone_key(value)
    if kind == "email":
        return email_key(value)
    if kind == "handle":
        return handle_key(value)
    return None
