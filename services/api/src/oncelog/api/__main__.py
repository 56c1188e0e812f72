"""Run the HTTP API: load settings, build the app, serve it with uvicorn."""

from __future__ import annotations

import asyncio
import math
import socket
import sys
from types import FrameType

import uvicorn

from oncelog.api.app import create_app
from oncelog.api.settings import ApiSettings
from oncelog.api.state import app_state
from oncelog.platform import log
from oncelog.platform.settings import SettingsError, load


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells open live-tail streams when it begins to stop.

    uvicorn waits for every connection to finish before the lifespan's shutdown runs, and a
    stream never finishes by itself: told at the signal, each ends at once, and its client
    resumes after its last id wherever it reconnects.
    """

    def __init__(self, config: uvicorn.Config, closing: asyncio.Event) -> None:
        super().__init__(config)
        self._closing = closing
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve, remembering the loop for the signal handler."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Stop as uvicorn does, and end the live-tail streams."""
        super().handle_exit(sig, frame)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._closing.set)


def main() -> None:
    """Entry point of `python -m oncelog.api`."""
    try:
        settings = load(ApiSettings)
    except SettingsError as exc:
        sys.exit(str(exc))
    log.setup(settings.log_level, "api")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        # The rate limit keys on the socket peer; a forwarded-for header must not replace it.
        proxy_headers=False,
        lifespan="on",
        # A request still running this long after a stop signal is cancelled.
        timeout_graceful_shutdown=math.ceil(settings.publish_timeout_seconds) + 5,
    )
    _Server(config, app_state(app).closing).run()


if __name__ == "__main__":
    main()
