"""The engine state in bounded chunks: what the daemon writes to Redis as one snapshot.

:meth:`~router.engine.Engine.snapshot` is the whole state as one JSON document, which is fine
for tests and tools but not for a million waiting mails: Redis caps one value at 512 MB, and
one document is one long encode and one long decode. Here the same records are written as a
sequence of msgpack chunks, each at most :data:`CHUNK_BYTES` (a single record larger than that,
which the bounded histories make unlikely, gets a chunk of its own). The first chunk holds the
scalars; then come the records of each table of :class:`~router.state.EngineState` in their
insertion order (the engine's iteration order is part of its behaviour), as lists rather than
``id -> record`` maps, so a decoded record and its table key are one string.

**Restore** is most of a daemon's restart with a large backlog, so the layout serves the
decoder (format 2). Contacts come before customers: reading a customer's history, the builder
finds the live contact of each entry and shares its id and time with it, and the customer's
id with the contact, in the same pass. Each contacts and customers chunk carries the few
distinct ``(queue, rule, source, channel)`` of its records (and of the history entries) and an
index per record, so the builder shares those strings by assigning one tuple, not by a look-up
per field. The identity-key index is not written at all: the builder binds every key of a
customer's ``keys`` to it, and :class:`KeyFixes` lists only the keys for which that is wrong.
The restored key index is equal to the engine's, in another order (the engine only looks keys
up). The builder decodes with the cyclic collector off (decoding builds millions of objects;
a collection pass over all of them every few thousand allocations made restores take minutes).
Format 1 (customers first, the key index as a table) is still read.

**Deltas** (:func:`encode_changes`) make snapshots incremental: the engine marks the records
it changes (:class:`~router.state.Changes`), and a delta holds the scalars, the small tables
whole, and of the big ones only the changed records (moved to the end of their table, changed
in place, or removed). It starts with a head of its own; :class:`StateBuilder` applies the
deltas after a full snapshot in order, so the result is the state at the last delta's cut.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec

from channels.contact_event import ContactEvent
from router.state import (
    NO_EXCLUSIONS,
    AgentRec,
    Changes,
    ContactRec,
    CustomerRec,
    EngineState,
    ExpertRec,
    HistoryItem,
    OfferRec,
    QueueCounters,
)

#: the largest chunk the encoder writes (unless one record alone is larger).
CHUNK_BYTES = 4 * 1024 * 1024
#: records per chunk the encoder starts with; it adapts to the records' size.
_START_ITEMS = 2048
FORMAT = 2
#: the formats :class:`StateBuilder` reads (1: a table of keys, no vocabularies).
READS = (1, 2)
# The extra skills of every restored contact without any (never changed in place, see ContactRec).
_NO_SKILLS: dict[str, int] = {}


_DEFAULT_WORDS = {
    f.default: f.default
    for rec in (HistoryItem, ContactRec)
    for f in msgspec.structs.fields(rec)
    if isinstance(f.default, str)
}


class Head(msgspec.Struct, tag="head", array_like=True):
    """The scalars of the state, and the format of the chunks that follow."""

    format: int
    seq: int
    clock: float
    #: a delta (see :func:`encode_changes`): applied on top of the chunks before it.
    delta: bool = False


#: how a delta's records go into their table: appended (a whole table), moved to its end
#: (added, or put last again), or replaced where they are.
APPEND, MOVE, IN_PLACE = 0, 1, 2


class Contacts(msgspec.Struct, tag="contacts", array_like=True):
    items: list[ContactRec]
    #: format 2: the distinct ``(queue, rule, source, channel)`` of the chunk's records, and
    #: for each record the index of its own, so the builder shares the strings without a
    #: look-up per field.
    words: list[tuple[str, str, str, str]] = []
    which: list[int] = []
    mode: int = APPEND


class Customers(msgspec.Struct, tag="customers", array_like=True):
    items: list[CustomerRec]
    #: format 2: the distinct ``(channel, source, outcome, queue)`` of the chunk's history
    #: entries, and for each entry (customer by customer) the index of its own.
    words: list[tuple[str, str, str, str | None]] = []
    which: list[int] = []
    mode: int = APPEND


class Agents(msgspec.Struct, tag="agents", array_like=True):
    items: list[AgentRec]


class Offers(msgspec.Struct, tag="offers", array_like=True):
    items: list[OfferRec]


class Experts(msgspec.Struct, tag="experts", array_like=True):
    items: list[ExpertRec]


class Keys(msgspec.Struct, tag="keys", array_like=True):
    items: list[tuple[str, str]]


class Counters(msgspec.Struct, tag="counters", array_like=True):
    items: list[tuple[str, QueueCounters]]


class Finished(msgspec.Struct, tag="finished", array_like=True):
    items: list[tuple[str, list[str | None]]]


class KeyFixes(msgspec.Struct, tag="keyfixes", array_like=True):
    """Format 2: the identity keys that are not what the customers' own key lists say.

    The builder binds every key of a customer's ``keys`` to that customer (in customer order,
    so a later customer wins), then applies ``items`` and removes ``dropped``; the key index
    is then the engine's, without one record per key in the snapshot.
    """

    items: list[tuple[str, str]]
    dropped: list[str] = []


class Gone(msgspec.Struct, tag="gone", array_like=True):
    """A delta's removed records of one table ("contacts", "customers" or "finished")."""

    table: str
    ids: list[str]


