"""What the NATS connection logs: a stop the service asked for is no warning, a lost server is."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from helpers import wait_until
from oncelog.local.embedded import NatsServer
from oncelog.platform import broker
from oncelog.platform.settings import BrokerSettings


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "oncelog.broker" and r.levelno >= logging.WARNING
    ]


async def test_closing_the_connection_is_not_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain or close the service asks for logs at INFO; losing the server is a WARNING."""
    caplog.set_level(logging.INFO, logger="oncelog.broker")
    with NatsServer(tmp_path / "nats") as server:
        settings = BrokerSettings(nats_url=server.url)
        for ending in ("drain", "close"):
            nc = await broker.connect(settings, "log-test")
            await (nc.drain() if ending == "drain" else nc.close())
        assert _warnings(caplog) == []
        assert any(r.getMessage() == "nats closed" for r in caplog.records)
        nc = await broker.connect(settings, "log-test")
        server.kill()

        async def warned() -> bool:
            return "nats disconnected" in _warnings(caplog)

        await wait_until(warned, within=10)
        await nc.close()
