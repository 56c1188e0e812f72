"""`just up-cluster`: a three-node NATS cluster with R3 streams, then the stack of `just up`.

The nodes use deploy/nats/cluster/node-{1,2,3}.conf (ONCELOG_CLUSTER_CONFIG names another
directory) with clients on 4222-4224, monitoring on 8222-8224 and routes on 6222-6224, and keep
their stores under ONCELOG_DATA_DIR/cluster/. PostgreSQL, the consumers and the API then start
as `just up` starts them, with STREAM_REPLICAS=3. Ctrl-C stops the services, then the nodes.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from oncelog.local import up
from oncelog.local.embedded import EmbeddedError, NatsServer, free_port

__all__ = ["NodePorts", "default_ports", "main", "start_cluster", "wait_for_quorum"]

_log = logging.getLogger("oncelog.cluster")
NODES = 3


@dataclass(frozen=True)
class NodePorts:
    """The three ports of one node."""

    client: int
    monitor: int
    route: int


def default_ports() -> list[NodePorts]:
    """Return the ports written in deploy/nats/cluster/node-*.conf."""
    return [NodePorts(4222 + i, 8222 + i, 6222 + i) for i in range(NODES)]


def free_ports() -> list[NodePorts]:
    """Return free ports for every node (tests run beside other servers)."""
    return [NodePorts(free_port(), free_port(), free_port()) for _ in range(NODES)]


def start_cluster(root: Path, config_dir: Path, ports: list[NodePorts]) -> list[NatsServer]:
    """Start one node per entry of `ports`, each with its node-<i>.conf, and return them.

    The ports are given on the command line, where they override the files, so tests can run
    the same configuration on free ports.
    """
    routes = ",".join(f"nats-route://127.0.0.1:{p.route}" for p in ports)
    nodes: list[NatsServer] = []
    try:
        for index, p in enumerate(ports, start=1):
            node = NatsServer(
                root / f"node-{index}",
                port=p.client,
                monitor_port=p.monitor,
                config_file=config_dir / f"node-{index}.conf",
                extra_args=("--cluster", f"nats://127.0.0.1:{p.route}", "--routes", routes),
            )
            nodes.append(node)
            node.start()
    except BaseException:
        for node in reversed(nodes):
            node.stop()
        raise
    return nodes


def _meta_leader(node: NatsServer, size: int) -> str:
    """Return the meta leader `node` knows of, once it sees a cluster of `size` servers."""
    url = f"http://{node.host}:{node.monitor_port}/jsz"
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return ""
    meta = body.get("meta_cluster") or {}
    if meta.get("cluster_size") != size:
        return ""
    return str(meta.get("leader") or "")


def wait_for_quorum(nodes: list[NatsServer], timeout: float = 30.0) -> str:
    """Wait until every node knows the same JetStream meta leader; return its name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leaders = {_meta_leader(node, len(nodes)) for node in nodes}
        if len(leaders) == 1 and "" not in leaders:
            return leaders.pop()
        time.sleep(0.1)
    raise EmbeddedError(f"the JetStream cluster elected no leader within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> None:
    """Run the cluster and the stack until interrupted."""
    up.setup_logging("cluster")
    data = Path(os.environ.get("ONCELOG_DATA_DIR", ".data")).resolve()
    config_dir = Path(os.environ.get("ONCELOG_CLUSTER_CONFIG", "deploy/nats/cluster")).resolve()
    nodes = start_cluster(data / "cluster", config_dir, default_ports())
    try:
        leader = wait_for_quorum(nodes)
        _log.info("nats cluster ready", extra={"meta_leader": leader, "nodes": len(nodes)})
        # The services connect to the first node and learn the others from the cluster.
        os.environ["NATS_URL"] = nodes[0].url
        os.environ.setdefault("STREAM_REPLICAS", str(NODES))
        up.main(argv)
    finally:
        for node in reversed(nodes):
            node.stop()


if __name__ == "__main__":
    main()
