"""compose.yaml run for real: start order, least privilege, durability and observability.

The tests share one deployment and run in file order, each building on what the ones before left:
the migrations, the demo publisher (which runs for about 200 s meanwhile), NATS users and API
keys, the gateway, Prometheus, the replicas, a crash, the publisher's result, the consumer user,
a restart of the whole deployment. Every request goes to a port published on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import pytest
import yaml
from nats.aio.client import Client

from compose.deployment import PROFILES, ROOT, SERVICES, USERS, Stack
from helpers import wait_until
from integration import test_nats_security as matrix
from oncelog.platform import broker
from oncelog.platform.settings import BrokerSettings, load

MIGRATIONS = sorted(
    p.name for p in (ROOT / "libs/store/src/oncelog/store/migrations").glob("*.sql")
)
DEMO_TOPICS = re.compile(r"load\.t\d+")


def read_headers(stack: Stack) -> dict[str, str]:
    """Return the header of a read key."""
    return {"X-API-Key": stack.variables["ONCELOG_API_KEYS_READ"]}


def publish_headers(stack: Stack) -> dict[str, str]:
    """Return the header of a publish key."""
    return {"X-API-Key": stack.variables["ONCELOG_API_KEYS_PUBLISH"]}


async def stats(api: httpx.AsyncClient, stack: Stack) -> dict[str, Any]:
    """Return GET /stats."""
    response = await api.get("/stats", headers=read_headers(stack))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def queue(api: httpx.AsyncClient, stack: Stack) -> dict[str, Any]:
    """Return GET /queue/stats."""
    response = await api.get("/queue/stats", headers=read_headers(stack))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def drained(api: httpx.AsyncClient, stack: Stack) -> bool:
    """Return whether the durable has nothing pending and nothing unacknowledged."""
    consumer = (await queue(api, stack))["consumer"]
    return bool(consumer["pending"] == 0 and consumer["ack_pending"] == 0)


async def rows(stack: Stack, topic: str | None = None) -> int:
    """Count the stored events (of one topic) in PostgreSQL itself."""
    where = f" WHERE topic = '{topic}'" if topic else ""
    [[count]] = await stack.psql(f"SELECT count(*) FROM events{where}")
    return int(count)


def metric(text: str, name: str) -> float:
    """Return the sum of a metric's samples (every label set) in Prometheus's text format."""
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith((f"{name} ", f"{name}{{"))
    )


def migrate_summaries(logs: str) -> list[list[str]]:
    """Return the migrations each run of migrate applied, one list per run, from its JSON logs."""
    runs = []
    for line in logs.splitlines():
        if line.startswith("{") and '"schema is current"' in line:
            runs.append(json.loads(line)["applied"])
    return runs


async def test_migrate_applies_each_migration_once_and_is_idempotent(stack: Stack) -> None:
    """migrate exits 0 after applying every migration once; run again, it exits 0 and applies nothing."""
    [container] = await stack.containers("migrate")
    assert container["State"] == "exited"
    assert container["ExitCode"] == 0
    assert migrate_summaries(await stack.logs("migrate")) == [MIGRATIONS]
    before = await stack.psql("SELECT version, name, applied_at FROM schema_migrations ORDER BY 1")
    assert [name for _, name, _ in before] == MIGRATIONS
    again = await stack.compose("run", "--rm", "--no-deps", "-T", "migrate")
    assert migrate_summaries(again.out + again.err) == [[]]
    assert "applied migration" not in again.out + again.err
    assert (
        await stack.psql("SELECT version, name, applied_at FROM schema_migrations ORDER BY 1")
        == before
    )


async def test_the_demo_publisher_starts(stack: Stack) -> None:
    """`--profile demo up -d publisher` starts the load generator next to the running services."""
    await stack.compose(
        "--profile", "demo", "up", "--detach", "--no-build", "--pull", "never", "publisher"
    )
    [container] = await stack.containers("publisher")
    assert container["State"] == "running", container


async def login(stack: Stack, user: str) -> matrix.Login:
    """Connect to the published NATS port as one of auth.conf's users, as the services do."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    url = f"nats://{stack.url('NATS_HOST_PORT')}"
    settings = load(
        BrokerSettings,
        {
            "NATS_URL": url,
            "NATS_USER": user,
            "NATS_PASSWORD": stack.variables[f"ONCELOG_NATS_{user.upper()}_PASSWORD"],
            "NATS_INBOX_PREFIX": f"_INBOX_{user}",
        },
    )
    nc: Client = await nats.connect(
        url,
        allow_reconnect=False,
        error_cb=on_error,
        connect_timeout=5,
        **broker.connect_options(settings),
    )
    return matrix.Login(nc, errors)


