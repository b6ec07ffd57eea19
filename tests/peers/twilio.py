"""A Twilio Voice peer for the tests: the REST API (Queues, Members, Calls) and Twilio's own part.

This is our own description of the parts of Twilio Voice that Stellwerk relies on, written
from Twilio's published API definition and TwiML documentation; it keeps real state and checks
every request, and it plays Twilio's part in a call:

- **REST** (``/2010-04-01/Accounts/{AccountSid}/...``, JSON answers with snake_case fields and
  RFC 2822 dates, form-encoded PascalCase request fields, HTTP Basic with the account sid and
  auth token, ``401`` code 20003 for bad credentials, ``404`` code 20404 for unknown sids,
  ``405`` for a wrong method, ``400`` for bad parameters):

  - ``GET Queues.json`` and ``GET Queues/{QueueSid}.json``;
  - ``GET Queues/{QueueSid}/Members.json``, ``GET|POST Queues/{QueueSid}/Members/{CallSid}.json``
    (``CallSid`` may be ``Front``). ``POST`` needs ``Url`` (absolute http/https) and takes
    ``Method`` (``GET``/``POST``): the member leaves the queue, its ``<Enqueue action>`` is
    requested with ``QueueResult=redirected`` and the call runs the TwiML at ``Url``;
  - ``GET Calls.json`` (filters ``Status``, ``ParentCallSid``, ``To``, ``From``) and
    ``GET|POST Calls/{CallSid}.json``. ``POST`` takes ``Url``/``Method`` (redirect; 400 code
    21220 when the call is over), ``Twiml`` (inline; exclusive with ``Url``, code 21205),
    ``Status`` (``completed`` hangs up; ``canceled`` ends a call that is still queued or
    ringing and leaves an answered one alone), ``StatusCallback``/``StatusCallbackMethod``,
    ``FallbackUrl``/``FallbackMethod`` and ``TimeLimit``.

  Stricter than Twilio in one way: a parameter outside that list is refused (400), so that a
  misspelt one cannot pass unnoticed.

- **Twilio's part**: an incoming call requests the number's voice URL (``POST``, the standard
  parameters, ``X-Twilio-Signature`` computed as Twilio does) and runs the TwiML it gets.
  Every TwiML document is parsed with ``xml.etree`` and checked against the verbs, nouns and
  attributes below; a document that does not parse or uses something else is recorded in
  :attr:`TwilioPeer.errors` and ends the call, as Twilio's "application error" does.

  - ``<Enqueue>`` (text: the queue's friendly name, created on demand, at most 64 characters;
    ``action``, ``method``, ``waitUrl``, ``waitUrlMethod``, ``maxQueueSize``, ``workflowSid``):
    the caller waits in the queue; the ``waitUrl`` document (only ``Play``, ``Say``, ``Pause``,
    ``Hangup``, ``Redirect``, ``Leave``, ``Gather``) is requested with ``QueueSid``,
    ``QueuePosition``, ``QueueTime``, ``AvgQueueTime``, ``CurrentQueueSize``, ``MaxQueueSize``
    and requested again each time it finishes.
  - ``<Dial>`` (``action``, ``method``, ``timeout`` default 30, ``answerOnBridge``,
    ``callerId``, ``timeLimit``, ...) with ``<Client>``, ``<Number>``, ``<Sip>`` nouns
    (``statusCallback``, ``statusCallbackEvent`` of ``initiated ringing answered completed``,
    ``statusCallbackMethod``, ``url``, ``method``): a child call (``outbound-dial``, its
    ``parent_call_sid`` the caller's) rings the endpoint, which the test makes answer, stay
    silent or be busy (:meth:`TwilioPeer.agent`). The ``action`` is requested when the dial
    ends, with ``DialCallStatus`` (``completed``, ``busy``, ``no-answer``, ``failed``,
    ``canceled``), ``DialCallSid``, ``DialCallDuration`` and the caller's ``CallStatus``; its
    TwiML continues the call unless the caller is gone.
  - ``<Play>`` (``loop``, 0 = for ever), ``<Say>``, ``<Pause length>``, ``<Redirect method>``,
    ``<Hangup/>``, ``<Leave/>`` (in a wait document).
  - Status callbacks: the number's status callback URL gets ``completed`` (with
    ``CallDuration``) when the caller's call ends, and ``answered`` (``in-progress``) when
    Twilio answers it, if asked for (``status_events``); a dialled noun's ``statusCallback``
    gets the events it asked for (``completed`` by default) with the child's ``CallSid`` and
    ``ParentCallSid``.

Media takes :attr:`TwilioPeer.play_seconds` per play, so that waits are short in tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Literal
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

API_VERSION = "2010-04-01"

# ---- our description of TwiML ----------------------------------------------------------------

_NOUN_ATTRS = frozenset(
    {"statusCallback", "statusCallbackEvent", "statusCallbackMethod", "url", "method"}
)
VERBS: dict[str, frozenset[str]] = {
    "Enqueue": frozenset(
        {"action", "method", "waitUrl", "waitUrlMethod", "maxQueueSize", "workflowSid"}
    ),
    "Dial": frozenset(
        {
            "action",
            "method",
            "timeout",
            "answerOnBridge",
            "callerId",
            "timeLimit",
            "hangupOnStar",
            "record",
            "ringTone",
            "trim",
        }
    ),
    "Play": frozenset({"loop", "digits"}),
    "Say": frozenset({"voice", "language", "loop"}),
    "Pause": frozenset({"length"}),
    "Redirect": frozenset({"method"}),
    "Hangup": frozenset(),
    "Leave": frozenset(),
    "Gather": frozenset({"action", "method", "input", "timeout", "numDigits", "finishOnKey"}),
}
NOUNS: dict[str, frozenset[str]] = {
    "Client": _NOUN_ATTRS,
    "Number": _NOUN_ATTRS | {"sendDigits"},
    "Sip": _NOUN_ATTRS | {"username", "password"},
    "Queue": frozenset({"url", "method", "reservationSid", "postWorkActivitySid"}),
}
WAIT_VERBS = frozenset({"Play", "Say", "Pause", "Hangup", "Redirect", "Leave", "Gather"})
_CALLBACK_EVENTS = frozenset({"initiated", "ringing", "answered", "completed"})
_METHODS = frozenset({"GET", "POST"})
_TWIML_TYPES = ("text/xml", "application/xml", "text/html")


class TwimlError(ValueError):
    """A TwiML document Twilio would refuse (parse failure 12100, schema 12200)."""


def check_twiml(text: str, *, wait_document: bool = False) -> ET.Element:
    """Parse a TwiML document and check it against the description above; the root element.

    ``wait_document``: a ``waitUrl`` answer, which allows fewer verbs.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise TwimlError(f"12100 document does not parse: {exc}") from None
    if root.tag != "Response":
        raise TwimlError(f"12200 root element is <{root.tag}>, not <Response>")
    if root.attrib:
        raise TwimlError(f"12200 <Response> takes no attributes: {root.attrib}")
    for verb in root:
        allowed = VERBS.get(verb.tag)
        if allowed is None:
            raise TwimlError(f"12200 unknown verb <{verb.tag}>")
        if wait_document and verb.tag not in WAIT_VERBS:
            raise TwimlError(f"12200 <{verb.tag}> is not allowed in a waitUrl document")
        if verb.tag == "Leave" and not wait_document:
            raise TwimlError("12200 <Leave> only works in a waitUrl document")
        _check_attrs(verb, allowed)
        for name in ("method", "waitUrlMethod"):
            if name in verb.attrib and verb.attrib[name].upper() not in _METHODS:
                raise TwimlError(f"12200 <{verb.tag} {name}={verb.attrib[name]!r}>")
        _check_numbers(verb, ("loop", "timeout", "length", "timeLimit", "maxQueueSize"))
        if verb.tag == "Dial":
            _check_dial(verb)
        elif verb.tag == "Enqueue":
            name = (verb.text or "").strip()
            if len(verb) == 0 and not name and "workflowSid" not in verb.attrib:
                raise TwimlError("12200 <Enqueue> needs a queue name")
            if len(name) > 64:
                raise TwimlError("12200 a queue name is at most 64 characters")
            for child in verb:
                if child.tag != "Task":
                    raise TwimlError(f"12200 <Enqueue> cannot hold <{child.tag}>")
        elif len(verb):
            raise TwimlError(f"12200 <{verb.tag}> has child elements")
        empty = not (verb.text or "").strip()
        if verb.tag in ("Play", "Redirect") and empty and "digits" not in verb.attrib:
            raise TwimlError(f"12200 <{verb.tag}> needs a URL")
    return root


