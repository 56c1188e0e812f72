"""`just tail [topic]`: print the live tail of the running API, one JSON line per stored event.

It reads GET /events/stream and reconnects after a dropped connection with the last id it
printed, so a restart of the API (or a hop to another API process) neither skips nor repeats an
event. It finds the API as `just up` starts it (API_HOST, API_PORT), or at API_URL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from typing import IO

__all__ = ["main", "parse_sse", "stream_url"]

# Give up when the API has not answered at all for this long (seconds); once connected, a
# dropped stream is always retried.
FIRST_CONNECT_SECONDS = 10.0


def stream_url(environ: Mapping[str, str], topic: str | None, after: str | None) -> str:
    """Return the stream's URL for the API that the environment names."""
    base = environ.get("API_URL") or (
        f"http://{environ.get('API_HOST', '127.0.0.1')}:{environ.get('API_PORT', '8080')}"
    )
    query = {k: v for k, v in (("topic", topic), ("after", after)) if v is not None}
    return (
        base.rstrip("/") + "/events/stream" + ("?" + urllib.parse.urlencode(query) if query else "")
    )


def parse_sse(lines: Iterator[bytes]) -> Iterator[tuple[str | None, str]]:
    """Yield (id, data) for each SSE message of `lines` (comments and retry hints skipped)."""
    ident: str | None = None
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield ident, "\n".join(data)
            ident, data = None, []
        elif line.startswith("id:"):
            ident = line[3:].removeprefix(" ")
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _follow(url: str, key: str | None, last: str | None, out: IO[str]) -> str | None:
    """Print events until the connection ends; return the last id printed."""
    headers = {"Accept": "text/event-stream"}
    if key:
        headers["X-API-Key"] = key
    if last is not None:
        headers["Last-Event-ID"] = last
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - the user's own API URL
    with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310
        for ident, data in parse_sse(iter(resp.readline, b"")):
            out.write(data + "\n")
            out.flush()
            last = ident or last
    return last


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of `python -m oncelog.local.tail`."""
    parser = argparse.ArgumentParser(prog="just tail", description=__doc__.splitlines()[0])
    parser.add_argument("topic", nargs="?", help="a topic or NATS pattern (auth.>, *.prod)")
    parser.add_argument(
        "--after",
        help="start after this position (an SSE id; 0-0 is the beginning of the store)",
    )
    parser.add_argument("--api-key", help="X-API-Key (default: API_KEY)")
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    url = stream_url(env, args.topic, args.after)
    key = args.api_key or env.get("API_KEY")
    last: str | None = None
    connected_once = False
    started = time.monotonic()
    delay = 0.5
    try:
        while True:
            try:
                connected_once = True if last is not None else connected_once
                last = _follow(url, key, last, sys.stdout)
                connected_once = True
                delay = 0.5
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace").strip()
                if exc.code < 500:
                    sys.stderr.write(f"tail: {url} answered {exc.code}: {detail}\n")
                    return 2
            except OSError as exc:
                if not connected_once and time.monotonic() - started > FIRST_CONNECT_SECONDS:
                    sys.stderr.write(
                        f"tail: no API at {url} ({exc}); start the stack with `uv run just up`"
                        " or set API_URL\n"
                    )
                    return 1
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
