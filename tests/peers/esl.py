"""A FreeSWITCH event-socket peer for the tests: inbound mode, with real channel state.

This is our own description of what Stellwerk relies on from FreeSWITCH's event socket
(mod_event_socket, mod_commands), written from the published source facts and captures, and
checked against those captures by tests/telephony/test_freeswitch_peer.py. It is a TCP server
speaking the wire protocol:

- greeting ``Content-Type: auth/request``; ``auth <password>`` answers ``command/reply``
  ``+OK accepted`` or ``-ERR invalid`` followed by a disconnect notice and close; before auth
  every command except ``exit`` is ignored without any reply, as FreeSWITCH does;
- ``event plain|json <NAMES|ALL>`` (``+OK event listener enabled json``; ``-ERR no keywords
  supplied``), ``noevents``, ``exit`` (``+OK bye`` then the 67-byte disconnect notice);
  every other command word answers ``-ERR command not found``;
- ``api <cmd>`` answers ``api/response`` with the command's output and, like FreeSWITCH, runs
  on the connection's own thread: no event is written to that connection until it finishes
  (so ``api originate`` stalls the socket while the phone rings);
- ``bgapi <cmd>`` (optional ``Job-UUID`` header) answers ``+OK Job-UUID: <id>`` with the
  ``Job-UUID`` header at once, and later a ``BACKGROUND_JOB`` event whose body is the output.

API commands (outputs as in mod_commands): ``originate``, ``uuid_answer``, ``uuid_bridge``,
``uuid_kill``, ``uuid_broadcast``, ``uuid_break``, ``uuid_dump``, ``uuid_exists``,
``show channels [as json]``, ``status``; any other answers ``-ERR <cmd> Command not found!``.
Wrong arguments answer ``-USAGE: ...``; unknown uuids answer the command's own error text.

The world around the switch is driven by the test through :class:`EslPeer` methods: callers
arrive (:meth:`EslPeer.place_call`, the dialplan having answered them, set the Stellwerk
variables and parked them), agents' phones are registered with a behaviour
(:meth:`EslPeer.register`: ring until answered or the originate timeout, busy, reject), a
ringing phone is picked up (:meth:`EslPeer.pick_up`), anybody hangs up
(:meth:`EslPeer.hang_up`), and the event socket can be cut off for a while
(:meth:`EslPeer.sever`). Events carry the header names and value shapes of the captured
frames (every JSON value a string, times in microseconds, ``variable_*`` channel variables).

Choices where the peer is simpler than FreeSWITCH, all on the safe side for the tests: the
only originate application is ``&park()``; a channel left alone by the end of a bridge goes
back to park (as with ``park_after_bridge``) unless it has ``hangup_after_bridge=true``, so
an adapter must hang up the survivor itself; audio is tracked as "what is playing".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

DISCONNECT_TEXT = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"

# The event names mod_event_socket accepts for `event` (a subset of switch_event_types_t).
EVENT_NAMES = frozenset(
    {
        "CUSTOM", "CLONE", "CHANNEL_CREATE", "CHANNEL_DESTROY", "CHANNEL_STATE",
        "CHANNEL_CALLSTATE", "CHANNEL_ANSWER", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE",
        "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HOLD", "CHANNEL_UNHOLD",
        "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA",
        "CHANNEL_OUTGOING", "CHANNEL_PARK", "CHANNEL_UNPARK", "CHANNEL_APPLICATION",
        "CHANNEL_ORIGINATE", "CHANNEL_UUID", "API", "LOG", "INBOUND_CHAN", "OUTBOUND_CHAN",
        "STARTUP", "SHUTDOWN", "PUBLISH", "UNPUBLISH", "TALK", "NOTALK", "SESSION_CRASH",
        "MODULE_LOAD", "MODULE_UNLOAD", "DTMF", "MESSAGE", "PRESENCE_IN", "NOTIFY_IN",
        "PRESENCE_OUT", "PRESENCE_PROBE", "MESSAGE_WAITING", "MESSAGE_QUERY", "ROSTER",
        "CODEC", "BACKGROUND_JOB", "DETECTED_SPEECH", "DETECTED_TONE", "PRIVATE_COMMAND",
        "HEARTBEAT", "TRAP", "ADD_SCHEDULE", "DEL_SCHEDULE", "EXE_SCHEDULE", "RE_SCHEDULE",
        "RELOADXML", "NOTIFY", "PHONE_FEATURE", "PHONE_FEATURE_SUBSCRIBE", "SEND_MESSAGE",
        "RECV_MESSAGE", "REQUEST_PARAMS", "CHANNEL_DATA", "GENERAL", "COMMAND", "SESSION_HEARTBEAT",
        "CLIENT_DISCONNECTED", "SERVER_DISCONNECTED", "SEND_INFO", "RECV_INFO", "CALL_SECURE",
        "NAT", "RECORD_START", "RECORD_STOP", "PLAYBACK_START", "PLAYBACK_STOP", "CALL_UPDATE",
        "FAILURE", "SOCKET_DATA", "MEDIA_BUG_START", "MEDIA_BUG_STOP", "CONFERENCE_DATA_QUERY",
        "CONFERENCE_DATA", "CALL_SETUP_REQ", "CALL_SETUP_RESULT", "CALL_DETAIL", "DEVICE_STATE",
        "TEXT", "SHUTDOWN_REQUESTED", "ALL",
    }
)  # fmt: skip

# Hang-up cause names (switch_cause_t) and their Q.850 codes, for the ones a call centre sees.
CAUSES = {
    "NORMAL_CLEARING": 16,
    "USER_BUSY": 17,
    "NO_USER_RESPONSE": 18,
    "NO_ANSWER": 19,
    "CALL_REJECTED": 21,
    "ORIGINATOR_CANCEL": 487,
    "LOSE_RACE": 502,
    "MANAGER_REQUEST": 503,
    "USER_NOT_REGISTERED": 606,
    "SUBSCRIBER_ABSENT": 20,
    "NORMAL_TEMPORARY_FAILURE": 41,
    "DESTINATION_OUT_OF_ORDER": 27,
    "ALLOTTED_TIMEOUT": 602,
}

# Channel-State name -> Channel-State-Number (switch_channel_state_t).
STATE_NUMBERS = {
    "CS_NEW": 0, "CS_INIT": 1, "CS_ROUTING": 2, "CS_SOFT_EXECUTE": 3, "CS_EXECUTE": 4,
    "CS_EXCHANGE_MEDIA": 5, "CS_PARK": 6, "CS_CONSUME_MEDIA": 7, "CS_HIBERNATE": 8,
    "CS_RESET": 9, "CS_HANGUP": 10, "CS_REPORTING": 11, "CS_DESTROY": 12,
}  # fmt: skip

_USAGE = {
    "originate": "<call url> <exten>|&<application_name>(<app_args>) [<dialplan>] [<context>] "
    "[<cid_name>] [<cid_num>] [<timeout_sec>]",
    "uuid_bridge": "<uuid> <other_uuid>",
    "uuid_kill": "<uuid> [cause]",
    "uuid_broadcast": "<uuid> <path> [aleg|bleg|holdb|both]",
    "uuid_break": "<uuid> [all]",
    "uuid_answer": "<uuid>",
    "uuid_dump": "<uuid> [format]",
}


def _usage(cmd: str) -> str:
    return f"-USAGE: {_USAGE[cmd]}\n"


@dataclass
class Phone:
    """A registered agent phone: how it behaves when rung."""

    behaviour: str = "ring"  # ring (until picked up or timeout) | busy | reject | answer
    answer_after: float = 0.0


@dataclass
class Channel:
    """One channel (call leg) on the switch."""

    uuid: str
    direction: str
    name: str
    cid_name: str
    cid_num: str
    dest: str
    context: str
    created_us: int
    variables: dict[str, str] = field(default_factory=dict)
    state: str = "CS_INIT"
    call_state: str = "DOWN"
    answer_state: str = "ringing"
    answered_us: int = 0
    bridged_us: int = 0
    hangup_us: int = 0
    application: str = ""
    call_uuid: str = ""
    other: str | None = None  # bridged to
    originator: str | None = None  # Other-Leg of an originated leg: none here (inbound mode)
    playing: list[str] = field(default_factory=list)
    hangup_cause: str | None = None
    presence_id: str = ""
    dial: str = ""  # what was dialled, for an originated leg
    job: _Job | None = None
    timer: asyncio.Handle | None = None

    @property
    def alive(self) -> bool:
        """Not yet hung up."""
        return self.hangup_cause is None


@dataclass
class _Job:
    """An originate in progress: who asked and how it reports back."""

    arg: str
    done: Callable[[str], None]


@dataclass
class _Conn:
    writer: asyncio.StreamWriter
    authed: bool = False
    fmt: str | None = None
    events: set[str] = field(default_factory=set)
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)
    outbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)


class EslPeer:
    """The simulated switch (see the module docstring)."""

    def __init__(self, password: str = "ClueCon", hostname: str = "fs-peer") -> None:
        self.password = password
        self.hostname = hostname
        self.core_uuid = str(uuidlib.uuid4())
        self.channels: dict[str, Channel] = {}
        self.phones: dict[str, Phone] = {}
        self.commands: list[str] = []  # every command line received after auth, in order
        self.errors: list[str] = []  # every error the peer answered, for the tests to read
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: list[_Conn] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sequence = 1000
        self._changed = asyncio.Event()
        self._answering = asyncio.Event()
        self._answering.set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1 (``port`` 0: a free one); returns the port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        await self._close_listener()
        for conn in list(self._conns):
            self._drop(conn)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        for channel in self.channels.values():
            if channel.timer is not None:
                channel.timer.cancel()

    async def sever(self, seconds: float) -> None:
        """Cut every event-socket connection (no notice, as a network failure would) and
        refuse new ones for ``seconds``; calls go on meanwhile. Returns when it listens again."""
        await self._close_listener()
        for conn in list(self._conns):
            self._drop(conn)
        await asyncio.sleep(seconds)
        await self.start(self.port)

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def stall(self) -> None:
        """Stop answering commands after auth (a hung switch, or a network path that silently
        drops everything: the socket stays open, nothing comes back)."""
        self._answering.clear()

    def resume(self) -> None:
        """Answer again (commands that waited are answered now, in order)."""
        self._answering.set()

    @property
    def connections(self) -> int:
        """Open, authenticated event-socket connections."""
        return sum(1 for c in self._conns if c.authed)

    # ------------------------------------------------------------------ the world

    def register(self, dial: str, behaviour: str = "ring", answer_after: float = 0.0) -> None:
        """Register a phone reachable as ``dial`` (``user/1001@default``, ``sofia/...``)."""
        if behaviour not in ("ring", "busy", "reject", "answer"):
            raise ValueError(behaviour)
        self.phones[dial] = Phone(behaviour=behaviour, answer_after=answer_after)

    def place_call(
        self,
        caller: str = "+4930555010",
        dest: str = "1000",
        *,
        name: str = "",
        variables: dict[str, str] | None = None,
        context: str = "public",
        answer: bool = True,
    ) -> str:
        """A caller dials in; the dialplan answers, sets ``variables`` and parks the call.

        Events: CHANNEL_CREATE, CHANNEL_ANSWER, CHANNEL_PARK (like ``answer``, ``set``,
        ``park`` in an extension). With ``answer=False`` the extension has no ``answer``: the
        call is parked still ringing (``Answer-State: ringing``, as in the fsock capture).
        Returns the channel's uuid.
        """
        now = _now_us()
        uid = str(uuidlib.uuid4())
        ch = Channel(
            uuid=uid,
            direction="inbound",
            name=f"sofia/external/{caller}@198.51.100.7",
            cid_name=name or caller,
            cid_num=caller,
            dest=dest,
            context=context,
            created_us=now,
            call_uuid=uid,
            presence_id=f"{caller}@{self.hostname}",
        )
        ch.variables.update(variables or {})
        self.channels[uid] = ch
        self._emit(ch, "CHANNEL_CREATE")
        ch.state, ch.call_state = "CS_EXECUTE", "RINGING"
        if answer:
            self._answer(ch)
        ch.application = "park"
        self._emit(ch, "CHANNEL_PARK")
        return uid

    def pick_up(self, uid: str) -> None:
        """The ringing phone of leg ``uid`` is answered."""
        ch = self.channels[uid]
        if not ch.alive or ch.answer_state != "ringing":
            raise AssertionError(f"leg {uid} is not ringing")
        self._answer(ch)
        ch.application = "park"
        ch.state = "CS_EXECUTE"
        self._emit(ch, "CHANNEL_PARK")
        if ch.job is not None:
            job, ch.job = ch.job, None
            job.done(f"+OK {uid}\n")

    def hang_up(self, uid: str, cause: str = "NORMAL_CLEARING") -> None:
        """Somebody (caller or agent) hangs up leg ``uid``."""
        self._hangup(self.channels[uid], cause)

    def ringing(self, dial: str | None = None) -> list[Channel]:
        """Agent legs ringing now (optionally only those to ``dial``)."""
        return [
            c
            for c in self.channels.values()
            if c.alive
            and c.direction == "outbound"
            and c.answer_state == "ringing"
            and (dial is None or c.dial == dial)
        ]

    def alive(self) -> list[Channel]:
        """Every channel not hung up."""
        return [c for c in self.channels.values() if c.alive]

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = ""
    ) -> Any:
        """Wait until ``predicate()`` is truthy, woken by every change of state."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what or predicate}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    # ------------------------------------------------------------------ channel mechanics

    def _answer(self, ch: Channel) -> None:
        ch.answered_us = _now_us()
        ch.answer_state = "answered"
        ch.call_state = "ACTIVE"
        if ch.direction == "outbound":
            ch.state = "CS_CONSUME_MEDIA"
        self._emit(ch, "CHANNEL_ANSWER")

    def _hangup(self, ch: Channel, cause: str) -> None:
        if not ch.alive:
            return
        if ch.timer is not None:
            ch.timer.cancel()
            ch.timer = None
        other = self.channels.get(ch.other) if ch.other else None
        ch.hangup_cause = cause
        ch.hangup_us = _now_us()
        ch.state, ch.call_state, ch.answer_state = "CS_HANGUP", "HANGUP", "hangup"
        ch.playing.clear()
        ch.variables.update(
            hangup_cause=cause, hangup_cause_q850=str(CAUSES.get(cause, 16)), last_app="park"
        )
        self._emit(ch, "CHANNEL_HANGUP")
        if other is not None and other.alive:
            self._emit(ch, "CHANNEL_UNBRIDGE")
            ch.other = other.other = None
            if other.variables.get("hangup_after_bridge") == "true":
                self._hangup(other, "NORMAL_CLEARING")
            else:
                other.state, other.application = "CS_EXECUTE", "park"
                self._emit(other, "CHANNEL_PARK")
        ch.state = "CS_REPORTING"
        self._emit(ch, "CHANNEL_HANGUP_COMPLETE")
        if ch.job is not None:
            job, ch.job = ch.job, None
            job.done(f"-ERR {cause}\n")

    # ------------------------------------------------------------------ api commands

    def _api(self, line: str, done: Callable[[str], None]) -> None:
        """Run one api command; ``done(output)`` is called now or (originate) later."""
        cmd, _, args = line.strip().partition(" ")
        args = args.strip()
        if cmd == "originate":
            self._originate(args, done)
            return
        handler: Callable[[str], str] | None = {
            "uuid_bridge": self._uuid_bridge,
            "uuid_kill": self._uuid_kill,
            "uuid_broadcast": self._uuid_broadcast,
            "uuid_break": self._uuid_break,
            "uuid_answer": self._uuid_answer,
            "uuid_dump": self._uuid_dump,
            "uuid_exists": self._uuid_exists,
            "show": self._show,
            "status": self._status,
        }.get(cmd)
        if handler is None:
            done(self._err(f"-ERR {cmd} Command not found!\n"))
            return
        done(handler(args))

    def _err(self, text: str) -> str:
        if text.startswith("-"):
            self.errors.append(text.strip())
        return text

    def _live(self, uid: str) -> Channel | None:
        ch = self.channels.get(uid)
        return ch if ch is not None and ch.alive else None

    def _originate(self, args: str, done: Callable[[str], None]) -> None:
        parts = _split_originate(args)
        if parts is None or len(parts) < 2:
            done(self._err(_usage("originate")))
            return
        url, exten, *rest = parts
        variables, dial = _call_url(url)
        if variables is None or not dial:
            done(self._err("-ERR INVALID_URL\n"))
            return
        if exten != "&park()":
            # This peer only parks originated legs: that is all Stellwerk asks for.
            done(self._err(f"-ERR peer supports only &park(), got {exten!r}\n"))
            return
        timeout_arg = rest[4] if len(rest) >= 5 else None
        try:
            timeout = float(timeout_arg or variables.get("originate_timeout") or 60)
        except ValueError:
            done(self._err(_usage("originate")))
            return
        tech = dial.split("/", 1)[0]
        if tech not in ("user", "sofia", "loopback"):
            done(self._err("-ERR CHAN_NOT_IMPLEMENTED\n"))
            return
        phone = self.phones.get(dial)
        if phone is None:
            done(self._err("-ERR USER_NOT_REGISTERED\n"))
            return
        uid = variables.get("origination_uuid") or str(uuidlib.uuid4())
        if uid in self.channels:
            done(self._err("-ERR DESTINATION_OUT_OF_ORDER\n"))
            return
        ext = dial.split("/")[-1].split("@")[0]
        ch = Channel(
            uuid=uid,
            direction="outbound",
            name=f"sofia/internal/{ext}@192.0.2.10:5060",
            cid_name=variables.get("origination_caller_id_name", "Stellwerk"),
            cid_num=variables.get("origination_caller_id_number", "0000000000"),
            dest=ext,
            context="default",
            created_us=_now_us(),
            call_uuid=uid,
            presence_id=f"{ext}@{self.hostname}",
        )
        ch.variables.update(variables)
        ch.dial = dial
        ch.variables.setdefault("originate_timeout", str(int(timeout)))
        ch.job = _Job(arg=args, done=done)
        self.channels[uid] = ch
        self._emit(ch, "CHANNEL_CREATE")
        ch.state, ch.call_state = "CS_CONSUME_MEDIA", "RINGING"
        loop = asyncio.get_running_loop()
        if phone.behaviour == "busy":
            ch.timer = loop.call_soon(self._hangup, ch, "USER_BUSY")
        elif phone.behaviour == "reject":
            ch.timer = loop.call_soon(self._hangup, ch, "CALL_REJECTED")
        elif phone.behaviour == "answer":
            ch.timer = loop.call_later(phone.answer_after, self.pick_up, uid)
        else:
            ch.timer = loop.call_later(timeout, self._hangup, ch, "NO_ANSWER")

    def _uuid_bridge(self, args: str) -> str:
        parts = args.split()
        if len(parts) < 2:
            return self._err(_usage("uuid_bridge"))
        a, b = self._live(parts[0]), self._live(parts[1])
        if a is None or b is None or a is b:
            return self._err("-ERR Invalid uuid\n")
        if b.answer_state != "answered" or a.answer_state != "answered":
            return self._err("-ERR Invalid uuid\n")
        for leg in (a, b):
            if leg.other and leg.other not in (a.uuid, b.uuid):
                old = self.channels[leg.other]
                old.other = None
            if leg.timer is not None:
                leg.timer.cancel()
                leg.timer = None
            leg.playing.clear()
            leg.application = ""
            leg.state = "CS_EXCHANGE_MEDIA"
            leg.bridged_us = _now_us()
        a.other, b.other = b.uuid, a.uuid
        b.call_uuid = a.call_uuid
        self._emit(a, "CHANNEL_BRIDGE")
        return f"+OK {b.uuid}\n"

    def _uuid_kill(self, args: str) -> str:
        parts = args.split()
        if not parts:
            return self._err(_usage("uuid_kill"))
        ch = self._live(parts[0])
        if ch is None:
            return self._err("-ERR No such channel!\n")
        cause = parts[1].upper() if len(parts) > 1 else "NORMAL_CLEARING"
        self._hangup(ch, cause if cause in CAUSES else "NORMAL_CLEARING")
        return "+OK\n"

    def _uuid_broadcast(self, args: str) -> str:
        parts = args.split()
        if len(parts) < 2:
            return self._err(_usage("uuid_broadcast"))
        ch = self._live(parts[0])
        if ch is None:
            return self._err("-ERR invalid uuid\n")
        leg = parts[2] if len(parts) > 2 else "both"
        if leg not in ("aleg", "bleg", "holdb", "both"):
            return self._err(_usage("uuid_broadcast"))
        ch.playing.append(parts[1])
        self._changed.set()
        return "+OK Message sent\n"

    def _uuid_answer(self, args: str) -> str:
        parts = args.split()
        if not parts:
            return self._err(_usage("uuid_answer"))
        ch = self._live(parts[0])
        if ch is None:
            return self._err("-ERR No such channel!\n")
        if ch.answer_state != "answered":
            self._answer(ch)
        return "+OK\n"

    def _uuid_break(self, args: str) -> str:
        parts = args.split()
        if not parts:
            return self._err(_usage("uuid_break"))
        ch = self._live(parts[0])
        if ch is None:
            return self._err("-ERR No such channel!\n")
        if len(parts) > 1 and parts[1] == "all":
            ch.playing.clear()
        elif ch.playing:
            ch.playing.pop(0)
        self._changed.set()
        return "+OK\n"

    def _uuid_dump(self, args: str) -> str:
        parts = args.split()
        if not parts:
            return self._err(_usage("uuid_dump"))
        ch = self._live(parts[0])
        if ch is None:
            return self._err("-ERR No Such Channel!\n")  # sic: uuid_dump's own wording
        headers = self._event_headers(ch, "CHANNEL_DATA")
        if len(parts) > 1 and parts[1] == "json":
            return json.dumps(headers, separators=(",", ":"))
        return "".join(f"{k}: {quote(v, safe='')}\n" for k, v in headers.items())

    def _uuid_exists(self, args: str) -> str:
        return "true" if self._live(args.split()[0] if args else "") else "false"

    def _show(self, args: str) -> str:
        words = args.split()
        if not words or words[0] != "channels":
            return self._err("-USAGE: channels|calls|... [as xml|json|delim <d>]\n")
        rows = [self._show_row(c) for c in self.channels.values() if c.alive]
        if words[1:] == ["as", "json"]:
            if not rows:
                return json.dumps({"row_count": 0}) + "\n"
            return json.dumps({"row_count": len(rows), "rows": rows}, indent=1) + "\n"
        if len(words) > 1:
            return self._err("-USAGE: channels|calls|... [as xml|json|delim <d>]\n")
        if not rows:
            return "\n0 total.\n"
        keys = list(rows[0])
        lines = [",".join(keys)] + [",".join(r[k] for k in keys) for r in rows]
        return "\n".join(lines) + f"\n\n{len(rows)} total.\n"

    def _show_row(self, ch: Channel) -> dict[str, str]:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ch.created_us / 1e6))
        return {
            "uuid": ch.uuid,
            "direction": ch.direction,
            "created": created,
            "created_epoch": str(ch.created_us // 1_000_000),
            "name": ch.name,
            "state": ch.state,
            "cid_name": ch.cid_name,
            "cid_num": ch.cid_num,
            "ip_addr": "198.51.100.7" if ch.direction == "inbound" else "",
            "dest": ch.dest,
            "application": ch.application,
            "application_data": "",
            "dialplan": "XML",
            "context": ch.context,
            "read_codec": "PCMA",
            "read_rate": "8000",
            "read_bit_rate": "64000",
            "write_codec": "PCMA",
            "write_rate": "8000",
            "write_bit_rate": "64000",
            "secure": "",
            "hostname": self.hostname,
            "presence_id": ch.presence_id,
            "presence_data": "",
            "accountcode": "",
            "callstate": ch.call_state,
            "callee_name": "",
            "callee_num": "",
            "callee_direction": "",
            "call_uuid": ch.call_uuid,
            "sent_callee_name": "",
            "sent_callee_num": "",
            "initial_cid_name": ch.cid_name,
            "initial_cid_num": ch.cid_num,
            "initial_ip_addr": "",
            "initial_dest": ch.dest,
            "initial_dialplan": "XML",
            "initial_context": ch.context,
        }

    def _status(self, args: str) -> str:
        count = len(self.alive())
        return (
            "UP 0 years, 0 days, 0 hours, 1 minute, 0 seconds, 0 milliseconds, 0 microseconds\n"
            f"FreeSWITCH (Version 1.10.12 peer) is ready\n{count} session(s) since startup\n"
        )

    # ------------------------------------------------------------------ events

    def _base_headers(self, name: str, calling: tuple[str, str, int]) -> dict[str, str]:
        self._sequence += 1
        now = time.time()
        return {
            "Event-Name": name,
            "Core-UUID": self.core_uuid,
            "FreeSWITCH-Hostname": self.hostname,
            "FreeSWITCH-Switchname": self.hostname,
            "FreeSWITCH-IPv4": "192.0.2.10",
            "FreeSWITCH-IPv6": "::1",
            "Event-Date-Local": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
            "Event-Date-GMT": formatdate(now, usegmt=True),
            "Event-Date-Timestamp": str(int(now * 1_000_000)),
            "Event-Calling-File": calling[0],
            "Event-Calling-Function": calling[1],
            "Event-Calling-Line-Number": str(calling[2]),
            "Event-Sequence": str(self._sequence),
        }

    def _profile(self, ch: Channel, prefix: str) -> dict[str, str]:
        p = prefix
        other = self.channels.get(ch.other) if ch.other else None
        if ch.direction == "outbound":
            callee = ("Outbound Call", ch.dest)
        elif other is not None:
            callee = (other.cid_name, other.dest)
        else:
            callee = ("", "")
        h = {
            f"{p}-Direction": ch.direction,
            f"{p}-Username": ch.cid_num,
            f"{p}-Dialplan": "XML",
            f"{p}-Caller-ID-Name": ch.cid_name,
            f"{p}-Caller-ID-Number": ch.cid_num,
            f"{p}-Orig-Caller-ID-Number": ch.cid_num,
            f"{p}-Callee-ID-Name": callee[0],
            f"{p}-Callee-ID-Number": callee[1],
            f"{p}-Network-Addr": "198.51.100.7",
            f"{p}-ANI": ch.cid_num,
            f"{p}-Destination-Number": ch.dest,
            f"{p}-Unique-ID": ch.uuid,
            f"{p}-Source": "mod_sofia",
            f"{p}-Context": ch.context,
            f"{p}-Channel-Name": ch.name,
            f"{p}-Profile-Index": "1",
            f"{p}-Profile-Created-Time": str(ch.created_us),
            f"{p}-Channel-Created-Time": str(ch.created_us),
            f"{p}-Channel-Answered-Time": str(ch.answered_us),
            f"{p}-Channel-Progress-Time": "0",
            f"{p}-Channel-Progress-Media-Time": "0",
            f"{p}-Channel-Hangup-Time": str(ch.hangup_us),
            f"{p}-Channel-Transfer-Time": "0",
            f"{p}-Channel-Resurrect-Time": "0",
            f"{p}-Channel-Bridged-Time": str(ch.bridged_us),
            f"{p}-Channel-Last-Hold": "0",
            f"{p}-Channel-Hold-Accum": "0",
            f"{p}-Screen-Bit": "true",
            f"{p}-Privacy-Hide-Name": "false",
            f"{p}-Privacy-Hide-Number": "false",
        }
        if prefix == "Caller":
            del h["Caller-Orig-Caller-ID-Number"]
            h = {"Caller-Orig-Caller-ID-Number": ch.cid_num, **h}
        return {k: v for k, v in h.items() if v != ""}

    def _event_headers(self, ch: Channel, name: str) -> dict[str, str]:
        calling = {
            "CHANNEL_CREATE": ("switch_core_state_machine.c", "switch_core_session_run", 626),
            "CHANNEL_ANSWER": ("switch_channel.c", "switch_channel_perform_mark_answered", 3539),
            "CHANNEL_PARK": ("switch_ivr.c", "switch_ivr_park", 898),
            "CHANNEL_BRIDGE": ("switch_ivr_bridge.c", "uuid_bridge_on_soft_execute", 1300),
            "CHANNEL_UNBRIDGE": ("switch_ivr_bridge.c", "audio_bridge_thread", 785),
            "CHANNEL_HANGUP": ("switch_channel.c", "switch_channel_perform_hangup", 3280),
            "CHANNEL_HANGUP_COMPLETE": (
                "switch_core_state_machine.c",
                "switch_core_session_reporting_state",
                696,
            ),
            "CHANNEL_DATA": ("mod_commands.c", "uuid_dump_function", 6100),
        }[name]
        h = self._base_headers(name, calling)
        if ch.hangup_cause is not None:
            h["Hangup-Cause"] = ch.hangup_cause
        h.update(
            {
                "Channel-State": ch.state,
                "Channel-Call-State": ch.call_state,
                "Channel-State-Number": str(STATE_NUMBERS[ch.state]),
                "Channel-Name": ch.name,
                "Unique-ID": ch.uuid,
                "Call-Direction": ch.direction,
                "Presence-Call-Direction": ch.direction,
                "Channel-HIT-Dialplan": "true" if ch.direction == "inbound" else "false",
                "Channel-Presence-ID": ch.presence_id,
                "Channel-Call-UUID": ch.call_uuid,
                "Answer-State": ch.answer_state,
                "Channel-Read-Codec-Name": "PCMA",
                "Channel-Read-Codec-Rate": "8000",
                "Channel-Read-Codec-Bit-Rate": "64000",
                "Channel-Write-Codec-Name": "PCMA",
                "Channel-Write-Codec-Rate": "8000",
                "Channel-Write-Codec-Bit-Rate": "64000",
            }
        )
        h.update(self._profile(ch, "Caller"))
        other = self.channels.get(ch.other) if ch.other else None
        if name in ("CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE") and other is not None:
            h["Bridge-A-Unique-ID"] = ch.uuid
            h["Bridge-B-Unique-ID"] = other.uuid
        if other is not None:
            h["Other-Type"] = "originatee" if ch.direction == "inbound" else "originator"
            h.update(self._profile(other, "Other-Leg"))
        variables = {
            "direction": ch.direction,
            "uuid": ch.uuid,
            "session_id": str(ch.created_us % 100000),
            "channel_name": ch.name,
            "call_uuid": ch.call_uuid,
            "read_codec": "PCMA",
            "write_codec": "PCMA",
            **ch.variables,
        }
        if ch.application:
            variables["current_application"] = ch.application
        if ch.other:
            variables["bridge_uuid"] = ch.other
            variables["signal_bond"] = ch.other
        h.update({f"variable_{k}": v for k, v in variables.items()})
        return h

    def _emit(self, ch: Channel, name: str) -> None:
        self._publish(self._event_headers(ch, name))

    def _publish(self, headers: dict[str, str], body: str | None = None) -> None:
        self._changed.set()
        name = headers["Event-Name"]
        for conn in self._conns:
            if not conn.authed or conn.fmt is None:
                continue
            if name not in conn.events and "ALL" not in conn.events:
                continue
            conn.outbox.put_nowait(_event_frame(headers, body, conn.fmt))

    def _background_job(self, job_uuid: str, cmd: str, arg: str, output: str) -> None:
        h = self._base_headers("BACKGROUND_JOB", ("mod_event_socket.c", "api_exec", 1572))
        h.update({"Job-UUID": job_uuid, "Job-Command": cmd, "Job-Command-Arg": arg})
        self._publish(h, output)

    # ------------------------------------------------------------------ the socket

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer=writer)
        self._conns.append(conn)
        sender = asyncio.create_task(self._sender(conn))
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
        try:
            await self._write(conn, b"Content-Type: auth/request\n\n")
            while True:
                command = await _read_command(reader)
                if command is None:
                    break
                line, headers = command
                if not await self._handle(conn, line, headers):
                    break
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._drop(conn)
            await sender
            if me is not None:
                self._tasks.discard(me)

    async def _sender(self, conn: _Conn) -> None:
        """Writes queued events, never while an api command runs on this connection."""
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            while True:
                frame = await conn.outbox.get()
                if frame is None:
                    return
                async with conn.busy:
                    conn.writer.write(frame)
                    await conn.writer.drain()

    async def _write(self, conn: _Conn, data: bytes) -> None:
        conn.writer.write(data)
        await conn.writer.drain()

    async def _reply(self, conn: _Conn, text: str, extra: str = "") -> None:
        if text.startswith("-"):
            self.errors.append(text)
        await self._write(
            conn, f"Content-Type: command/reply\nReply-Text: {text}\n{extra}\n".encode()
        )

    async def _handle(self, conn: _Conn, line: str, headers: dict[str, str]) -> bool:
        """One command; False closes the connection."""
        word, _, rest = line.partition(" ")
        if word == "exit":
            await self._reply(conn, "+OK bye")
            await self._disconnect_notice(conn)
            return False
        if not conn.authed:
            if word == "auth":
                if rest.strip() == self.password:
                    conn.authed = True
                    await self._reply(conn, "+OK accepted")
                    return True
                await self._reply(conn, "-ERR invalid")
                await self._disconnect_notice(conn)
                return False
            return True  # silently ignored before auth, as FreeSWITCH does
        await self._answering.wait()
        self.commands.append(line)
        if word == "event":
            return await self._event_cmd(conn, rest.split())
        if word == "noevents":
            conn.fmt, conn.events = None, set()
            await self._reply(conn, "+OK no longer listening for events")
            return True
        if word == "api":
            async with conn.busy:  # no events are written while the api runs
                done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                self._api(rest, lambda out: done.done() or done.set_result(out))
                output = await done
                body = output.encode()
                await self._write(
                    conn,
                    b"Content-Type: api/response\nContent-Length: %d\n\n" % len(body) + body,
                )
            return True
        if word == "bgapi":
            job = headers.get("Job-UUID") or str(uuidlib.uuid4())
            await self._reply(conn, f"+OK Job-UUID: {job}", f"Job-UUID: {job}\n")
            cmd, _, arg = rest.strip().partition(" ")

            def report(output: str, job: str = job, cmd: str = cmd, arg: str = arg) -> None:
                self._background_job(job, cmd, arg, output)

            self._api(rest, report)
            return True
        await self._reply(conn, "-ERR command not found")
        return True

    async def _event_cmd(self, conn: _Conn, words: list[str]) -> bool:
        fmt = "plain"
        if words and words[0] in ("plain", "json", "xml"):
            fmt, words = words[0], words[1:]
        if fmt == "xml":
            await self._reply(conn, "-ERR peer speaks plain and json only")
            return True
        names = {w.upper() for w in words if w.upper() in EVENT_NAMES}
        if not names:
            await self._reply(conn, "-ERR no keywords supplied")
            return True
        conn.fmt = fmt
        conn.events |= names
        await self._reply(conn, f"+OK event listener enabled {fmt}")
        return True

    async def _disconnect_notice(self, conn: _Conn) -> None:
        await self._write(
            conn,
            b"Content-Type: text/disconnect-notice\nContent-Length: %d\n\n" % len(DISCONNECT_TEXT)
            + DISCONNECT_TEXT,
        )

    def _drop(self, conn: _Conn) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
        conn.outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            conn.writer.transport.abort()
        self._changed.set()


