"""Fault scenarios: consumer processes to kill, servers of their own, and the results table."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from faults.checker import RESULTS, Verdict
from faults.procs import Fleet
from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import NatsServer, PostgresServer, free_port


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Callable[[ConsumerSettings], Fleet]]:
    """Return a function that makes a Fleet for given settings; every replica stops at the end."""
    fleets: list[Fleet] = []

    def make(settings: ConsumerSettings) -> Fleet:
        fleet = Fleet(settings, tmp_path)
        fleets.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in fleets:
            fleet.close()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """Start a nats-server of this test alone, which it may kill."""
    server = NatsServer(tmp_path / "nats")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[PostgresServer]:
    """Start a PostgreSQL of this test alone (database `oncelog`), which it may kill."""
    server = PostgresServer(tmp_path / "pg", fsync=False)
    try:
        server.start()
        conn = await asyncpg.connect(server.url())
        try:
            await conn.execute("CREATE DATABASE oncelog")
        finally:
            await conn.close()
        yield server
    finally:
        server.stop()


def _table(results: list[Verdict]) -> list[str]:
    header = (
        "| fault | runs | attempted | acked | lost | duplicate rows | unexpected "
        "| recovery (s) | redelivered | invariants |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for v in results:
        recovery = "-" if v.recovery_seconds is None else f"{v.recovery_seconds:.2f}"
        state = "hold" if not v.violations else "; ".join(v.violations)[:200]
        if v.expected_failure:
            state += f" (expected to fail: {v.expected_failure})"
        lines.append(
            f"| {v.fault} | {v.runs} | {v.attempted} | {v.acked} | {v.lost} "
            f"| {v.duplicate_rows} | {v.unexpected} | {recovery} | {v.redelivered} | {state} |"
        )
    return lines


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print the fault table and write it as JSON and markdown to pytest's cache directory."""
    if not RESULTS:
        return
    lines = _table(RESULTS)
    terminalreporter.section("fault scenarios")
    for line in lines:
        terminalreporter.write_line(line)
    # No cache when pytest runs with `-p no:cacheprovider`: the table is printed only.
    if (cache := getattr(config, "cache", None)) is not None:
        folder = cache.mkdir("faults")
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        (folder / "results.md").write_text(f"Measured {stamp}.\n\n" + "\n".join(lines) + "\n")
        (folder / "results.json").write_text(
            json.dumps([msgspec.to_builtins(v) for v in RESULTS], indent=2)
        )
        terminalreporter.write_line(f"fault table written to {folder}/results.md")


class NatsCluster:
    """Three nats-server processes on loopback routed into one JetStream cluster."""

    def __init__(self, root: Path, size: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in cluster_ports)
        self.nodes: dict[str, NatsServer] = {}
        for i, port in enumerate(cluster_ports):
            args = ["--name", f"n{i}", "--cluster_name", "oncelog-faults"]
            args += ["--cluster", f"nats://127.0.0.1:{port}", "--routes", routes]
            self.nodes[f"n{i}"] = NatsServer(root / f"n{i}", extra_args=tuple(args))

    @property
    def url(self) -> str:
        """Return every node's client URL, comma-separated, as NATS_URL takes them."""
        return ",".join(node.url for node in self.nodes.values())

    def start(self) -> None:
        """Start every node."""
        for node in self.nodes.values():
            node.start()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes.values():
            node.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Start a 3-node nats-server cluster of this test alone."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
