"""deploy/nats/auth.conf on a real nats-server: each user may do its job and nothing more."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from helpers import wait_until
from oncelog.platform import broker
from oncelog.platform.embedded import NatsServer
from oncelog.platform.settings import BrokerSettings, load

USERS = ("provisioner", "publisher", "loadgen", "consumer", "api")
# A refused publish is dropped by the server, so a refused request ends in a timeout; short
# timeouts keep the many refusals below fast, and the error callback names the subject.
REFUSAL_TIMEOUT = 0.5


class Login:
    """A connection as one user, with the errors the server sent it."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors
        self.js: JetStreamContext = nc.jetstream(timeout=REFUSAL_TIMEOUT)

    async def refused(self, subject: str, action: Awaitable[Any] | None = None) -> None:
        """Assert that the server refuses this user's publish to `subject`."""
        if action is None:
            await self.nc.publish(subject, b"{}")
            await self.nc.flush()
        else:
            with pytest.raises(nats.errors.TimeoutError):
                await action

        async def reported() -> bool:
            # nats-py lower-cases the server's error text.
            wanted = f'permissions violation for publish to "{subject.lower()}"'
            return any(wanted in e.lower() for e in self.errors)

        await wait_until(reported, within=5)


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    """Return a fresh random password per user, in the form docs/deploy.md generates.

    That is 48 letters a-p; nats-server misreads some hex or base64 values (a leading "-", all
    digits) as numbers.
    """
    letters = str.maketrans("0123456789", "ghijklmnop")
    return {user: secrets.token_hex(24).translate(letters) for user in USERS}


@pytest.fixture(scope="module")
def secure_nats(
    tmp_path_factory: pytest.TempPathFactory, passwords: dict[str, str]
) -> Iterator[NatsServer]:
    """Run nats-server with the repository's deploy/nats/auth.conf."""
    config = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "auth.conf"
    with pytest.MonkeyPatch.context() as env:
        for user, password in passwords.items():
            env.setenv(f"ONCELOG_NATS_{user.upper()}_PASSWORD", password)
        server = NatsServer(tmp_path_factory.mktemp("secure") / "nats", config_file=config)
        server.start()
    yield server
    server.stop()


def settings_for(server: NatsServer, user: str, password: str) -> BrokerSettings:
    """Return broker settings as the services read them from the environment."""
    return load(
        BrokerSettings,
        {"NATS_URL": server.url, "NATS_USER": user, "NATS_PASSWORD": password},
        stream_max_bytes=64 * 1024**2,
        ack_wait_seconds=5.0,
    )


async def login(server: NatsServer, user: str, password: str) -> Login:
    """Connect as `user` with the options the services derive from their settings."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    options = broker.connect_options(settings_for(server, user, password))
    nc = await nats.connect(
        server.url, allow_reconnect=False, error_cb=on_error, connect_timeout=2, **options
    )
    return Login(nc, errors)


@pytest.fixture
async def as_user(
    secure_nats: NatsServer, passwords: dict[str, str]
) -> AsyncIterator[dict[str, Login]]:
    """Log in as every user, with EVENTS and its durable provisioned by the provisioner."""
    logins = {user: await login(secure_nats, user, passwords[user]) for user in USERS}
    settings = settings_for(secure_nats, "provisioner", passwords["provisioner"])
    provisioner = logins["provisioner"].nc.jetstream()
    await broker.ensure_stream(provisioner, settings)
    await broker.ensure_consumer(provisioner, settings)
    yield logins
    for entry in logins.values():
        await entry.nc.close()


async def test_anonymous_and_wrong_password_are_refused(secure_nats: NatsServer) -> None:
    """Without valid credentials the server refuses the connection."""
    # The protocol is spoken directly: nats-py leaks the socket of a refused connect.
    for credentials in ({}, {"user": "api", "pass": "wrong"}):
        reader, writer = await asyncio.open_connection(secure_nats.host, secure_nats.port)
        try:
            assert (await reader.readline()).startswith(b"INFO ")
            connect = json.dumps({"verbose": False, "pedantic": False, **credentials})
            writer.write(f"CONNECT {connect}\r\nPING\r\n".encode())
            await writer.drain()
            reply = await asyncio.wait_for(reader.readline(), 5)
            assert reply.startswith(b"-ERR 'Authorization Violation'"), reply
        finally:
            writer.close()
            await writer.wait_closed()


async def test_publisher_publishes_events_only(as_user: dict[str, Login]) -> None:
    """A publisher gets PubAcks on events.> and is refused everything else."""
    pub = as_user["publisher"]
    ack = await pub.js.publish("events.auth.prod", b'{"event_id":"p-1"}')
    assert ack.stream == "EVENTS"
    await pub.refused("audit.secret")
    await pub.refused("$JS.API.STREAM.DELETE.EVENTS", pub.js.delete_stream("EVENTS"))
    await pub.refused("$JS.API.STREAM.PURGE.EVENTS", pub.js.purge_stream("EVENTS"))
    await pub.refused("$JS.API.STREAM.INFO.EVENTS", pub.js.stream_info("EVENTS"))
    await pub.refused(
        "$JS.API.CONSUMER.MSG.NEXT.EVENTS.aggregator",
        pub.nc.request("$JS.API.CONSUMER.MSG.NEXT.EVENTS.aggregator", b"1", timeout=0.5),
    )


async def test_consumer_pulls_and_acks_its_durable_only(as_user: dict[str, Login]) -> None:
    """A consumer pulls and acks the durable's messages but cannot publish events or change JetStream."""
    await as_user["loadgen"].js.publish("events.orders.eu", b'{"event_id":"c-1"}')
    con = as_user["consumer"]
    sub = await con.js.pull_subscribe_bind("aggregator", stream="EVENTS")
    msgs = await sub.fetch(10, timeout=5)
    assert msgs
    for msg in msgs:
        await msg.ack_sync(timeout=5)
    info = await con.js.consumer_info("EVENTS", "aggregator")
    assert info.num_ack_pending == 0
    await con.refused("events.orders.eu", con.js.publish("events.orders.eu", b"{}"))
    await con.refused(
        "$JS.API.STREAM.CREATE.OTHER", con.js.add_stream(name="OTHER", subjects=["other.>"])
    )
    await con.refused(
        "$JS.API.CONSUMER.CREATE.EVENTS.spy",
        con.js.add_consumer("EVENTS", ConsumerConfig(name="spy", durable_name="spy")),
    )
    await con.refused("$JS.API.STREAM.PURGE.EVENTS", con.js.purge_stream("EVENTS"))
    await con.refused(
        "$JS.API.CONSUMER.DELETE.EVENTS.aggregator",
        con.js.delete_consumer("EVENTS", "aggregator"),
    )


