"""deploy/nats/cluster/ runs a three-node JetStream cluster whose R3 stream survives a lost node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from oncelog.local.cluster import free_ports, start_cluster, wait_for_quorum
from oncelog.local.embedded import NatsServer
from oncelog.platform import broker
from oncelog.platform.settings import BrokerSettings, load

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "cluster"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Start the three nodes on free ports and wait for a JetStream leader."""
    started = start_cluster(tmp_path, CONFIG, free_ports())
    try:
        wait_for_quorum(started)
        yield started
    finally:
        for node in reversed(started):
            node.stop()


async def test_r3_stream_keeps_taking_events_with_a_node_down(nodes: list[NatsServer]) -> None:
    """An R3 stream has a leader and two replicas, and accepts publishes with one node stopped."""
    settings = load(BrokerSettings, {}, stream_replicas=3, stream_max_bytes=64 * 1024**2)
    # Connected to node 1, which is never the node stopped below, so the client's own
    # connection is not what the test disrupts.
    nc = await nats.connect(nodes[0].url)
    try:
        js = nc.jetstream(timeout=10)
        info = await broker.ensure_stream(js, settings)
        assert info.config.num_replicas == 3
        assert info.cluster is not None
        replicas = info.cluster.replicas or []
        assert len(replicas) == 2
        assert info.cluster.leader not in {r.name for r in replicas}
        await js.publish("events.cluster.test", b'{"event_id":"c-1"}')

        # Stop a replica other than node 1 (node-<i>.conf names its server oncelog-<i>): two
        # of three still form a majority, so the stream keeps its leader and takes publishes.
        numbers = [int(str(r.name).rpartition("-")[2]) for r in replicas]
        follower = next(n for n in numbers if n != 1)
        nodes[follower - 1].stop()
        ack = await js.publish("events.cluster.test", b'{"event_id":"c-2"}')
        assert ack.seq == 2
        state = await js.stream_info(settings.stream)
        assert state.state.messages == 2
    finally:
        await nc.close()
