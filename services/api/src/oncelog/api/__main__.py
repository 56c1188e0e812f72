"""Run the HTTP API: load settings, build the app, serve it with uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from oncelog.api.app import create_app
from oncelog.api.settings import ApiSettings
from oncelog.platform import log
from oncelog.platform.settings import SettingsError, load


def main() -> None:
    """Entry point of `python -m oncelog.api`."""
    try:
        settings = load(ApiSettings)
    except SettingsError as exc:
        sys.exit(str(exc))
    log.setup(settings.log_level, "api")
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        # The rate limit keys on the socket peer; a forwarded-for header must not replace it.
        proxy_headers=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