Chunk = (
    Head
    | Contacts
    | Customers
    | Agents
    | Offers
    | Experts
    | Keys
    | Counters
    | Finished
    | KeyFixes
    | Gone
)

_ENCODER = msgspec.msgpack.Encoder()
_DECODER: msgspec.msgpack.Decoder[Chunk] = msgspec.msgpack.Decoder(Chunk)


def _encode_items(
    kind: Callable[[list[Any]], msgspec.Struct], items: Sequence[Any], limit: int
) -> Iterator[bytes]:
    """``items`` as chunks ``kind(part)`` of at most ``limit`` bytes each (halving when over)."""
    step = _START_ITEMS
    i = 0
    while i < len(items):
        part = list(items[i : i + step])
        data = _ENCODER.encode(kind(part))
        if len(data) > limit and len(part) > 1:
            step = max(1, len(part) // 2)
            continue
        yield data
        i += len(part)
        # Aim at half the bound, so that the next slice, a little larger, still fits.
        per_item = max(1, len(data) // len(part))
        step = max(1, (limit // 2) // per_item)


def _contacts(part: list[ContactRec], mode: int = APPEND) -> Contacts:
    """A contacts chunk with its vocabulary (see :class:`Contacts`)."""
    index: dict[tuple[str, str, str, str], int] = {}
    which = []
    for c in part:
        words = (c.queue, c.rule, c.source, c.channel)
        i = index.get(words)
        if i is None:
            i = index[words] = len(index)
        which.append(i)
    return Contacts(items=part, words=list(index), which=which, mode=mode)


def _customers(part: list[CustomerRec], mode: int = APPEND) -> Customers:
    """A customers chunk with the vocabulary of their history (see :class:`Customers`)."""
    index: dict[tuple[str, str, str, str | None], int] = {}
    which = []
    for u in part:
        for h in u.history:
            words = (h.channel, h.source, h.outcome, h.queue)
            i = index.get(words)
            if i is None:
                i = index[words] = len(index)
            which.append(i)
    return Customers(items=part, words=list(index), which=which, mode=mode)


def key_fixes(state: EngineState) -> tuple[list[tuple[str, str]], list[str]]:
    """The keys :class:`StateBuilder` would get wrong from the customers' key lists alone:
    ``(key, customer id)`` to bind, and keys to remove (see :class:`KeyFixes`)."""
    derived: dict[str, str] = {}
    for u in state.customers.values():
        for k in u.keys:
            derived[k] = u.id
    keys = state.keys
    bind = [(k, cid) for k, cid in keys.items() if derived.get(k) != cid]
    dropped = [k for k in derived if k not in keys]
    return bind, dropped


def _small_tables(state: EngineState, limit: int) -> Iterator[bytes]:
    yield from _encode_items(Agents, list(state.agents.values()), limit)
    yield from _encode_items(Offers, list(state.offers.values()), limit)
    yield from _encode_items(Experts, list(state.experts.values()), limit)
    yield from _encode_items(Counters, list(state.counters.items()), limit)


def encode_changes(state: EngineState, changes: Changes, limit: int = CHUNK_BYTES) -> list[bytes]:
    """A delta: what changed since the last cut (``changes``, from
    :meth:`~router.engine.Engine.take_changes`), as chunks to append to a snapshot.

    Written whole: the scalars and the small tables (agents, offers, experts, counters).
    Of the big tables only the changed records: those that moved (were added or put last
    again) in the order of their last move, those changed in place, and the ids of those
    removed; identity keys by key. :class:`StateBuilder` applies a delta on top of the chunks
    before it, so base + deltas in order is the state at the last delta's cut, order of the
    tables included. Encoded at once, on the caller's thread: the work is the size of the
    changes, not of the state (this is the router's stall for a delta snapshot).
    """
    out = [_ENCODER.encode(Head(format=FORMAT, seq=state.seq, clock=state.clock, delta=True))]
    out += _small_tables(state, limit)
    move, in_place, gone = _split(state.contacts, changes.contacts)
    out += _encode_items(partial(_contacts, mode=MOVE), move, limit)
    out += _encode_items(partial(_contacts, mode=IN_PLACE), in_place, limit)
    out += _encode_items(partial(Gone, "contacts"), gone, limit)
    move, in_place, gone = _split(state.customers, changes.customers)
    out += _encode_items(partial(_customers, mode=MOVE), move, limit)
    out += _encode_items(partial(_customers, mode=IN_PLACE), in_place, limit)
    out += _encode_items(partial(Gone, "customers"), gone, limit)
    # The keys: each changed key as it is now, and those of the customers written that the
    # customers' key lists alone would bind wrongly.
    keys = state.keys
    bind: dict[str, str] = {}
    dropped: list[str] = []
    for key in changes.keys:
        cid = keys.get(key)
        if cid is None:
            dropped.append(key)
        else:
            bind[key] = cid
    customers = state.customers
    for key in changes.customers:
        u = customers.get(key)
        if u is not None:
            uid = u.id
            for k in u.keys:
                cid = keys.get(k)
                if cid != uid:
                    if cid is None:
                        dropped.append(k)
                    else:
                        bind[k] = cid
    out += _encode_items(KeyFixes, list(bind.items()), limit)
    out += _encode_items(lambda part: KeyFixes(items=[], dropped=part), dropped, limit)
    finished = state.finished
    moved_done = [(k, finished[k]) for k in changes.finished if k in finished]
    gone_done = [k for k in changes.finished if k not in finished]
    out += _encode_items(Finished, moved_done, limit)
    out += _encode_items(partial(Gone, "finished"), gone_done, limit)
    return out


def _split(
    records: dict[str, Any], marks: dict[str, bool]
) -> tuple[list[Any], list[Any], list[str]]:
    """The marked records that moved (in order), changed in place, and are gone."""
    move, in_place, gone = [], [], []
    for key, was_moved in marks.items():
        rec = records.get(key)
        if rec is None:
            if was_moved:
                gone.append(key)
        elif was_moved:
            move.append(rec)
        else:
            in_place.append(rec)
    return move, in_place, gone


def encode_state(state: EngineState, limit: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The state as chunks of at most ``limit`` bytes; :class:`StateBuilder` reads them back.

    The state must not change while the iterator runs (the daemon encodes in a forked child,
    which has a frozen copy of it).
    """
    yield _ENCODER.encode(Head(format=FORMAT, seq=state.seq, clock=state.clock))
    yield from _small_tables(state, limit)
    # Contacts before customers: the builder shares a live contact's id with the customer's
    # history entry of it, and the customer's id with the contact, as it reads the customers.
    yield from _encode_items(_contacts, list(state.contacts.values()), limit)
    yield from _encode_items(_customers, list(state.customers.values()), limit)
    bind, dropped = key_fixes(state)
    yield from _encode_items(KeyFixes, bind, limit)
    yield from _encode_items(lambda part: KeyFixes(items=[], dropped=part), dropped, limit)
    yield from _encode_items(Finished, list(state.finished.items()), limit)


@dataclass
class ChainSize:
    """What a :class:`StateBuilder` was fed: the full state's chunks and bytes, and how many
    deltas followed it with how many bytes (a chain that goes on counts from here)."""

    base_chunks: int = 0
    base_bytes: int = 0
    deltas: int = 0
    delta_bytes: int = 0


class SnapshotError(ValueError):
    """The chunks do not make a snapshot (missing head, unknown format, not msgpack...)."""


class StateBuilder:
    """Rebuilds an :class:`EngineState` from :func:`encode_state`'s chunks, fed in order.

    Use it as a context manager: the cyclic collector is off while it is open (and restored
    to what it was when it closes).
    """

    def __init__(self) -> None:
        self.state: EngineState | None = None
        # One object per distinct string of the small vocabularies (queues, rules, sources...),
        # starting with the records' own defaults: ``omit_defaults`` leaves a field out of the
        # next snapshot only when it *is* the default object ("open"), not an equal string.
        self._words: dict[str, str] = dict(_DEFAULT_WORDS)
        self._gc_was_enabled = False
        self._format = FORMAT
        self._delta = False
        # Format 1's customers chunks, to share with the contacts once they are in (_put_held).
        self._held: list[Customers] = []
        #: the chunks fed so far, by part (full state, deltas).
        self.size = ChainSize()

    def __enter__(self) -> StateBuilder:
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._gc_was_enabled:
            gc.enable()

    def feed(self, data: bytes) -> None:
        """Decode one chunk into the state; raises :class:`SnapshotError` on a bad chunk."""
        try:
            chunk = _DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise SnapshotError(f"not a snapshot chunk: {exc}") from exc
        size = self.size
        if isinstance(chunk, Head) and chunk.delta:
            size.deltas += 1
        if size.deltas:
            size.delta_bytes += len(data)
        else:
            size.base_chunks += 1
            size.base_bytes += len(data)
        if isinstance(chunk, Head):
            if chunk.format not in READS:
                raise SnapshotError(f"snapshot format {chunk.format}, this version reads {FORMAT}")
            if self.state is None:
                if chunk.delta:
                    raise SnapshotError("a delta without the snapshot it changes")
                self._format = chunk.format
                self.state = EngineState(seq=chunk.seq, clock=chunk.clock)
                return
            if not chunk.delta:
                raise SnapshotError("a second head chunk")
            # A delta: new scalars, and the small tables come whole again.
            base = self.state
            self._put_held(base)
            base.seq, base.clock = chunk.seq, chunk.clock
            base.agents.clear()
            base.offers.clear()
            base.experts.clear()
            base.counters.clear()
            self._format = chunk.format
            self._delta = True
            return
        st = self.state
        if st is None:
            raise SnapshotError("records before the head chunk")
        if isinstance(chunk, Contacts):
            self._contacts(st, chunk)
        elif isinstance(chunk, Customers):
            self._customers(st, chunk)
        elif isinstance(chunk, KeyFixes):
            keys = st.keys
            owner_of = st.customers.get
            for key, cid in chunk.items:
                owner = owner_of(cid)
                keys[key] = owner.id if owner is not None else cid
            for key in chunk.dropped:
                keys.pop(key, None)
        elif isinstance(chunk, Keys):
            self._keys(st, chunk)
        elif isinstance(chunk, Agents):
            st.agents.update((a.id, a) for a in chunk.items)
        elif isinstance(chunk, Offers):
            st.offers.update((o.id, o) for o in chunk.items)
        elif isinstance(chunk, Experts):
            st.experts.update((e.id, e) for e in chunk.items)
        elif isinstance(chunk, Counters):
            st.counters.update(chunk.items)
        elif isinstance(chunk, Gone):
            table: dict[str, Any] = getattr(st, chunk.table)
            for key in chunk.ids:
                table.pop(key, None)
        elif self._delta:
            finished = st.finished
            for key, done in chunk.items:
                finished.pop(key, None)  # to the newest end
                finished[key] = done
        else:
            st.finished.update(chunk.items)

    def _shared(self, words: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """A chunk's vocabulary, each string the one object of the strings equal to it."""
        w = self._words.setdefault
        return [tuple(x if x is None else w(x, x) for x in t) for t in words]

    def _contacts(self, st: EngineState, chunk: Contacts) -> None:
        contacts = st.contacts
        items = chunk.items
        if self._format == 1:
            # No vocabulary: each record's strings are its own entry. The customers are in
            # already (format 1 wrote them first): the contact shares its customer's id.
            owner_of = st.customers.get
            for c in items:
                owner = owner_of(c.customer_id)
                if owner is not None:
                    c.customer_id = owner.id
            words = self._shared([(c.queue, c.rule, c.source, c.channel) for c in items])
            which: Iterable[int] = range(len(items))
        else:
            if chunk.mode == MOVE:
                for c in items:
                    contacts.pop(c.id, None)
            words = self._shared(chunk.words)
            which = chunk.which
        # This loop runs for every waiting contact: no calls of ours in it, and no look-up
        # per field (the vocabulary is shared once, then assigned by index).
        for c, i in zip(items, which, strict=True):
            c.queue, c.rule, c.source, c.channel = words[i]
            if not c.extra_skills:
                c.extra_skills = _NO_SKILLS
            if not c.excluded:
                c.excluded = NO_EXCLUSIONS
            if c.queue_entered_at == c.arrived_at:
                c.queue_entered_at = c.arrived_at
            contacts[c.id] = c

    def _customers(self, st: EngineState, chunk: Customers) -> None:
        if self._format == 1:
            # Format 1 wrote the customers before the contacts: in the table now (the contacts
            # and the keys look their owners up), shared with the contacts in _put_held().
            st.customers.update((u.id, u) for u in chunk.items)
            self._held.append(chunk)
            return
        self._put_customers(st, chunk, self._shared(chunk.words), chunk.which, st.keys)

    def _put_customers(
        self,
        st: EngineState,
        chunk: Customers,
        words: list[tuple[Any, ...]],
        which: Iterable[int],
        keys: dict[str, str],
    ) -> None:
        """The chunk's customers into the table, each history entry with its ``words[i]``.

        The contacts are in already: a history entry of a live contact and the contact share
        the id and the time, and the contact shares the customer's id. The customer's keys
        are bound to it in ``keys`` (the key index is not in the snapshot, see KeyFixes).
        """
        customers = st.customers
        if chunk.mode == MOVE:
            for u in chunk.items:
                customers.pop(u.id, None)
        entry = iter(which)
        live_contact = st.contacts.get
        for u in chunk.items:
            uid = u.id
            history = u.history
            for h in history:
                h.channel, h.source, h.outcome, h.queue = words[next(entry)]
                live = live_contact(h.contact_id)
                if live is not None:
                    h.contact_id = live.id
                    if h.at == live.arrived_at:
                        h.at = live.arrived_at
                    if live.customer_id == uid:
                        live.customer_id = uid
            if history and u.last_seen == history[-1].at:
                u.last_seen = history[-1].at
            for key in u.keys:
                keys[key] = uid
            customers[uid] = u

    def _put_held(self, st: EngineState) -> None:
        """Format 1's customers, now that the contacts are in (before a delta changes them,
        or at the end). Their key index was a table of its own, read already: the keys they
        bind go nowhere."""
        for chunk in self._held:
            entries = [
                (h.channel, h.source, h.outcome, h.queue) for u in chunk.items for h in u.history
            ]
            self._put_customers(st, chunk, self._shared(entries), range(len(entries)), {})
        self._held.clear()

    def _keys(self, st: EngineState, chunk: Keys) -> None:
        keys = st.keys
        customers = st.customers
        for key, cid in chunk.items:
            owner = customers.get(cid)
            if owner is None:
                keys[key] = cid
                continue
            # The customer's own copy of the key string, and its id: one object each.
            for mine in owner.keys:
                if mine == key:
                    key = mine
                    break
            keys[key] = owner.id

    def finish(self) -> EngineState:
        """The state fed so far; the history entries of live contacts share their ids."""
        st = self.state
        if st is None:
            raise SnapshotError("no head chunk: not a snapshot")
        self._put_held(st)
        self._words.clear()
        return st


def decode_legacy(data: bytes) -> tuple[EngineState, dict[str, ContactEvent]]:
    """A snapshot of the earlier format (the whole state as one JSON value, each contact with
    its whole ``event``): the state, and the contacts' events for the edge to keep."""
    try:
        raw = msgspec.json.decode(data)
        events: dict[str, ContactEvent] = {}
        for cid, contact in raw.get("contacts", {}).items():
            event = contact.pop("event", None)
            if event is not None:
                events[cid] = msgspec.convert(event, ContactEvent)
                contact.setdefault("source", event.get("source", ""))
        return msgspec.convert(raw, EngineState), events
    except (msgspec.DecodeError, msgspec.ValidationError, AttributeError) as exc:
        raise SnapshotError(f"not a snapshot: {exc}") from exc


def decode_state(chunks: Iterable[bytes]) -> EngineState:
    """The state of :func:`encode_state`'s chunks, in order."""
    with StateBuilder() as builder:
        for data in chunks:
            builder.feed(data)
        return builder.finish()