def _check_attrs(element: ET.Element, allowed: frozenset[str]) -> None:
    unknown = set(element.attrib) - allowed
    if unknown:
        raise TwimlError(f"12200 <{element.tag}> has unknown attributes {sorted(unknown)}")


def _check_numbers(element: ET.Element, names: Iterable[str]) -> None:
    for name in names:
        value = element.attrib.get(name)
        if value is not None and not value.isdigit():
            raise TwimlError(f"12200 <{element.tag} {name}={value!r}> is not a whole number")


def _check_dial(dial: ET.Element) -> None:
    if "answerOnBridge" in dial.attrib and dial.attrib["answerOnBridge"] not in ("true", "false"):
        raise TwimlError("12200 answerOnBridge is true or false")
    nouns = list(dial)
    if not nouns and not (dial.text or "").strip():
        raise TwimlError("12200 <Dial> has nothing to dial")
    for noun in nouns:
        allowed = NOUNS.get(noun.tag)
        if allowed is None:
            raise TwimlError(f"12200 <Dial> cannot hold <{noun.tag}>")
        _check_attrs(noun, allowed)
        if not (noun.text or "").strip():
            raise TwimlError(f"12200 <{noun.tag}> is empty")
        events = noun.attrib.get("statusCallbackEvent")
        if events is not None and not set(events.split()) <= _CALLBACK_EVENTS:
            raise TwimlError(f"12200 statusCallbackEvent {events!r}")
        if noun.tag == "Sip" and not noun.text.strip().startswith(("sip:", "sips:")):
            raise TwimlError("12200 <Sip> needs a sip: URI")


# ---- state -----------------------------------------------------------------------------------

Status = Literal[
    "queued", "ringing", "in-progress", "completed", "busy", "failed", "no-answer", "canceled"
]
_ENDED = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _date(at: float | None) -> str | None:
    if at is None:
        return None
    return format_datetime(datetime.fromtimestamp(at, UTC).replace(microsecond=0))