@pytest.fixture
async def as_user(stack: Stack) -> AsyncIterator[dict[str, matrix.Login]]:
    """Log in as every user of the deployment's NATS."""
    logins = {user: await login(stack, user) for user in USERS}
    yield logins
    for entry in logins.values():
        await entry.nc.close()


async def test_nats_refuses_anonymous_and_wrong_passwords(stack: Stack) -> None:
    """The deployment's NATS refuses a connection without valid credentials."""
    host, port = stack.url("NATS_HOST_PORT").split(":")
    for credentials in ({}, {"user": "api", "pass": "wrong"}):
        reader, writer = await asyncio.open_connection(host, int(port))
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


async def test_each_nats_user_does_its_job_only(as_user: dict[str, matrix.Login]) -> None:
    """Publisher, API and provisioner may do their jobs only, and nobody reads another's inbox (the matrix of test_nats_security)."""
    await matrix.test_publisher_publishes_events_only(as_user)
    await matrix.test_api_publishes_and_reads_state_only(as_user)
    await matrix.test_provisioner_cannot_destroy(as_user)
    for user, entry in as_user.items():
        others = [f"_INBOX_{other}.>" for other in USERS if other != user]
        for subject in [">", "_INBOX.>", *others]:
            await entry.spy(subject)
            await entry.subscription_refused(subject)


async def test_the_api_answers_only_with_its_keys(stack: Stack, api: httpx.AsyncClient) -> None:
    """Health, readiness and metrics are open; every read needs a read key, /publish a publish key."""
    for path in ("/health", "/ready", "/metrics"):
        assert (await api.get(path)).status_code == 200, path
    wrong = {"X-API-Key": "not-a-key"}
    for path in (
        "/stats",
        "/events?topic=compose.keys",
        "/topics",
        "/queue/stats",
        "/dead-letters",
    ):
        for headers in ({}, wrong, publish_headers(stack)):
            assert (await api.get(path, headers=headers)).status_code == 401, (path, headers)
        assert (await api.get(path, headers=read_headers(stack))).status_code == 200, path
    event = {"topic": "compose.keys", "event_id": "k-1", "source": "compose-test"}
    for headers in ({}, wrong, read_headers(stack)):
        assert (await api.post("/publish", json=event, headers=headers)).status_code == 401
    assert (
        await api.post("/publish", json=event, headers=publish_headers(stack))
    ).status_code == 202


async def test_the_gateway_reaches_postgres(stack: Stack, api: httpx.AsyncClient) -> None:
    """Events posted to /publish are stored once each; the resent ones count as broker duplicates."""
    topic = f"compose.gateway.{uuid.uuid4().hex[:8]}"
    ids = [f"g-{n}" for n in range(200)]
    events = [{"topic": topic, "event_id": i, "payload": {"n": n}} for n, i in enumerate(ids)]
    first = await api.post("/publish", json=events, headers=publish_headers(stack))
    assert first.status_code == 202, first.text
    assert first.json()["accepted"] == 200
    again = await api.post("/publish", json={"events": events[:50]}, headers=publish_headers(stack))
    assert again.status_code == 202, again.text
    assert again.json()["duplicates"] == 50

    async def stored() -> dict[str, Any] | None:
        counts: dict[str, Any] | None = (await stats(api, stack))["per_topic"].get(topic)
        return counts if counts and counts["unique_processed"] == 200 else None

    counts = await wait_until(stored, within=60)
    assert counts["received"] == 250
    assert counts["duplicates_by_layer"] == {"broker": 50, "store": 0}
    assert await rows(stack, topic) == 200
    page = await api.get(
        "/events", params={"topic": topic, "limit": 1000}, headers=read_headers(stack)
    )
    assert sorted(e["event_id"] for e in page.json()) == sorted(ids)


