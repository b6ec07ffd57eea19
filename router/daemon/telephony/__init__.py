"""Telephony connectors: the engine's decisions carried out on a PBX (see docs/telephony.md).

:mod:`router.daemon.telephony.connector` holds the system-independent part (a
:class:`~router.daemon.sinks.CommandSink` and the :class:`PbxDriver` port); each telephony
system has one driver module (``asterisk``, ``freeswitch``, ``twilio``) exposing
``make_driver(settings) -> PbxDriver``. :func:`build_connectors` makes one connector per
configured system.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import structlog

from router.daemon.config import Settings
from router.daemon.intake import Intake
from router.daemon.telephony.connector import PbxDriver, TelephonyConnector
from rules.table import RoutingTable

log = structlog.get_logger("stellwerk.telephony")

#: system name -> the module whose ``make_driver(settings)`` builds its driver.
DRIVER_MODULES: dict[str, str] = {
    "asterisk": "router.daemon.telephony.asterisk",
    "freeswitch": "router.daemon.telephony.freeswitch",
    "twilio": "router.daemon.telephony.twilio",
}


def configured_systems(settings: Settings) -> list[str]:
    """The telephony systems the settings turn on, in a fixed order."""
    t = settings.telephony
    on = {"asterisk": t.asterisk.enabled, "freeswitch": t.freeswitch.enabled}
    on["twilio"] = t.twilio.enabled
    return [name for name in DRIVER_MODULES if on[name]]


def build_connectors(
    settings: Settings,
    intake: Intake,
    table: RoutingTable,
    *,
    leading: Callable[[], bool] | None = None,
) -> list[TelephonyConnector]:
    """One connector per configured telephony system whose adapter this build has;
    ``leading`` says whether this daemon holds the routing lease."""
    out = []
    for system in configured_systems(settings):
        try:
            module = importlib.import_module(DRIVER_MODULES[system])
        except ModuleNotFoundError:
            log.error("telephony.no_adapter", system=system)
            continue
        make: Callable[[Settings], PbxDriver] = module.make_driver
        out.append(TelephonyConnector(system, make(settings), intake, table, leading=leading))
    return out
