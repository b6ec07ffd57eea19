"""The shapes of an agent's phone endpoint per telephony system (``agents[].endpoints``).

Pure checks used by :mod:`rules.load` so that ``stellwerk check`` points at a malformed
endpoint before a PBX refuses to dial it:

- ``asterisk``: ``TECH/resource`` as Asterisk's dialplan ``Dial()`` and ARI ``endpoint`` take
  it: a channel technology (``PJSIP``, ``SIP``, ``IAX2``, ``Local``, ...) and a resource
  without spaces, e.g. ``PJSIP/1001`` or ``Local/1001@agents``.
- ``freeswitch``: a dial string: ``user/1001@domain``, ``sofia/<profile>/<destination>``
  (``sofia/gateway/<gw>/<number>`` included), or another ``endpoint/...`` such as
  ``loopback/1001``, optionally preceded by ``{var=value,...}`` channel variables.
- ``twilio``: ``client:NAME`` (a Twilio Client identity), an E.164 number, or a ``sip:`` URI.
"""

from __future__ import annotations

import re

_ASTERISK = re.compile(r"[A-Za-z][A-Za-z0-9_]*/[^\s/][^\s]*")
_FS_VARS = re.compile(r"\{[^{}\s]*\}")
_FS_USER = re.compile(r"user/[^\s@/]+@[^\s@/]+")
_FS_SOFIA = re.compile(r"sofia/[^\s/]+/[^\s]+")
_FS_OTHER = re.compile(r"[a-z][a-z0-9_.]*/[^\s]+")
_TWILIO_CLIENT = re.compile(r"client:[A-Za-z0-9_.\-]{1,121}")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_SIP_URI = re.compile(r"sips?:[^\s@:;]+@[A-Za-z0-9.\-\[\]:]+(;[^\s]*)?")

SYSTEMS = ("asterisk", "freeswitch", "twilio")


def endpoint_problem(system: str, value: str) -> str | None:
    """Why ``value`` is not an endpoint for ``system`` (one of :data:`SYSTEMS`), or None."""
    if system == "asterisk":
        if _ASTERISK.fullmatch(value):
            return None
        return f"asterisk endpoint {value!r} must be TECH/resource, e.g. PJSIP/1001"
    if system == "freeswitch":
        rest = value
        if rest.startswith("{"):
            m = _FS_VARS.match(rest)
            if m is None:
                return f"freeswitch endpoint {value!r}: unclosed {{...}} channel variables"
            rest = rest[m.end() :]
        if rest.startswith("user/"):
            ok = _FS_USER.fullmatch(rest) is not None
        elif rest.startswith("sofia/"):
            ok = _FS_SOFIA.fullmatch(rest) is not None
        else:
            ok = _FS_OTHER.fullmatch(rest) is not None
        if ok:
            return None
        return (
            f"freeswitch endpoint {value!r} must be a dial string such as user/1001@domain "
            "or sofia/internal/1001@host"
        )
    if system == "twilio":
        if _TWILIO_CLIENT.fullmatch(value) or _E164.fullmatch(value) or _SIP_URI.fullmatch(value):
            return None
        return (
            f"twilio endpoint {value!r} must be client:NAME, an E.164 number (+4930123456) "
            "or a SIP URI (sip:anna@example.com)"
        )
    return f"unknown telephony system {system!r}"
