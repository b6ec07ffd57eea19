"""Twilio Voice through the official ``twilio`` library: TwiML documents and the REST client.

TwiML comes from :class:`twilio.twiml.voice_response.VoiceResponse`; nothing here writes XML by
hand. REST calls go through :class:`twilio.rest.Client` with an
:class:`~twilio.http.AsyncHttpClient` of ours (:class:`ApiBaseHttpClient`): the library's own
extension point for the transport. It sends every request on Stellwerk's event loop with
aiohttp (never blocking it) and addresses it to ``telephony.twilio.api_base`` instead of
``https://api.twilio.com``, so tests and a regional or proxied API work the same way. The
library's bundled ``AsyncTwilioHttpClient`` is not used: it authenticates with aiohttp's
``BasicAuth``, which current aiohttp deprecates, and retries through ``aiohttp-retry`` on its
own, while the driver already retries with the daemon's capped, jittered back-off.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from twilio.twiml.voice_response import Dial, VoiceResponse

__all__ = [
    "LIBRARY_HOST",
    "ApiBaseHttpClient",
    "LiveCall",
    "TwilioException",
    "TwilioRest",
    "TwilioRestException",
    "dial_twiml",
    "enqueue_twiml",
    "hangup_twiml",
    "hold_twiml",
    "signature_valid",
    "twilio_queue_name",
    "wait_twiml",
]

LIBRARY_HOST = "https://api.twilio.com"
"""Where the library addresses the 2010-04-01 API; :class:`ApiBaseHttpClient` rewrites it."""

_log = logging.getLogger("stellwerk.twilio.http")


# ---- TwiML -----------------------------------------------------------------------------------


def endpoint_noun(dial: Dial, endpoint: str, **attrs: Any) -> None:
    """Add the noun for an agent endpoint: ``client:NAME``, an E.164 number or a ``sip:`` URI."""
    if endpoint.startswith("client:"):
        dial.client(endpoint.removeprefix("client:"), **attrs)
    elif endpoint.startswith(("sip:", "sips:")):
        dial.sip(endpoint, **attrs)
    else:
        dial.number(endpoint, **attrs)


def twilio_queue_name(queue: str) -> str:
    """The Twilio queue a Stellwerk queue's callers wait in: its name, which Twilio allows up
    to 64 characters; a longer one is cut and made unique with a digest of the whole."""
    if len(queue) <= 64:
        return queue
    digest = hashlib.sha1(queue.encode()).hexdigest()[:8]
    return f"{queue[:55]}~{digest}"


def enqueue_twiml(queue: str, wait_url: str) -> str:
    """Put the caller into the Twilio queue ``queue`` with the daemon's hold document.

    No ``action``: the call only leaves the queue when Stellwerk dequeues it (REST Member
    update), and the status callback reports a hang-up in the queue.
    """
    response = VoiceResponse()
    response.enqueue(twilio_queue_name(queue), wait_url=wait_url, wait_url_method="POST")
    return str(response)


def hold_twiml(music_url: str | None, redirect_url: str, pause: int = 1) -> str:
    """A caller whose queue is not decided yet: a moment of music (or silence), then ask again."""
    response = VoiceResponse()
    if music_url:
        response.play(music_url)
    else:
        response.pause(length=pause)
    response.redirect(redirect_url, method="POST")
    return str(response)


def wait_twiml(music_url: str, announcement: str | None = None, *, again: bool = False) -> str:
    """The ``waitUrl`` document: the queue's music, after its announcement when one is due.

    ``again`` is for queues with announcements: the music plays once and the document ends, so
    Twilio requests it again and the daemon decides from ``QueueTime`` whether the next
    announcement is due. Otherwise the music loops for ever (``loop="0"``). An announcement is
    a media URL (``<Play>``) or text (``<Say>``).
    """
    response = VoiceResponse()
    if announcement:
        if announcement.startswith(("http://", "https://")):
            response.play(announcement)
        else:
            response.say(announcement)
    if again or announcement:
        response.play(music_url)
    else:
        response.play(music_url, loop=0)
    return str(response)


def dial_twiml(
    endpoint: str,
    *,
    timeout: int,
    action: str,
    status_callback: str,
    caller_id: str | None = None,
) -> str:
    """Ring the agent's endpoint from the caller's call; caller and agent are bridged on answer.

    The dialled noun reports ``answered`` and ``completed`` to ``status_callback`` (the accept,
    and the agent's side ending); the dial's ``action`` is requested when it ends
    (``DialCallStatus``: busy, no-answer, completed...).
    """
    dial = Dial(
        timeout=timeout,
        action=action,
        method="POST",
        answer_on_bridge=True,
        caller_id=caller_id,
    )
    endpoint_noun(
        dial,
        endpoint,
        status_callback=status_callback,
        status_callback_event="answered completed",
        status_callback_method="POST",
    )
    response = VoiceResponse()
    response.append(dial)
    return str(response)


def hangup_twiml() -> str:
    """End the call."""
    response = VoiceResponse()
    response.hangup()
    return str(response)


def refusal_twiml() -> str:
    """The answer to a request Stellwerk refuses (bad signature): an apology, then hang up."""
    response = VoiceResponse()
    response.say("Sorry, this call cannot be connected.")
    response.hangup()
    return str(response)


def empty_twiml() -> str:
    """Nothing to do (the answer to a status callback)."""
    return str(VoiceResponse())


def signature_valid(
    auth_token: str, url: str, params: Mapping[str, str], signature: str | None
) -> bool:
    """Whether ``X-Twilio-Signature`` is Twilio's for a request to ``url`` with ``params``."""
    if not signature:
        return False
    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))