@dataclass
class Call:
    """One call leg as Twilio keeps it."""

    sid: str
    from_: str
    to: str
    direction: str
    parent_sid: str | None = None
    status: Status = "ringing"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    queue_sid: str | None = None
    enqueued_at: float = 0.0
    enqueue: ET.Element | None = None
    enqueue_url: str = ""
    runner: asyncio.Task[None] | None = None
    # a dialled leg: how it reports, and its partner while bridged
    callback: tuple[str, str, frozenset[str]] | None = None
    bridged_with: str | None = None
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    ended_by: str = ""
    timeline: list[str] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def live(self) -> bool:
        """Not ended yet."""
        return self.status not in _ENDED


@dataclass
class Queue:
    """A Twilio queue (created on demand by ``<Enqueue>``)."""

    sid: str
    name: str
    created: float = field(default_factory=time.time)
    members: list[str] = field(default_factory=list)
    max_size: int = 1000


@dataclass
class Agent:
    """How a dialled endpoint behaves: ``answer`` after ``after`` s, ``busy``, ``silent``."""

    behaviour: Literal["answer", "busy", "silent"] = "answer"
    after: float = 0.1


@dataclass(frozen=True)
class Document:
    """One TwiML document the peer fetched: where from, why, the text."""

    call_sid: str
    url: str
    purpose: str
    text: str
    root: ET.Element | None


class _Hangup(Exception):
    """The TwiML says the call ends."""