# ---------------------------------------------------------------------- wire helpers


async def _read_command(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]] | None:
    """A command line and its header lines up to the blank line; None at EOF."""
    lines: list[str] = []
    while True:
        raw = await reader.readline()
        if not raw:
            return None
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not text:
            if lines:
                break
            continue  # leading blank lines are skipped
        lines.append(text)
    headers: dict[str, str] = {}
    for extra in lines[1:]:
        name, _, value = extra.partition(":")
        headers[name.strip()] = value.strip()
    length = headers.get("Content-Length")
    if length and length.isdigit():
        await reader.readexactly(int(length))
    return lines[0].strip(), headers


def _event_frame(headers: dict[str, str], body: str | None, fmt: str) -> bytes:
    if fmt == "json":
        obj: dict[str, str] = dict(headers)
        if body is not None:
            obj["Content-Length"] = str(len(body.encode()))
            obj["_body"] = body
        payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        kind = "text/event-json"
    else:
        text = "".join(f"{k}: {quote(v, safe='')}\n" for k, v in headers.items())
        if body is not None:
            text += f"Content-Length: {len(body.encode())}\n\n{body}"
        else:
            text += "\n"
        payload = text.encode()
        kind = "text/event-plain"
    return b"Content-Length: %d\nContent-Type: %s\n\n" % (len(payload), kind.encode()) + payload


def _split_originate(args: str) -> list[str] | None:
    """Split originate arguments on spaces outside ``{...}`` and ``(...)``."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in args:
        if char in "{(":
            depth += 1
        elif char in "})":
            depth -= 1
            if depth < 0:
                return None
        if char == " " and depth == 0:
            if current:
                parts.append(current)
            current = ""
            continue
        current += char
    if depth != 0:
        return None
    if current:
        parts.append(current)
    return parts


def _call_url(url: str) -> tuple[dict[str, str] | None, str]:
    """``{a=b,c=d}endpoint`` -> variables and the dial string (None for bad variables)."""
    variables: dict[str, str] = {}
    while url.startswith(("{", "[", "<")):
        close = {"{": "}", "[": "]", "<": ">"}[url[0]]
        end = url.find(close)
        if end < 0:
            return None, ""
        for item in filter(None, url[1:end].split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                return None, ""
            variables[key.strip()] = value.strip().strip("'")
        url = url[end + 1 :]
    return variables, url.strip()


def _now_us() -> int:
    return int(time.time() * 1_000_000)
