"""Contacts' events at the edge: what the engine does not keep, kept in Redis until it is done.

The engine keeps of a contact only what routing needs (:class:`~router.state.ContactRec`); the
event that started it (body, attachments' metadata, sender, attributes...) is here, one field
per contact of the hash ``{key_prefix}payloads`` (the event as the journal holds it, JSON), so
a million waiting mails cost the router's memory a few hundred bytes each, not kilobytes.

* **Written** by the router when it applies the entry that created the contact (also in a
  replay), in the same batch and before the batch's commands go out, so the payload of every
  contact a snapshot holds is in Redis before that snapshot is, and the journal can be trimmed.
* **Read** where an offer is built: the router swaps the engine's stub
  (:func:`~router.state.contact_stub`) for the stored event before it publishes an offer or
  hands it to a sink, so offers carry exactly what they did when the engine kept whole events.
  The desk's snapshot of an agent's work and a reload that routes contacts again read it too.
* **Removed** once the contact is finished, at the next snapshot: deleting earlier could take
  the event away from a replay that re-publishes an offer after a crash.

Writes are fenced by the routing lease like the snapshot: a router that lost it cannot remove
what the new one just wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from channels.contact_event import ContactEvent
from router.daemon.journal import JournalUnavailable
from router.messages import Command, OfferCmd

log = structlog.get_logger("stellwerk.payloads")

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(ContactEvent)
# Fields per HMGET/HSET/HDEL call: one call stays small whatever the backlog.
_BATCH = 1000

# ARGV[1]: the lease token ('' = unfenced); ARGV[2]: how many field/value pairs follow to set;
# then those pairs, then the fields to delete.
_FENCED_WRITE = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[2])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 3, 2 + 2 * n)) end
if #ARGV > 2 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 3 + 2 * n)) end
return 1
"""


class PayloadStore:
    """The stored events of the contacts the engine is handling (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, key_prefix: str, lease_key: str = "") -> None:
        self.redis = client
        self.key = f"{key_prefix}payloads"
        self.lease_key = lease_key or f"{key_prefix}lease"
        self._write = client.register_script(_FENCED_WRITE)

    async def write(
        self,
        put: Mapping[str, ContactEvent],
        delete: Iterable[str] = (),
        *,
        lease_token: str | None = None,
    ) -> bool:
        """Store ``put`` (contact id -> event) and remove ``delete``; False when the lease is
        another router's (nothing written). Raises JournalUnavailable when Redis is down."""
        items = list(put.items())
        gone = list(delete)
        try:
            for i in range(0, max(len(items), len(gone), 1), _BATCH):
                part = items[i : i + _BATCH]
                args: list[str | bytes] = [lease_token or "", str(len(part))]
                for contact_id, event in part:
                    args += [contact_id, _ENCODER.encode(event)]
                args += gone[i : i + _BATCH]
                if len(args) == 2:
                    continue
                if not await self._write(keys=[self.key, self.lease_key], args=args):
                    return False
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return True

    async def events(self, contact_ids: Sequence[str]) -> dict[str, ContactEvent]:
        """The stored events of ``contact_ids`` (those that have one)."""
        out: dict[str, ContactEvent] = {}
        ids = list(dict.fromkeys(contact_ids))
        try:
            for i in range(0, len(ids), _BATCH):
                part = ids[i : i + _BATCH]
                values = await self.redis.hmget(self.key, part)  # type: ignore[misc]
                for contact_id, raw in zip(part, values, strict=True):
                    if raw is None:
                        continue
                    try:
                        out[contact_id] = _DECODER.decode(raw)
                    except msgspec.DecodeError:
                        log.error("payload.unreadable", contact_id=contact_id)
        except (RedisError, OSError) as exc:
            raise JournalUnavailable(str(exc)) from exc
        return out

    async def fill(
        self, cmds: Sequence[Command], known: Mapping[str, ContactEvent] | None = None
    ) -> list[Command]:
        """``cmds`` with every offer carrying its contact's stored event (from ``known`` when
        it is there, else from Redis). An offer whose event is missing keeps the engine's stub
        and is logged: the offer still goes out, with the contact's id, channel and source."""
        known = known or {}
        wanted = [
            c.contact_id for c in cmds if isinstance(c, OfferCmd) and c.contact_id not in known
        ]
        if not wanted and not any(isinstance(c, OfferCmd) for c in cmds):
            return list(cmds)
        found = await self.events(wanted) if wanted else {}
        out: list[Command] = []
        for cmd in cmds:
            if isinstance(cmd, OfferCmd):
                event = known.get(cmd.contact_id) or found.get(cmd.contact_id)
                if event is None:
                    log.error("payload.missing", contact_id=cmd.contact_id, offer_id=cmd.offer_id)
                else:
                    cmd = msgspec.structs.replace(cmd, contact=event)
            out.append(cmd)
        return out