async def test_prometheus_scrapes_every_target_and_loads_every_rule(
    stack: Stack, prometheus: httpx.AsyncClient
) -> None:
    """Every target (both consumer replicas, the API, retention, the publisher, itself) is up;
    every alert rule is loaded and evaluated."""
    seen: list[tuple[str, str, str]] = []

    async def targets_up() -> list[dict[str, Any]] | None:
        active: list[dict[str, Any]] = (await prometheus.get("/api/v1/targets")).json()["data"][
            "activeTargets"
        ]
        seen[:] = sorted((t["labels"]["job"], t["health"], t.get("lastError", "")) for t in active)
        jobs = sorted(t["labels"]["job"] for t in active)
        expected = [
            "oncelog-api",
            "oncelog-consumer",
            "oncelog-consumer",
            "oncelog-publisher",
            "oncelog-retention",
            "prometheus",
        ]
        if jobs == expected and all(t["health"] == "up" for t in active):
            return active
        return None

    try:
        active = await wait_until(targets_up, within=90, interval=1)
    except AssertionError:
        pytest.fail(f"targets (job, health, last error): {seen}")
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    expected = sorted(rule["alert"] for group in alerts["groups"] for rule in group["rules"])

    async def rules_evaluated() -> bool:
        groups = (await prometheus.get("/api/v1/rules")).json()["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        names = sorted(rule["name"] for rule in loaded)
        return names == expected and all(rule["health"] == "ok" for rule in loaded)

    await wait_until(rules_evaluated, within=60, interval=1)
    await stack.report(
        f"Prometheus: {len(active)} targets up "
        f"({', '.join(sorted(t['scrapeUrl'] for t in active))}), {len(expected)} rules evaluated"
    )


async def test_two_consumer_replicas_share_the_durable(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    """Both consumer replicas store events, pulled from the one durable the stream has."""
    replicas = [c for c in await stack.containers("consumer") if c["State"] == "running"]
    assert len(replicas) == 2, replicas

    async def both_store() -> bool:
        for replica in replicas:
            text = await stack.metrics(replica["ID"], 9464)
            if metric(text, "oncelog_events_stored_total") <= 0:
                return False
        return True

    await wait_until(both_store, within=90, interval=1)
    state = await queue(api, stack)
    assert state["stream"]["consumer_count"] == 1
    assert state["consumer"]["name"] == "aggregator"


async def test_a_consumer_killed_with_sigkill_loses_nothing(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    """SIGKILL of a consumer replica while events arrive loses none; docker restarts it."""
    topic = f"compose.kill.{uuid.uuid4().hex[:8]}"
    accepted: set[str] = set()
    killed = asyncio.Event()

    async def publish() -> None:
        # Batches of 100 new events plus 10 of the batch before, until 20 batches after the kill.
        previous: list[dict[str, Any]] = []
        after_kill = 0
        deadline = time.monotonic() + 120
        for n in itertools.count():
            after_kill += killed.is_set()
            if after_kill > 20 or time.monotonic() > deadline:
                break
            batch = [{"topic": topic, "event_id": f"k-{n}-{j}"} for j in range(100)]
            response = await api.post(
                "/publish", json=batch + previous[:10], headers=publish_headers(stack)
            )
            assert response.status_code == 202, response.text
            accepted.update(e["event_id"] for e in batch)
            previous = batch
        assert killed.is_set(), "the kill did not happen while publishing"

    publishing = asyncio.create_task(publish())
    try:
        await wait_until(lambda: topic_stored(api, stack, topic, at_least=500), within=60)
        redelivered = (await stats(api, stack))["redelivered"]
        victim = (await stack.containers("consumer"))[0]["ID"]
        before = await stack.inspect(victim)

        async def holding() -> float:
            # Messages delivered to the victim and not yet acked: what a crash could lose.
            return metric(await stack.metrics(victim, 9464), "oncelog_consumer_held_bytes")

        held = await wait_until(holding, within=30, interval=0.1)
        # From outside the engine, as a crash would: docker's own `kill` counts as a manual
        # stop, after which the restart policy does not apply.
        os.kill(before["State"]["Pid"], signal.SIGKILL)
        killed.set()

        async def restarted() -> bool:
            now = await stack.inspect(victim)
            return bool(now["RestartCount"] > before["RestartCount"] and now["State"]["Running"])

        await wait_until(restarted, within=60, interval=0.5)
        await publishing
    finally:
        publishing.cancel()

    async def all_stored() -> dict[str, Any] | None:
        counts: dict[str, Any] | None = (await stats(api, stack))["per_topic"].get(topic)
        return counts if counts and counts["unique_processed"] == len(accepted) else None

    counts = await wait_until(all_stored, within=120, interval=0.5)
    assert await rows(stack, topic) == len(accepted)
    assert counts["received"] == counts["unique_processed"] + counts["duplicate_dropped"]
    redelivered = (await stats(api, stack))["redelivered"] - redelivered
    await stack.report(
        f"SIGKILL of a consumer holding {held:g} bytes: {len(accepted)} unique events accepted, "
        f"as many rows; {redelivered} messages redelivered"
    )


async def topic_stored(api: httpx.AsyncClient, stack: Stack, topic: str, at_least: int) -> bool:
    """Return whether at least `at_least` events of `topic` are stored."""
    counts = (await stats(api, stack))["per_topic"].get(topic)
    return bool(counts and counts["unique_processed"] >= at_least)


def publisher_summary(logs: str) -> dict[str, float]:
    """Return the demo publisher's closing table (sent, unique events, ...) as numbers."""
    summary = {}
    for line in logs.splitlines():
        if match := re.fullmatch(r"([a-z/ ]+?)\s{2,}(\d+(?:\.\d+)?)", line.strip()):
            summary[match[1]] = float(match[2])
    return summary


# The demo sends 100,000 messages at 500/s and replays half its duplicates after the broker's
# two-minute window: about five minutes from its start.
@pytest.mark.timeout(600)
async def test_the_demo_publisher_stores_every_event_once(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    """The publisher exits 0; its unique events are stored once each, its broker duplicates recorded in PostgreSQL."""

    async def exited() -> dict[str, Any] | None:
        [container] = await stack.containers("publisher")
        return container if container["State"] == "exited" else None

    container = await wait_until(exited, within=540, interval=2)
    logs = await stack.logs("publisher")
    assert container["ExitCode"] == 0, logs
    summary = publisher_summary(logs)
    assert summary["errors"] == 0, logs
    assert summary["sent"] == 100_000, logs

    async def all_stored() -> dict[str, int] | None:
        per_topic = (await stats(api, stack))["per_topic"]
        demo = [counts for topic, counts in per_topic.items() if DEMO_TOPICS.fullmatch(topic)]
        total = {
            "unique": sum(c["unique_processed"] for c in demo),
            "received": sum(c["received"] for c in demo),
            "broker": sum(c["duplicates_by_layer"]["broker"] for c in demo),
            "store": sum(c["duplicates_by_layer"]["store"] for c in demo),
        }
        return total if total["unique"] == summary["unique events"] else None

    total = await wait_until(all_stored, within=120, interval=1)
    # Broker-layer duplicates are known only to the publisher, which wrote them to PostgreSQL.
    assert total["broker"] == summary["broker duplicates"]
    assert total["received"] == total["unique"] + total["broker"] + total["store"]
    [[demo_rows]] = await stack.psql("SELECT count(*) FROM events WHERE topic LIKE 'load.t%'")
    assert int(demo_rows) == summary["unique events"]
    await stack.report(
        "demo publisher: "
        + ", ".join(f"{name} {value:g}" for name, value in summary.items())
        + f"; stored {total['unique']}, store-layer duplicates {total['store']}"
    )


async def test_the_dashboards_queries_answer_on_the_deployed_prometheus(
    stack: Stack, prometheus: httpx.AsyncClient
) -> None:
    """Grafana has no stand-in: its provisioned datasource answers inside the network, and every dashboard query runs there with data."""
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    [datasource] = source["datasources"]
    [api_container] = await stack.containers("api")
    # The API's image has Python, and the API sits on the network Grafana would be on.
    script = (
        f"import urllib.request; urllib.request.urlopen('{datasource['url']}/-/ready', timeout=5)"
    )
    await stack.docker_run("exec", api_container["ID"], "python", "-c", script)
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/oncelog.json").read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            # Grafana's $__rate_interval is four scrape intervals here (15 s each).
            expr = target["expr"].replace("$__rate_interval", "1m")
            body = (await prometheus.get("/api/v1/query", params={"query": expr})).json()
            assert body["status"] == "success", (panel["title"], expr, body)
            if not body["data"]["result"]:
                empty.append(panel["title"])
    # No dead letter was made, and a counter with labels has no series before its first use.
    assert set(empty) <= {"Dead letters"}, empty


async def test_only_the_consumer_user_pulls_and_acks(
    stack: Stack, api: httpx.AsyncClient, as_user: dict[str, matrix.Login]
) -> None:
    """Only `consumer` pulls and acks the durable, and it cannot publish or change JetStream (the matrix of test_nats_security)."""
    # Pulling as `consumer` takes messages from the replicas, so they stop meanwhile (and the demo
    # publisher is done): what this test pulls is its own (orders.eu, acks.forged), never stored.
    await wait_until(lambda: drained(api, stack), within=60)
    await stack.compose("stop", "consumer", limit=120)
    try:
        await matrix.test_consumer_pulls_and_acks_its_durable_only(as_user)
        await matrix.test_only_the_consumer_can_ack_the_durable(as_user)
    finally:
        await stack.compose("start", "consumer")


async def test_down_and_up_keeps_every_event(stack: Stack, api: httpx.AsyncClient) -> None:
    """`docker compose down` then `up` finds every event, every count and the stream's sequence again."""
    await wait_until(lambda: drained(api, stack), within=60)
    before = await stats(api, stack)
    stored = await rows(stack)
    last_seq = (await queue(api, stack))["stream"]["last_seq"]
    await stack.compose(*PROFILES, "down", "--timeout", "60", limit=300)
    assert not [c for s in SERVICES for c in await stack.containers(s)]
    await stack.up(*SERVICES)

    async def ready() -> bool:
        try:
            return (await api.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_until(ready, within=120, interval=0.5)
    after = await stats(api, stack)
    for key in ("received", "unique_processed", "duplicate_dropped", "dead_lettered", "per_topic"):
        assert after[key] == before[key], key
    assert await rows(stack) == stored
    assert (await queue(api, stack))["stream"]["last_seq"] == last_seq
    # The migrations ran a third time, on the kept volume, and applied nothing.
    assert migrate_summaries(await stack.logs("migrate")) == [[]]


async def test_statistics_match_the_stored_rows(stack: Stack, api: httpx.AsyncClient) -> None:
    """After everything above, /stats agrees with the events table and with itself, per topic too."""
    await wait_until(lambda: drained(api, stack), within=60)
    totals = await stats(api, stack)
    assert totals["unique_processed"] == await rows(stack)
    assert totals["received"] == (
        totals["unique_processed"] + totals["duplicate_dropped"] + totals["dead_lettered"]
    )
    for topic, counts in totals["per_topic"].items():
        assert counts["received"] == (
            counts["unique_processed"] + counts["duplicate_dropped"] + counts["dead_lettered"]
        ), topic