async def test_api_publishes_and_reads_state_only(as_user: dict[str, Login]) -> None:
    """The API publishes events and reads stream and durable state, and cannot purge, delete or pull."""
    api = as_user["api"]
    assert (await api.js.publish("events.api.gw", b'{"event_id":"a-1"}')).stream == "EVENTS"
    assert (await api.js.stream_info("EVENTS")).config.name == "EVENTS"
    assert (await api.js.consumer_info("EVENTS", "aggregator")).name == "aggregator"
    await api.refused("$JS.API.STREAM.PURGE.EVENTS", api.js.purge_stream("EVENTS"))
    await api.refused("$JS.API.STREAM.DELETE.EVENTS", api.js.delete_stream("EVENTS"))
    await api.refused(
        "$JS.API.CONSUMER.MSG.NEXT.EVENTS.aggregator",
        api.nc.request("$JS.API.CONSUMER.MSG.NEXT.EVENTS.aggregator", b"1", timeout=0.5),
    )
    await api.refused("$JS.ACK.EVENTS.aggregator.1.1.1.1.0")


async def test_provisioner_cannot_destroy(as_user: dict[str, Login]) -> None:
    """The provisioner creates and updates but may not delete or purge the stream or the durable."""
    prov = as_user["provisioner"]
    await prov.refused("$JS.API.STREAM.DELETE.EVENTS", prov.js.delete_stream("EVENTS"))
    await prov.refused("$JS.API.STREAM.PURGE.EVENTS", prov.js.purge_stream("EVENTS"))
    await prov.refused(
        "$JS.API.CONSUMER.DELETE.EVENTS.aggregator",
        prov.js.delete_consumer("EVENTS", "aggregator"),
    )
    await prov.refused("events.x.y")


async def test_services_use_the_provisioned_stream_when_they_may_not_change_it(
    secure_nats: NatsServer, passwords: dict[str, str], as_user: dict[str, Login]
) -> None:
    """ensure_stream/ensure_consumer fall back to the existing objects when an update is refused."""
    settings = load(
        BrokerSettings,
        {},
        nats_url=secure_nats.url,
        stream_max_bytes=32 * 1024**2,  # differs from what was provisioned
        max_ack_pending=7,
    )
    for user in ("consumer", "api"):
        js = as_user[user].js
        info = await broker.ensure_stream(js, settings)
        assert info.config.max_bytes == 64 * 1024**2
    durable = await broker.ensure_consumer(as_user["consumer"].js, settings)
    assert durable.config.max_ack_pending != 7
    missing = load(BrokerSettings, {}, nats_url=secure_nats.url, stream="MISSING")
    with pytest.raises(nats.errors.TimeoutError):
        await broker.ensure_stream(as_user["api"].js, missing)


async def test_services_connect_through_broker_connect(
    secure_nats: NatsServer, passwords: dict[str, str], as_user: dict[str, Login]
) -> None:
    """broker.connect authenticates with the settings' credentials."""
    nc = await broker.connect(
        settings_for(secure_nats, "api", passwords["api"]), "oncelog-tests", connect_timeout=2
    )
    try:
        info = await nc.jetstream().stream_info("EVENTS")
        assert info.config.name == "EVENTS"
    finally:
        await nc.close()
