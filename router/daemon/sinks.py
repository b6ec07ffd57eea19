"""The port through which I/O-edge actors see what the engine decided.

MQTT publishing is one way of carrying out the engine's commands; a telephony connector (ring
the agent's phone, bridge, hang up) and the agent desk's live feed are others. Each such actor
is a :class:`CommandSink` handed to the router. The router calls :meth:`CommandSink.submit`
with the commands of every journal entry it applies after the ``published`` mark (so commands
a previous lease holder already carried out are not repeated), after they were published on
MQTT and in journal order; and :meth:`CommandSink.restored` once per lease tenure, after the
snapshot was restored and the journal tail replayed, with the engine as a read-only view, so a
sink can reconcile its own world (a PBX's calls, open browser sessions) with the engine's.

``submit`` is awaited: a sink with a bounded queue of its own applies back-pressure to routing
instead of growing without limit. It must not raise for a failure of its peer (a PBX that is
down); it reports and retries on its own, since the engine's decision stands either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from router.messages import Command

if TYPE_CHECKING:
    from router.engine import Engine


class CommandSink(Protocol):
    """An I/O-edge actor that carries out engine commands (see the module docstring)."""

    async def submit(self, cmds: Sequence[Command]) -> None:
        """Carry out (or queue, bounded) the commands of applied journal entries, in order."""
        ...

    async def restored(self, engine: Engine) -> None:
        """A lease tenure began; ``engine`` holds the restored state. Read it, never change it."""
        ...