# ---- REST ------------------------------------------------------------------------------------


class ApiBaseHttpClient(AsyncHttpClient):
    """The library's transport on the daemon's event loop, sent to ``api_base``.

    Create it inside a running event loop (it owns an aiohttp session) and :meth:`close` it.
    """

    def __init__(self, api_base: str, timeout: float = 10.0) -> None:
        super().__init__(_log, True, timeout)
        self.api_base = api_base.rstrip("/")
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    def rewrite(self, url: str) -> str:
        """The library's ``https://api.twilio.com/...`` URL on ``api_base``."""
        if url.startswith(LIBRARY_HOST):
            return self.api_base + url[len(LIBRARY_HOST) :]
        return url

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        """One request (the library's signature); aiohttp errors propagate to the caller."""
        headers = dict(headers or {})
        if auth is not None:
            headers["Authorization"] = basic_auth(*auth)
        query = {k: str(v) for k, v in (params or {}).items()}
        async with self.session.request(
            method.upper(),
            self.rewrite(url),
            params=query,
            data=data,
            headers=headers,
            allow_redirects=allow_redirects,
            timeout=aiohttp.ClientTimeout(total=timeout) if timeout else None,
        ) as resp:
            return Response(resp.status, await resp.text(), dict(resp.headers))

    async def close(self) -> None:
        """Close the aiohttp session."""
        await self.session.close()


def basic_auth(user: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value (aiohttp's BasicAuth helper is deprecated)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


@dataclass(frozen=True)
class LiveCall:
    """A call Twilio has now, from the Calls list: the caller's call or a dialled agent leg."""

    sid: str
    status: str
    from_: str
    to: str
    parent_sid: str | None
    direction: str


class TwilioRest:
    """The REST calls the driver makes, through the library (create inside the event loop)."""

    def __init__(self, account_sid: str, auth_token: str, api_base: str) -> None:
        self.http = ApiBaseHttpClient(api_base)
        # environment: without it the library reads TWILIO_EDGE/TWILIO_REGION from os.environ
        # and would send requests somewhere else than api_base.
        self.client = Client(
            account_sid,
            auth_token,
            account_sid=account_sid,
            http_client=self.http,
            environment={"TWILIO_EDGE": "", "TWILIO_REGION": ""},
        )

    async def close(self) -> None:
        """Close the transport."""
        await self.http.close()

    async def dequeue(self, queue_sid: str, call_sid: str, url: str) -> None:
        """Queue Member update: the queued call leaves the queue and runs the TwiML at ``url``."""
        member = self.client.queues(queue_sid).members(call_sid)
        await member.update_async(url=url, method="POST")

    async def redirect(self, call_sid: str, url: str) -> None:
        """Call update: the call stops what it does and runs the TwiML at ``url``."""
        await self.client.calls(call_sid).update_async(url=url, method="POST")

    async def end(self, call_sid: str, status: str = "completed") -> None:
        """Call update ``Status``: ``completed`` hangs up, ``canceled`` stops a ringing call."""
        await self.client.calls(call_sid).update_async(status=status)

    async def queue_sids(self) -> dict[str, str]:
        """Every queue of the account: friendly name -> sid."""
        queues = await self.client.queues.list_async()
        return {q.friendly_name: q.sid for q in queues}

    async def members(self, queue_sid: str) -> list[str]:
        """The CallSids waiting in a queue, head first."""
        members = await self.client.queues(queue_sid).members.list_async()
        return [m.call_sid for m in sorted(members, key=lambda m: m.position or 0)]

    async def live_calls(self) -> list[LiveCall]:
        """The account's calls that ring or are in progress now."""
        out: list[LiveCall] = []
        for status in ("ringing", "in-progress", "queued"):
            for call in await self.client.calls.list_async(status=status):
                out.append(
                    LiveCall(
                        sid=call.sid,
                        status=call.status,
                        from_=call._from or "",
                        to=call.to or "",
                        parent_sid=call.parent_call_sid,
                        direction=call.direction or "",
                    )
                )
        return out


def absolute(base: str, path: str) -> str:
    """``path`` (with query) under the public base URL ``base``."""
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}{path}"
