"""TLS on both transports, with a throw-away CA the test creates (the ``cryptography`` package):
the daemon speaks ``mqtts://`` to a private Mosquitto with a TLS listener that requires client
certificates, and serves its HTTP API over HTTPS; a resumed backlog over TLS arrives whole."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import msgspec
import pytest
from aiohttp import test_utils
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from router.daemon.mqtt import _HeldTlsReads, incoming_bound
from tests.daemon.conftest import MqttProbe, Names, ari, write_routing
from tests.daemon.private_servers import HOST, MOSQUITTO, PrivateMosquitto, free_port
from tests.daemon.test_mqtt_socket import resumed_backlog, small_window

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not MOSQUITTO.exists(), reason="needs /usr/sbin/mosquitto"),
]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_pki(dir: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("stellwerk test CA"))
        .issuer_name(_name("stellwerk test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: bool) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, True)
    client, client_key = leaf("stellwerk", ExtendedKeyUsageOID.CLIENT_AUTH, False)
    pem = serialization.Encoding.PEM
    pki = Pki(
        ca=dir / "ca.pem",
        server_cert=dir / "server.pem",
        server_key=dir / "server.key",
        client_cert=dir / "client.pem",
        client_key=dir / "client.key",
    )
    pki.ca.write_bytes(ca.public_bytes(pem))
    pki.server_cert.write_bytes(server.public_bytes(pem))
    pki.client_cert.write_bytes(client.public_bytes(pem))
    _write_key(server_key, pki.server_key)
    _write_key(client_key, pki.client_key)
    return pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    (tmp_path / "pki").mkdir()
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Any:
    port = free_port()
    mq = PrivateMosquitto(
        dir=tmp_path / "mq",
        tls_port=port,
        tls_listener=(
            f"listener {port} {HOST}\n"
            f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
            "require_certificate true\ntls_version tlsv1.2\n"
        ),
    )
    mq.dir.mkdir()
    mq.start()
    yield mq
    mq.stop()


def _client_context(pki: Pki, cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


# MQTT 3.1.1 CONNECT, clean session, empty client id; a broker that lets us in answers CONNACK.
CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
CONNACK_OK = b"\x20\x02\x00\x00"


def mqtt_over_tls(port: int, context: ssl.SSLContext) -> bytes | None:
    """The broker's first 4 bytes after CONNECT over TLS, or None when TLS itself failed.

    (A raw socket rather than aiomqtt: paho leaves the TLS socket of a refused handshake
    unclosed, which this suite's warnings-as-errors would report.)
    """
    with socket.create_connection((HOST, port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=HOST) as tls:
                tls.sendall(CONNECT)
                return tls.recv(4)
        except (ssl.SSLError, ConnectionError):
            return None


def test_the_broker_wants_our_ca_and_a_client_certificate(
    tls_broker: PrivateMosquitto, pki: Pki
) -> None:
    assert mqtt_over_tls(tls_broker.tls_port, _client_context(pki, cert=True)) == CONNACK_OK
    # No client certificate: refused (TLS 1.3 reports it after the handshake, as an alert).
    assert mqtt_over_tls(tls_broker.tls_port, _client_context(pki, cert=False)) in (None, b"")
    # Without our CA the broker's certificate is not trusted.
    assert mqtt_over_tls(tls_broker.tls_port, ssl.create_default_context()) is None


async def test_the_daemon_routes_over_mqtts_and_serves_https(
    tmp_path: Path,
    names: Names,
    pki: Pki,
    tls_broker: PrivateMosquitto,
    start_daemon: Callable[..., Any],
) -> None:
    routing = write_routing(tmp_path / "routing.yaml", ("anna",), offer_timeout=30)
    http_port = test_utils.unused_port()
    await start_daemon(
        routing,
        mqtt_url=f"mqtts://{HOST}:{tls_broker.tls_port}",
        mqtt_tls_ca=str(pki.ca),
        mqtt_tls_cert=str(pki.client_cert),
        mqtt_tls_key=str(pki.client_key),
        http_addr=f"{HOST}:{http_port}",
        http_tls_cert=str(pki.server_cert),
        http_tls_key=str(pki.server_key),
    )
    # The daemon's traffic flows over TLS: a call published by a peer is offered to anna.
    async with aiomqtt.Client(HOST, tls_broker.peer_port) as peer:
        probe = MqttProbe(client=peer, prefix=names.topic_prefix)
        await peer.subscribe(f"{names.topic_prefix}/agents/+/offers", qos=1)
        await peer.subscribe(f"{names.topic_prefix}/events/#", qos=1)
        pump = asyncio.create_task(probe._pump())
        try:
            await probe.agent("anna", op="login")
            await probe.wait_for("events/agent.state", agent_id="anna", state="available")
            await probe.publish("in/phone/asterisk-ari", ari("StasisStart", "tls-1"))
            (offer,) = await probe.wait_for("agents/anna/offers", type="offer")
            assert offer["contact_id"] == "asterisk-ari:tls-1"
        finally:
            pump.cancel()
    # HTTPS, verified against the test CA; plain HTTP on that port gets nowhere.
    connector = aiohttp.TCPConnector(ssl=_client_context(pki, cert=False))
    async with (
        aiohttp.ClientSession(connector=connector) as https,
        https.get(f"https://{HOST}:{http_port}/readyz") as resp,
    ):
        assert resp.status == 200 and (await resp.json())["ready"] is True
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            async with plain.get(f"http://{HOST}:{http_port}/readyz") as resp:
                await resp.read()


async def test_a_resumed_backlog_over_tls_arrives_whole_and_in_order(
    names: Names, pki: Pki, tls_broker: PrivateMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """The ingress's read hold over ``mqtts://``: 800 messages wait in a persistent session
    (Receive Maximum 50, aiomqtt's queue bounded at 356); resuming it, Mosquitto sends far
    more than 50 at once. The consumer, acknowledging slowly, gets all 800 in order, aiomqtt
    discards none, and its queue never holds more than the hold lets in."""
    caplog.set_level(logging.WARNING)
    plain = small_window(names, 50)
    plain = msgspec.structs.replace(
        plain, mqtt=msgspec.structs.replace(plain.mqtt, url=tls_broker.url)
    )
    tls = msgspec.structs.replace(
        plain,
        mqtt=msgspec.structs.replace(
            plain.mqtt,
            url=f"mqtts://{HOST}:{tls_broker.tls_port}",
            tls_ca=str(pki.ca),
            tls_cert=str(pki.client_cert),
            tls_key=str(pki.client_key),
        ),
    )
    topic = f"{names.topic_prefix}/in/phone/tls-backlog"
    identifier = f"stw-{names.tag}-tls-backlog"
    # The backlog is published over plain TCP, to the same broker: only the consumer's side
    # is under test.
    got, most = await resumed_backlog(tls, plain, topic, identifier)
    assert got == list(range(800))
    assert most <= incoming_bound(tls.mqtt) // 2 + 1
    assert "Message queue is full" not in caplog.text


# ---- the read hold itself, over a TLS socket pair --------------------------------------------

PACKET = 100
PACKETS = 20


def tls_pair(pki: Pki) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(client, server) TLS sockets over a socket pair, handshake done; the client's is
    non-blocking, as paho's is once connected."""
    left, right = socket.socketpair()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server: list[ssl.SSLSocket] = []
    accept = threading.Thread(
        target=lambda: server.append(server_context.wrap_socket(right, server_side=True))
    )
    accept.start()
    client = _client_context(pki, cert=False).wrap_socket(left, server_hostname=HOST)
    accept.join(10)
    client.setblocking(False)
    return client, server[0]


async def one_record_of_packets(pki: Pki, hold: Callable[[list[bytes]], bool]) -> list[bytes]:
    """The server sends PACKETS packets in one TLS record (one ``sendall`` of 2,000 bytes);
    the client's reader callback runs once, as the loop would for that readable socket, with
    a stand-in for paho's ``loop_read`` that reads one packet a call. What the client got once
    it had them all (or had waited 5 s)."""
    loop = asyncio.get_running_loop()
    client, server = tls_pair(pki)
    got: list[bytes] = []
    whole = asyncio.Event()

    def loop_read() -> None:  # paho's: one packet (no QoS 2 in flight), or none yet
        try:
            got.append(reads.recv(PACKET))
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        if len(got) == PACKETS:
            whole.set()

    def failed(exc: BaseException) -> None:
        raise AssertionError(exc)

    reads = _HeldTlsReads(client, loop, loop_read, failed, lambda: hold(got))
    try:
        server.sendall(b"".join(b"%03d" % n + b"p" * (PACKET - 3) for n in range(PACKETS)))
        # (On a socket pair the record is in the client's buffer once sendall returned.)
        assert select.select([client], [], [], 5)[0]
        reads.readable()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(whole.wait(), 5)
    finally:
        loop.remove_reader(client.fileno())
        reads.close()
        server.close()
    return got


async def test_packets_decrypted_ahead_are_all_read_though_select_cannot_see_them(
    pki: Pki,
) -> None:
    """One readable event for a record of 20 packets: paho gets all 20 (the socket is not
    readable again, the SSL object holds them)."""
    got = await one_record_of_packets(pki, lambda got: False)
    assert [int(p[:3]) for p in got] == list(range(PACKETS))


async def test_a_hold_ending_reads_on_the_decrypted_bytes_the_ssl_object_holds(
    pki: Pki,
) -> None:
    """Held after 5 packets of a 20-packet record; once the consumer catches up (here: at
    once) the hold ends and paho reads the other 15 without the socket turning readable."""
    holds: list[int] = []

    def hold(got: list[bytes]) -> bool:
        if len(got) == 5 and not holds:
            holds.append(len(got))
            return True
        return False

    got = await one_record_of_packets(pki, hold)
    assert holds == [5]
    assert [int(p[:3]) for p in got] == list(range(PACKETS))
