"""deploy/nats/auth.conf on a real nats-server: each user may do its job and nothing more."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, RetentionPolicy
from nats.js.errors import APIError

from helpers import wait_until
from oncelog.consumer.pull import Puller
from oncelog.local.embedded import NatsServer
from oncelog.platform import broker
from oncelog.platform.publish import Outbound, publish_many
from oncelog.platform.settings import BrokerSettings, load
from oncelog.platform.wire import Delivery, respond

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

    async def spy(self, subject: str) -> list[str]:
        """Subscribe to `subject`; the list returned fills with what arrives (subject, reply)."""
        seen: list[str] = []

        async def record(msg: Msg) -> None:
            seen.append(f"{msg.subject} reply {msg.reply}" if msg.reply else msg.subject)

        await self.nc.subscribe(subject, cb=record)
        return seen

    async def subscription_refused(self, subject: str) -> None:
        """Assert that the server reported this user's subscription to `subject` as refused."""

        async def reported() -> bool:
            wanted = f'permissions violation for subscription to "{subject.lower()}"'
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
    """Run nats-server with deploy/nats/compose.conf, which adds auth.conf to nats.conf."""
    config = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "compose.conf"
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
        {
            "NATS_URL": server.url,
            "NATS_USER": user,
            "NATS_PASSWORD": password,
            # compose.yaml sets each service's prefix the same way.
            "NATS_INBOX_PREFIX": f"_INBOX_{user}",
        },
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


async def do_every_job(as_user: dict[str, Login], tag: str) -> None:
    """Let each user do its job end to end, through the code paths the services use."""
    # The publisher: nats-py's request-reply and async-reply PubAck inboxes. Each user may
    # subscribe only to its own prefix, so every reply below arrives only if the inbox it was
    # sent to carries that prefix.
    pub = as_user["publisher"].js
    assert (await pub.publish("events.spy.pub", b'{"event_id":"%s-1"}' % tag.encode())).seq
    assert (
        await (await pub.publish_async("events.spy.pub", b'{"event_id":"%s-2"}' % tag.encode()))
    ).seq
    # The load generator and the API: the project's batched publish with its own ack inbox.
    for user in ("loadgen", "api"):
        batch = [Outbound(f"events.spy.{user}", b"{}", f"spy.{user}:{tag}-{n}") for n in range(3)]
        acks = await publish_many(as_user[user].js, batch, deadline=time.monotonic() + 10)
        assert len(acks) == 3
        assert (await as_user[user].js.stream_info("EVENTS")).config.name == "EVENTS"
    assert (await as_user["api"].js.consumer_info("EVENTS", "aggregator")).name == "aggregator"
    # The provisioner: a stream update and back, and the durable's check.
    prov = as_user["provisioner"]
    for max_bytes in (56 * 1024**2, 64 * 1024**2):
        settings = load(BrokerSettings, {}, stream_max_bytes=max_bytes, ack_wait_seconds=5.0)
        assert (await broker.ensure_stream(prov.js, settings)).config.max_bytes == max_bytes
    await broker.ensure_consumer(prov.js, settings)
    # The consumer: the service's puller and acks, for everything pending (exactly that many,
    # so no pull request outlives the test).
    con = as_user["consumer"]
    pending = int((await con.js.consumer_info("EVENTS", "aggregator")).num_pending)
    assert pending > 0
    delivered: list[Delivery] = []
    puller = Puller(
        con.nc,
        "EVENTS",
        "aggregator",
        delivered.append,
        batch=pending,
        window=pending,
        max_bytes=8 * 1024**2,
    )
    # The consumer may subscribe only to _INBOX_consumer.>: deliveries arrive only if the
    # puller's inbox carries the connection's prefix.
    await puller.start()
    try:
        await puller.top_up(0, 0)

        async def all_delivered() -> bool:
            return len(delivered) >= pending

        await wait_until(all_delivered, within=10)
        await respond(con.nc, delivered)
    finally:
        await puller.stop()

    async def all_acked() -> bool:
        return int((await con.js.consumer_info("EVENTS", "aggregator")).num_ack_pending) == 0

    await wait_until(all_acked, within=10)