class TwilioPeer:
    """The REST API plus Twilio's part of every call (see the module docstring)."""

    def __init__(
        self,
        *,
        voice_url: str,
        status_callback: str | None = None,
        account_sid: str | None = None,
        auth_token: str | None = None,
        play_seconds: float = 0.3,
        status_events: frozenset[str] = frozenset({"completed"}),
    ) -> None:
        self.account_sid = account_sid or _sid("AC")
        self.auth_token = auth_token or secrets.token_hex(16)
        self.voice_url = voice_url
        self.status_callback = status_callback
        self.play_seconds = play_seconds
        self.status_events = status_events
        self.calls: dict[str, Call] = {}
        self.queues: dict[str, Queue] = {}
        self.agents: dict[str, Agent] = {}
        self.documents: list[Document] = []
        self.errors: list[str] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.reachable = True
        self._validator = RequestValidator(self.auth_token)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        """What ``telephony.twilio.api_base`` must say to reach this peer."""
        return f"http://127.0.0.1:{self._port}"

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (a free port unless told)."""
        app = web.Application(middlewares=[self._gate])
        app.router.add_route("*", "/2010-04-01/Accounts/{account}/{rest:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        await self._site.start()
        self._port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))

    async def close(self) -> None:
        """Hang everything up (no more callbacks) and stop."""
        for call in self.calls.values():
            if call.runner is not None:
                call.runner.cancel()
        for task in list(self._background):
            task.cancel()
        tasks = [c.runner for c in self.calls.values() if c.runner is not None]
        await asyncio.gather(*tasks, *self._background, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def set_reachable(self, reachable: bool) -> None:
        """Take the REST API off the network (new connections refused, open ones dropped)."""
        assert self._runner is not None
        self.reachable = reachable
        if not reachable and self._site is not None:
            await self._site.stop()
            self._site = None
        elif reachable and self._site is None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self._port, reuse_address=True)
            await self._site.start()

    # ---- the test's side of a call -----------------------------------------------------------

    def agent(self, endpoint: str, behaviour: str = "answer", after: float = 0.1) -> None:
        """How ``endpoint`` (``client:anna``, ``+4930...``, ``sip:...``) takes a call."""
        self.agents[endpoint] = Agent(behaviour=behaviour, after=after)  # type: ignore[arg-type]

    def incoming(self, from_: str, to: str = "+4930555000") -> str:
        """A caller dials the number: the voice URL is requested; returns the CallSid."""
        call = Call(sid=_sid("CA"), from_=from_, to=to, direction="inbound")
        self.calls[call.sid] = call
        self._note(call, "ringing")
        call.runner = asyncio.create_task(
            self._execute(call, self.voice_url, "POST", {}, "voice"), name=f"twilio-{call.sid}"
        )
        return call.sid

    async def hangup(self, sid: str) -> None:
        """The caller (or, for a dialled leg, the agent) hangs up."""
        call = self.calls[sid]
        if not call.live:
            return
        if call.parent_sid is None:
            await self._end(call, "completed")
        else:
            # the agent's side: the dial in the caller's TwiML sees it and continues
            call.ended_by = "agent"
            call.hung_up.set()
            await wait_for(lambda: not call.live, 5, f"leg {sid} to end")

    def legs(self, parent: str | None = None, endpoint: str | None = None) -> list[Call]:
        """Dialled legs, optionally of one caller or to one endpoint, oldest first."""
        return [
            c
            for c in self.calls.values()
            if c.parent_sid is not None
            and (parent is None or c.parent_sid == parent)
            and (endpoint is None or c.to == endpoint)
        ]

    def ringing(self) -> list[Call]:
        """Dialled legs that ring now."""
        return [c for c in self.legs() if c.status == "ringing"]

    def member_of(self, sid: str) -> str | None:
        """The name of the queue the call waits in, or None."""
        for queue in self.queues.values():
            if sid in queue.members:
                return queue.name
        return None

    def twiml(self, sid: str, purpose: str | None = None) -> list[Document]:
        """The TwiML documents fetched for a call (and the legs it dialled), in order."""
        return [
            d
            for d in self.documents
            if d.call_sid == sid and (purpose is None or d.purpose == purpose)
        ]

    async def changed(self, timeout: float) -> None:
        """Wait until something changes (or ``timeout``)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # ---- Twilio's part: running TwiML --------------------------------------------------------

    def _note(self, call: Call, what: str) -> None:
        call.timeline.append(what)
        self._changed.set()

    def _params(self, call: Call, **extra: str) -> dict[str, str]:
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call.sid,
            "CallStatus": call.status,
            "Direction": call.direction,
            "From": call.from_,
            "To": call.to,
            "Caller": call.from_,
            "Called": call.to,
        }
        if call.parent_sid:
            params["ParentCallSid"] = call.parent_sid
        params.update(extra)
        return params

    async def _post(self, url: str, method: str, params: dict[str, str]) -> tuple[int, str, str]:
        """Request ``url`` as Twilio does (signed); (status, content type, body)."""
        assert self._session is not None
        if method.upper() == "GET":
            sep = "&" if urlsplit(url).query else "?"
            full = f"{url}{sep}{urlencode(params)}"
            signature = self._validator.compute_signature(full, {})
            async with self._session.get(full, headers={"X-Twilio-Signature": signature}) as r:
                return r.status, r.content_type, await r.text()
        signature = self._validator.compute_signature(url, params)
        headers = {"X-Twilio-Signature": signature}
        async with self._session.post(url, data=params, headers=headers) as resp:
            return resp.status, resp.content_type, await resp.text()

    async def _fetch(
        self, call: Call, url: str, method: str, extra: dict[str, str], purpose: str, wait: bool
    ) -> ET.Element | None:
        """Fetch and check a TwiML document; None (after recording why) where Twilio fails."""
        try:
            status, ctype, text = await self._post(url, method, self._params(call, **extra))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._error(call, f"11200 {purpose} {url}: {exc!r}")
            return None
        if status != 200:
            self._error(call, f"11200 {purpose} {url}: HTTP {status}: {text[:200]}")
            return None
        if ctype not in _TWIML_TYPES:
            self._error(call, f"12300 {purpose} {url}: content type {ctype!r}")
            return None
        try:
            root = check_twiml(text, wait_document=wait)
        except TwimlError as exc:
            self.documents.append(Document(call.sid, url, purpose, text, None))
            self._error(call, f"{exc} ({purpose} {url}: {text[:300]})")
            return None
        self.documents.append(Document(call.sid, url, purpose, text, root))
        return root

    def _error(self, call: Call, what: str) -> None:
        self.errors.append(f"{call.sid}: {what}")
        self._note(call, f"error {what}")

    async def _execute(
        self, call: Call, url: str, method: str, extra: dict[str, str], purpose: str
    ) -> None:
        """Run a call's TwiML from ``url`` until it ends or is redirected (cancelled)."""
        try:
            while url and call.live:
                root = await self._fetch(call, url, method, extra, purpose, wait=False)
                if root is None:
                    await self._end(call, "failed" if call.status == "ringing" else "completed")
                    return
                if call.status == "ringing":
                    # Twilio answers the caller's call once there is TwiML to run.
                    call.status = "in-progress"
                    call.started = time.time()
                    self._note(call, "answered")
                    if "answered" in self.status_events and self.status_callback:
                        # a progress callback, racing the TwiML Twilio is about to run
                        params = self._params(
                            call,
                            CallbackSource="call-progress-events",
                            SequenceNumber=str(next(call.seq)),
                            Timestamp=_date(time.time()) or "",
                        )
                        self._spawn(self._post(self.status_callback, "POST", params))
                url, method, extra, purpose = await self._run(call, root, url)
            if call.live:
                await self._end(call, "completed")
        except _Hangup:
            await self._end(call, "completed")

    async def _run(
        self, call: Call, root: ET.Element, base: str
    ) -> tuple[str, str, dict[str, str], str]:
        """Run one document; where to go next (empty URL: the document ran out)."""
        for verb in root:
            method = verb.attrib.get("method", "POST").upper()
            if verb.tag == "Redirect":
                return urljoin(base, (verb.text or "").strip()), method, {}, "redirect"
            if verb.tag == "Hangup":
                raise _Hangup
            if verb.tag in ("Play", "Say", "Pause"):
                await self._media(call, verb)
            elif verb.tag == "Enqueue":
                nxt = await self._enqueue(call, verb, base)
                if nxt is not None:
                    return nxt
            elif verb.tag == "Dial":
                nxt = await self._dial(call, verb, base)
                if nxt is not None:
                    return nxt
        return "", "POST", {}, ""

    async def _media(self, call: Call, verb: ET.Element) -> None:
        if verb.tag == "Pause":
            self._note(call, "pause")
            await asyncio.sleep(self.play_seconds * int(verb.attrib.get("length", "1")))
            return
        loop = int(verb.attrib.get("loop", "1"))
        self._note(call, f"{verb.tag.lower()} {(verb.text or '').strip()} loop={loop}")
        if loop == 0:
            await asyncio.Event().wait()  # until the call is redirected or ends
        await asyncio.sleep(self.play_seconds * loop)

    # ---- <Enqueue> ---------------------------------------------------------------------------

    def _queue_named(self, name: str) -> Queue:
        for queue in self.queues.values():
            if queue.name == name:
                return queue
        queue = Queue(sid=_sid("QU"), name=name)
        self.queues[queue.sid] = queue
        return queue

    async def _enqueue(
        self, call: Call, verb: ET.Element, base: str
    ) -> tuple[str, str, dict[str, str], str] | None:
        queue = self._queue_named((verb.text or "").strip())
        if len(queue.members) >= int(verb.attrib.get("maxQueueSize", queue.max_size)):
            return self._enqueue_result(call, verb, base, "queue-full", queue)
        queue.members.append(call.sid)
        call.queue_sid = queue.sid
        call.enqueued_at = time.time()
        call.enqueue = verb
        call.enqueue_url = base
        self._note(call, f"enqueued {queue.name}")
        try:
            wait = verb.attrib.get("waitUrl")
            while wait:
                root = await self._fetch(
                    call,
                    urljoin(base, wait),
                    verb.attrib.get("waitUrlMethod", "POST"),
                    self._queue_params(call, queue),
                    "wait",
                    wait=True,
                )
                if root is None:
                    break
                left = await self._run_wait(call, root, urljoin(base, wait))
                if left == "leave":
                    self._leave(call)
                    return self._enqueue_result(call, verb, base, "leave", queue)
                if left.startswith("redirect:"):
                    wait = left.removeprefix("redirect:")
            await asyncio.Event().wait()  # Twilio's own music, until dequeued
        finally:
            self._leave(call)
        return None

    async def _run_wait(self, call: Call, root: ET.Element, base: str) -> str:
        for verb in root:
            if verb.tag == "Leave":
                return "leave"
            if verb.tag == "Hangup":
                raise _Hangup
            if verb.tag == "Redirect":
                return "redirect:" + urljoin(base, (verb.text or "").strip())
            if verb.tag in ("Play", "Say", "Pause"):
                await self._media(call, verb)
        return "again"

    def _queue_params(self, call: Call, queue: Queue) -> dict[str, str]:
        return {
            "QueueSid": queue.sid,
            "QueuePosition": str(queue.members.index(call.sid) + 1),
            "QueueTime": str(int(time.time() - call.enqueued_at)),
            "AvgQueueTime": "0",
            "CurrentQueueSize": str(len(queue.members)),
            "MaxQueueSize": str(queue.max_size),
        }

    def _leave(self, call: Call) -> None:
        queue = self.queues.get(call.queue_sid or "")
        if queue is not None and call.sid in queue.members:
            queue.members.remove(call.sid)
            self._changed.set()

    def _enqueue_result(
        self, call: Call, verb: ET.Element, base: str, result: str, queue: Queue
    ) -> tuple[str, str, dict[str, str], str] | None:
        action = verb.attrib.get("action")
        if not action:
            return None
        extra = {
            "QueueResult": result,
            "QueueSid": queue.sid,
            "QueueTime": str(int(time.time() - call.enqueued_at)),
        }
        return urljoin(base, action), verb.attrib.get("method", "POST"), extra, "enqueue-action"

    # ---- <Dial> ------------------------------------------------------------------------------

    async def _dial(
        self, call: Call, verb: ET.Element, base: str
    ) -> tuple[str, str, dict[str, str], str] | None:
        nouns = list(verb)
        if not nouns:
            target = ET.Element("Number")
            target.text = (verb.text or "").strip()
            nouns = [target]
        # one noun is what Stellwerk dials; Twilio would ring several at once
        noun = nouns[0]
        to = (noun.text or "").strip()
        if noun.tag == "Client" and not to.startswith("client:"):
            to = f"client:{to}"
        leg = Call(
            sid=_sid("CA"),
            from_=verb.attrib.get("callerId", call.from_),
            to=to,
            direction="outbound-dial",
            parent_sid=call.sid,
            status="queued",
        )
        callback = noun.attrib.get("statusCallback")
        if callback:
            events = frozenset(noun.attrib.get("statusCallbackEvent", "completed").split())
            method = noun.attrib.get("statusCallbackMethod", "POST")
            leg.callback = (urljoin(base, callback), method, events)
        self.calls[leg.sid] = leg
        self._note(call, f"dial {to}")
        try:
            self._leg_event(leg, "initiated")
            leg.status = "ringing"
            self._note(leg, "ringing")
            self._leg_event(leg, "ringing")
            outcome = await self._ring(leg, int(verb.attrib.get("timeout", "30")))
            if outcome == "answered":
                leg.status = "in-progress"
                leg.started = time.time()
                leg.bridged_with = call.sid
                self._note(leg, "answered")
                self._note(call, f"bridged {leg.sid}")
                self._leg_event(leg, "answered")
                await leg.hung_up.wait()
                outcome = "completed"
        except asyncio.CancelledError:
            # the caller hung up, or the call was redirected: the leg goes too
            if leg.live:
                self._finish_leg(leg, "completed" if leg.status == "in-progress" else "canceled")
            if not call.live:
                self._dial_action_after_hangup(call, verb, base, leg)
            raise
        self._finish_leg(leg, outcome)  # type: ignore[arg-type]
        return self._dial_action(verb, base, leg, outcome)

    def _finish_leg(self, leg: Call, status: Status) -> None:
        leg.status = status
        leg.ended = time.time()
        self._note(leg, status)
        self._leg_event(leg, "completed")

    async def _ring(self, leg: Call, timeout: int) -> str:
        """Ring until the agent answers, declines, the dial times out or the leg is canceled."""
        agent = self.agents.get(leg.to, Agent(behaviour="silent"))
        if agent.behaviour == "busy":
            delay, result = agent.after, "busy"
        elif agent.behaviour == "answer" and agent.after < timeout:
            delay, result = agent.after, "answered"
        else:
            delay, result = float(timeout), "no-answer"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(leg.hung_up.wait(), delay)
            # ended while ringing: the agent declined, or a REST update canceled the leg
            return "busy" if leg.ended_by == "agent" else "canceled"
        return result

    def _dial_params(self, leg: Call, outcome: str) -> dict[str, str]:
        duration = int((leg.ended or time.time()) - leg.started) if leg.started else 0
        return {
            "DialCallStatus": outcome,
            "DialCallSid": leg.sid,
            "DialCallDuration": str(duration),
            "DialBridged": "true" if leg.started else "false",
        }

    def _dial_action(
        self, verb: ET.Element, base: str, leg: Call, outcome: str
    ) -> tuple[str, str, dict[str, str], str] | None:
        action = verb.attrib.get("action")
        if not action:
            return None
        return (
            urljoin(base, action),
            verb.attrib.get("method", "POST"),
            self._dial_params(leg, outcome),
            "dial-action",
        )

    def _dial_action_after_hangup(self, call: Call, verb: ET.Element, base: str, leg: Call) -> None:
        # The caller hung up during the dial: Twilio still requests the action (its TwiML is
        # not run), with the caller's CallStatus=completed.
        action = verb.attrib.get("action")
        if action:
            outcome = "completed" if leg.started else "canceled"
            params = self._params(call, **self._dial_params(leg, outcome))
            self._spawn(
                self._post(urljoin(base, action), verb.attrib.get("method", "POST"), params)
            )

    def _leg_event(self, leg: Call, event: str) -> None:
        if leg.callback is None:
            return
        url, method, events = leg.callback
        if event not in events:
            return
        params = self._params(
            leg,
            CallbackSource="call-progress-events",
            SequenceNumber=str(next(leg.seq)),
            Timestamp=_date(time.time()) or "",
        )
        if event == "completed" and leg.started:
            params["CallDuration"] = str(int((leg.ended or time.time()) - leg.started))
        self._spawn(self._post(url, method, params))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors.append(f"11200 callback failed: {exc!r}")

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- ending ------------------------------------------------------------------------------

    async def _end(self, call: Call, status: Status) -> None:
        """End a caller's call: stop its TwiML, tell the status callback."""
        if not call.live:
            return
        enqueue, enqueue_url = call.enqueue, call.enqueue_url
        in_queue = self.member_of(call.sid) is not None
        call.status = status
        call.ended = time.time()
        self._note(call, status)
        runner = call.runner
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        self._leave(call)
        if in_queue and enqueue is not None and enqueue.attrib.get("action"):
            params = self._params(call, QueueResult="hangup", QueueSid=call.queue_sid or "")
            url = urljoin(enqueue_url, enqueue.attrib["action"])
            self._spawn(self._post(url, enqueue.attrib.get("method", "POST"), params))
        if self.status_callback and call.parent_sid is None:
            params = self._params(
                call,
                CallDuration=str(int(call.ended - (call.started or call.ended))),
                CallbackSource="call-progress-events",
                SequenceNumber=str(next(call.seq)),
                Timestamp=_date(call.ended) or "",
            )
            self._spawn(self._post(self.status_callback, "POST", params))

    async def _redirect(self, call: Call, url: str | None, method: str, twiml: str | None) -> None:
        """Stop what the call does and run other TwiML (REST Call/Member update)."""
        in_queue = self.member_of(call.sid) is not None
        enqueue, enqueue_url = call.enqueue, call.enqueue_url
        runner = call.runner
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        self._leave(call)
        self._note(call, f"redirected {url or 'twiml'}")
        pre: list[Callable[[], Awaitable[Any]]] = []
        if in_queue and enqueue is not None and enqueue.attrib.get("action"):
            params = self._params(call, QueueResult="redirected", QueueSid=call.queue_sid or "")
            action = urljoin(enqueue_url, enqueue.attrib["action"])
            pre.append(lambda: self._post(action, enqueue.attrib.get("method", "POST"), params))
        call.runner = asyncio.create_task(self._continue(call, pre, url, method, twiml))

    async def _continue(
        self,
        call: Call,
        pre: list[Callable[[], Awaitable[Any]]],
        url: str | None,
        method: str,
        twiml: str | None,
    ) -> None:
        for step in pre:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await step()
        if url:
            await self._execute(call, url, method, {}, "redirect")
            return
        try:
            root = check_twiml(twiml or "")
        except TwimlError as exc:
            self._error(call, f"{exc} (inline Twiml)")
            await self._end(call, "completed")
            return
        self.documents.append(Document(call.sid, "", "inline", twiml or "", root))
        try:
            nxt = await self._run(call, root, "")
            if nxt[0]:
                await self._execute(call, nxt[0], nxt[1], nxt[2], nxt[3])
            elif call.live:
                await self._end(call, "completed")
        except _Hangup:
            await self._end(call, "completed")

    # ---- REST --------------------------------------------------------------------------------

    @web.middleware
    async def _gate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self.reachable:
            # a connection kept alive from before the outage: drop it, as a dead network would
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError
        return await handler(request)

    def _rest_error(self, status: int, code: int, message: str) -> web.Response:
        return web.json_response(
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
            status=status,
        )

    def _authorised(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        return secrets.compare_digest(user, self.account_sid) and secrets.compare_digest(
            password, self.auth_token
        )

    async def _rest(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._rest_error(401, 20003, "Authentication Error - invalid username")
        account = request.match_info["account"]
        rest = request.match_info["rest"]
        form: dict[str, str] = {}
        if request.method == "POST":
            if request.content_type != "application/x-www-form-urlencoded":
                return self._rest_error(
                    400, 20001, f"form body expected, not {request.content_type}"
                )
            for key, value in (await request.post()).items():
                if not isinstance(value, str):
                    return self._rest_error(400, 20001, f"{key} is not a form value")
                form[key] = value
        self.requests.append((request.method, request.path, form))
        if account != self.account_sid:
            return self._rest_error(
                404, 20404, f"The requested resource {request.path} was not found"
            )
        parts = rest.split("/")
        query = dict(request.query)
        try:
            if parts == ["Queues.json"]:
                return self._only(request, "GET") or self._page(
                    request, "queues", [self._queue_json(q) for q in self.queues.values()], query
                )
            if len(parts) == 2 and parts[0] == "Queues" and parts[1].endswith(".json"):
                queue = self._find_queue(parts[1].removesuffix(".json"))
                return self._only(request, "GET") or web.json_response(self._queue_json(queue))
            if len(parts) == 3 and parts[0] == "Queues" and parts[2] == "Members.json":
                queue = self._find_queue(parts[1])
                members = [self._member_json(queue, sid) for sid in queue.members]
                return self._only(request, "GET") or self._page(
                    request, "queue_members", members, query
                )
            if len(parts) == 4 and parts[0] == "Queues" and parts[2] == "Members":
                return await self._member(request, self._find_queue(parts[1]), parts[3], form)
            if parts == ["Calls.json"]:
                return self._only(request, "GET") or self._calls(request, query)
            if len(parts) == 2 and parts[0] == "Calls" and parts[1].endswith(".json"):
                return await self._call(request, parts[1].removesuffix(".json"), form)
        except LookupError as exc:
            return self._rest_error(
                404, 20404, f"The requested resource {exc.args[0]} was not found"
            )
        return self._rest_error(404, 20404, f"The requested resource {request.path} was not found")

    def _only(self, request: web.Request, *methods: str) -> web.Response | None:
        if request.method in methods:
            return None
        return self._rest_error(405, 20004, f"Method {request.method} not allowed")

    def _find_queue(self, sid: str) -> Queue:
        queue = self.queues.get(sid)
        if queue is None:
            raise LookupError(f"Queue {sid}")
        return queue

    def _uri(self, tail: str) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}/{tail}"

    def _page(
        self, request: web.Request, key: str, items: list[dict[str, Any]], query: dict[str, str]
    ) -> web.Response:
        unknown = set(query) - {
            "PageSize",
            "Page",
            "PageToken",
            "Status",
            "ParentCallSid",
            "To",
            "From",
        }
        if unknown:
            return self._rest_error(400, 20001, f"unknown parameters {sorted(unknown)}")
        size = int(query.get("PageSize", "50"))
        page = int(query.get("Page", "0"))
        if not 1 <= size <= 1000 or page < 0:
            return self._rest_error(400, 20001, "PageSize is 1 to 1000, Page at least 0")
        chunk = items[page * size : (page + 1) * size]
        base = request.path
        rest = {k: v for k, v in query.items() if k not in ("PageSize", "Page", "PageToken")}

        def uri(n: int) -> str:
            return f"{base}?{urlencode({**rest, 'PageSize': size, 'Page': n})}"

        more = (page + 1) * size < len(items)
        return web.json_response(
            {
                key: chunk,
                "end": page * size + max(len(chunk) - 1, 0),
                "first_page_uri": uri(0),
                "next_page_uri": uri(page + 1) if more else None,
                "page": page,
                "page_size": size,
                "previous_page_uri": uri(page - 1) if page > 0 else None,
                "start": page * size,
                "uri": uri(page),
            }
        )

    def _queue_json(self, queue: Queue) -> dict[str, Any]:
        return {
            "account_sid": self.account_sid,
            "average_wait_time": 0,
            "current_size": len(queue.members),
            "date_created": _date(queue.created),
            "date_updated": _date(queue.created),
            "friendly_name": queue.name,
            "max_size": queue.max_size,
            "sid": queue.sid,
            "uri": self._uri(f"Queues/{queue.sid}.json"),
            "subresource_uris": {"members": self._uri(f"Queues/{queue.sid}/Members.json")},
        }

    def _member_json(self, queue: Queue, sid: str) -> dict[str, Any]:
        call = self.calls[sid]
        return {
            "queue_sid": queue.sid,
            "call_sid": sid,
            "date_enqueued": _date(call.enqueued_at),
            "position": queue.members.index(sid) + 1,
            "uri": self._uri(f"Queues/{queue.sid}/Members/{sid}.json"),
            "wait_time": int(time.time() - call.enqueued_at),
        }

    async def _member(
        self, request: web.Request, queue: Queue, name: str, form: dict[str, str]
    ) -> web.Response:
        denied = self._only(request, "GET", "POST")
        if denied:
            return denied
        sid = name.removesuffix(".json")
        if sid == "Front":
            if not queue.members:
                raise LookupError(f"Queue {queue.sid} member Front")
            sid = queue.members[0]
        if sid not in queue.members:
            raise LookupError(f"Queue {queue.sid} member {sid}")
        body = self._member_json(queue, sid)
        if request.method == "GET":
            return web.json_response(body)
        problem = self._check_form(form, {"Url", "Method"})
        if problem is None and "Url" not in form:
            problem = "21205 Url parameter is required"
        if problem is None:
            problem = _bad_url(form["Url"]) or _bad_method(form.get("Method"))
        if problem is not None:
            return self._rest_error(400, int(problem[:5]), problem[6:])
        await self._redirect(self.calls[sid], form["Url"], form.get("Method", "POST"), None)
        return web.json_response(body)

    def _check_form(self, form: dict[str, str], known: set[str]) -> str | None:
        unknown = set(form) - known
        if unknown:
            return f"20001 unknown parameters {sorted(unknown)}"
        return None

    def _calls(self, request: web.Request, query: dict[str, str]) -> web.Response:
        calls = sorted(self.calls.values(), key=lambda c: c.created, reverse=True)
        if "Status" in query:
            calls = [c for c in calls if c.status == query["Status"]]
        if "ParentCallSid" in query:
            calls = [c for c in calls if c.parent_sid == query["ParentCallSid"]]
        if "To" in query:
            calls = [c for c in calls if c.to == query["To"]]
        if "From" in query:
            calls = [c for c in calls if c.from_ == query["From"]]
        return self._page(request, "calls", [self._call_json(c) for c in calls], query)

    def _call_json(self, call: Call) -> dict[str, Any]:
        base = f"Calls/{call.sid}"
        duration = int(call.ended - call.started) if call.ended and call.started else None
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": _date(call.created),
            "date_updated": _date(call.ended or call.started or call.created),
            "direction": call.direction,
            "duration": None if duration is None else str(duration),
            "end_time": _date(call.ended),
            "forwarded_from": None,
            "from": call.from_,
            "from_formatted": call.from_,
            "group_sid": None,
            "parent_call_sid": call.parent_sid,
            "phone_number_sid": None if call.parent_sid else "PN" + "0" * 32,
            "price": None,
            "price_unit": "USD",
            "sid": call.sid,
            "start_time": _date(call.started),
            "status": call.status,
            "subresource_uris": {
                name: self._uri(f"{base}/{file}.json")
                for name, file in (
                    ("notifications", "Notifications"),
                    ("recordings", "Recordings"),
                    ("feedback", "Feedback"),
                    ("payments", "Payments"),
                    ("events", "Events"),
                    ("siprec", "Siprec"),
                    ("streams", "Streams"),
                    ("user_defined_message_subscriptions", "UserDefinedMessageSubscriptions"),
                    ("user_defined_messages", "UserDefinedMessages"),
                )
            }
            | {"feedback_summaries": self._uri("Calls/FeedbackSummary.json")},
            "to": call.to,
            "to_formatted": call.to,
            "trunk_sid": None,
            "uri": self._uri(f"{base}.json"),
            "queue_time": str(int(1000 * (call.enqueued_at and time.time() - call.enqueued_at))),
        }

    async def _call(self, request: web.Request, sid: str, form: dict[str, str]) -> web.Response:
        denied = self._only(request, "GET", "POST")
        if denied:
            return denied
        call = self.calls.get(sid)
        if call is None:
            raise LookupError(f"Call {sid}")
        if request.method == "GET":
            return web.json_response(self._call_json(call))
        known = {
            "Url", "Method", "Status", "FallbackUrl", "FallbackMethod", "StatusCallback",
            "StatusCallbackMethod", "Twiml", "TimeLimit",
        }  # fmt: skip
        problem = self._check_form(form, known)
        if problem is None and "Url" in form and "Twiml" in form:
            problem = "21205 Twiml and Url parameters are mutually exclusive"
        if problem is None and "Url" in form:
            problem = _bad_url(form["Url"])
        if problem is None:
            problem = _bad_method(form.get("Method"))
        status = form.get("Status")
        if problem is None and status not in (None, "canceled", "completed"):
            problem = f"21218 Status {status!r} is not canceled or completed"
        if problem is not None:
            return self._rest_error(400, int(problem[:5]), problem[6:])
        if status is not None:
            await self._set_status(call, status)
        elif "Url" in form or "Twiml" in form:
            if not call.live:
                return self._rest_error(400, 21220, "Call is not in-progress. Cannot redirect.")
            if call.parent_sid is not None:
                return self._rest_error(
                    400, 21220, "a dialled leg is redirected through its caller"
                )
            await self._redirect(
                call, form.get("Url"), form.get("Method", "POST"), form.get("Twiml")
            )
        return web.json_response(self._call_json(call))

    async def _set_status(self, call: Call, status: str) -> None:
        if not call.live:
            return
        if status == "canceled" and call.status not in ("queued", "ringing"):
            return  # canceled only ends a call that has not been answered
        if call.parent_sid is None:
            await self._end(call, "canceled" if status == "canceled" else "completed")
            return
        # a dialled leg: the dial in its caller's TwiML sees it end and goes on
        call.ended_by = "rest"
        call.hung_up.set()
        await wait_for(lambda: not call.live, 5, f"leg {call.sid} to end")


def _bad_url(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"21205 Url {url!r} is not a valid absolute URL"
    return None


def _bad_method(method: str | None) -> str | None:
    if method is not None and method.upper() not in _METHODS:
        return f"21204 Method {method!r} is not GET or POST"
    return None


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it is truthy (a small local copy of the tests' wait_until)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
