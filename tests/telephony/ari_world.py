"""Shared pieces of the Asterisk end-to-end tests: a routing file with phones, waiting helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.daemon.conftest import MqttProbe, wait_until
from tests.peers.ari import AriPeer

EXPERT_PHONE = "+4930111111"


def write_phone_routing(
    path: Path,
    agents: tuple[str, ...] = ("anna", "ben"),
    *,
    offer_timeout: float = 1.0,
    wrap_up: float = 0.5,
    expert_agents: tuple[str, ...] = (),
) -> Path:
    """Support queue (music class ``support-moh``), an expert desk (weight 10), one expert;
    agent ``x`` has the endpoint ``PJSIP/x``. ``agents`` take support calls, ``expert_agents``
    the expert desk's and support calls both."""
    lines = [
        f"  - {{id: {a}, skills: {{support: 3}}, endpoints: {{asterisk: PJSIP/{a}}}}}"
        for a in agents
    ]
    lines += [
        f"  - {{id: {a}, skills: {{support: 3, second_level: 3}}, "
        f"endpoints: {{asterisk: PJSIP/{a}}}}}"
        for a in expert_agents
    ]
    path.write_text(
        f"""version: 1
defaults:
  offer_timeout: {offer_timeout}
  wrap_up: {wrap_up}
  max_missed_offers: 5
skills: [support, second_level]
queues:
  support:
    skills: {{support: 1}}
    music_class: support-moh
    announcement: {{media: "sound:queue-periodic-announce", every: 0.4}}
  expert_desk:
    skills: {{second_level: 1}}
    weight: 10
    music_class: expert-moh
  callback_desk:
    skills: {{support: 1}}
    phone_offer: desktop
agents:
{chr(10).join(lines)}
experts:
  - {{id: x-heinz, name: Heinz, phones: ["{EXPERT_PHONE}"]}}
rules:
  - name: crowd_expert
    when: customer.expert
    queue: expert_desk
    priority: 100
  - name: by_stasis_arg
    when: attributes.queue == "expert_desk"
    queue: expert_desk
  - name: desktop_first
    when: attributes.queue == "callback_desk"
    queue: callback_desk
  - name: default
    default: true
    queue: support
""",
        encoding="utf-8",
    )
    return path


def asterisk_env(peer: AriPeer) -> dict[str, str]:
    """Extra daemon settings pointing it at the peer (keyword arguments of start_daemon)."""
    return {
        "asterisk_url": peer.url,
        "asterisk_username": peer.username,
        "asterisk_password": peer.password,
    }


async def login(probe: MqttProbe, *agents: str) -> None:
    """Agents log in and are seen available."""
    for agent in agents:
        await probe.agent(agent, op="login")
    for agent in agents:
        await probe.wait_for("events/agent.state", agent_id=agent, state="available")


def held(peer: AriPeer, cid: str) -> str | None:
    """The music class a caller hears in its holding bridge, or None."""
    channel = peer.channels.get(cid)
    if channel is None or channel.bridge is None or channel.state != "Up":
        return None
    bridge = peer.bridges.get(channel.bridge)
    if bridge is None or bridge.bridge_type != "holding":
        return None
    return bridge.moh


def bridged_with(peer: AriPeer, cid: str) -> list[str]:
    """Endpoints of the channels sharing a mixing bridge with ``cid``."""
    channel = peer.channels.get(cid)
    if channel is None or channel.bridge is None:
        return []
    bridge = peer.bridges.get(channel.bridge)
    if bridge is None or bridge.bridge_type != "mixing":
        return []
    return [peer.channels[c].endpoint for c in bridge.channels if c != cid and c in peer.channels]


async def wait_ringing(peer: AriPeer, endpoint: str, timeout: float = 5.0) -> str:
    """The channel id of the leg ringing at ``endpoint`` (waits for it)."""
    ids: list[str] = await wait_until(lambda: peer.ringing(endpoint), timeout, f"{endpoint} rings")
    return ids[0]


async def wait_held(peer: AriPeer, cid: str, music: str, timeout: float = 5.0) -> None:
    """Until ``cid`` is held with ``music``."""
    await wait_until(lambda: held(peer, cid) == music, timeout, f"{cid} held with {music}")


def contact(cid: str) -> str:
    """The contact id of an ARI channel."""
    return f"asterisk-ari:{cid}"


def no_violations(peer: AriPeer) -> Any:
    """Every request the adapter made was valid ARI."""
    assert peer.violations == [], peer.violations
    return True