async def test_no_user_reads_another_users_inbox(
    secure_nats: NatsServer, passwords: dict[str, str], as_user: dict[str, Login]
) -> None:
    """Every user is refused `>`, `_INBOX.>` and other users' inboxes, and receives nothing there."""
    spies = {user: await login(secure_nats, user, passwords[user]) for user in USERS}
    try:
        seen: dict[tuple[str, str], list[str]] = {}
        for user, spy in spies.items():
            others = [f"_INBOX_{other}.>" for other in USERS if other != user]
            for subject in [">", "_INBOX.>", *others]:
                seen[user, subject] = await spy.spy(subject)
            await spy.nc.flush()
        await do_every_job(as_user, secrets.token_hex(4))
        # A flush is a round trip: whatever the server had routed to a spy has arrived by now.
        for spy in spies.values():
            await spy.nc.flush()
        leaked = {key: subjects for key, subjects in seen.items() if subjects}
        assert not leaked, f"read through another user's inbox: {leaked}"
        for user, subject in seen:
            await spies[user].subscription_refused(subject)
    finally:
        for spy in spies.values():
            await spy.nc.close()


async def test_only_the_consumer_can_ack_the_durable(as_user: dict[str, Login]) -> None:
    """Nobody but the consumer user may ack, nak or terminate the durable's messages."""
    await as_user["loadgen"].js.publish("events.acks.forged", b'{"event_id":"f-1"}')
    con = as_user["consumer"]
    sub = await con.js.pull_subscribe_bind("aggregator", stream="EVENTS")
    # The consumer may subscribe only to _INBOX_consumer.>, so this fetch works only because
    # nats-py's pull inbox carries the connection's prefix.
    [msg] = await sub.fetch(1, timeout=5)
    assert msg.reply.startswith("$JS.ACK.EVENTS.aggregator.")
    held = (await con.js.consumer_info("EVENTS", "aggregator")).num_ack_pending
    for user in USERS:
        if user == "consumer":
            continue
        for body in (b"+ACK", b"-NAK", b"+TERM"):
            await as_user[user].nc.publish(msg.reply, body)
        await as_user[user].refused(msg.reply)
    # Each refusal above was reported after the server had dropped the publish.
    assert (await con.js.consumer_info("EVENTS", "aggregator")).num_ack_pending == held
    await msg.ack_sync(timeout=5)
    assert (await con.js.consumer_info("EVENTS", "aggregator")).num_ack_pending == held - 1


async def test_provisioner_changes_only_events_and_its_durable(as_user: dict[str, Login]) -> None:
    """The provisioner updates EVENTS and aggregator only, and only as far as the server allows."""
    prov = as_user["provisioner"]
    changed = load(
        BrokerSettings, {}, stream_max_bytes=48 * 1024**2, max_ack_pending=77, ack_wait_seconds=5.0
    )
    assert (await broker.ensure_stream(prov.js, changed)).config.max_bytes == 48 * 1024**2
    assert (await broker.ensure_consumer(prov.js, changed)).config.max_ack_pending == 77
    await prov.refused(
        "$JS.API.STREAM.CREATE.OTHER", prov.js.add_stream(name="OTHER", subjects=["other.>"])
    )
    await prov.refused(
        "$JS.API.STREAM.UPDATE.OTHER", prov.js.update_stream(name="OTHER", subjects=["other.>"])
    )
    await prov.refused(
        "$JS.API.CONSUMER.CREATE.EVENTS.spy",
        prov.js.add_consumer("EVENTS", ConsumerConfig(name="spy", durable_name="spy")),
    )
    # What the server refuses on update whatever the permissions, as docs/deploy.md counts on.
    limits = dataclasses.replace(broker.stream_config(changed), retention=RetentionPolicy.LIMITS)
    with pytest.raises(APIError, match="retention"):
        await prov.js.update_stream(limits)
    push = dataclasses.replace(
        broker.consumer_config(changed), deliver_subject="_INBOX_provisioner.x"
    )
    with pytest.raises(APIError, match="push"):
        await prov.js.add_consumer("EVENTS", push)
