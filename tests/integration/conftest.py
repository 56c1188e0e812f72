"""Fixtures shared by the API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from helpers import api_client
from oncelog.consumer.settings import ConsumerSettings


@pytest.fixture
async def client(
    settings: ConsumerSettings, js: JetStreamContext
) -> AsyncIterator[AsyncTestClient[Any]]:
    """Return the API in-process on the test's stream and database, without a rate limit."""
    async with api_client(settings, rate_limit_per_second=0) as c:
        yield c
