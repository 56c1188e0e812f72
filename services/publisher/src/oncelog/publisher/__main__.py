"""The publisher CLI: generate events, publish them at least once, print a summary."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import msgspec
from prometheus_client import CollectorRegistry, start_http_server

from oncelog.platform import broker, db, log
from oncelog.platform.settings import SettingsError, load, stack_environ
from oncelog.platform.shutdown import shutdown_event
from oncelog.publisher.connect import UnreachableError, connect
from oncelog.publisher.emit import Emitter, PublisherMetrics, Summary
from oncelog.publisher.generate import plan, topics_from
from oncelog.publisher.progress import Progress
from oncelog.publisher.settings import PublisherSettings
from oncelog.store import stats

_log = logging.getLogger("oncelog.publisher")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    p = argparse.ArgumentParser(
        prog="oncelog-publisher",
        description="Generate events and publish them to JetStream at least once, with Nats-Msg-Id.",
    )
    p.add_argument(
        "--count", type=int, default=10_000, help="messages to send, duplicates included"
    )
    p.add_argument(
        "--rate", type=float, default=0.0, help="messages per second (0: as fast as acks allow)"
    )
    p.add_argument("--topics", default="5", help="a number N of topics, or a comma-separated list")
    p.add_argument(
        "--dup-rate", type=_fraction, default=0.3, help="fraction of messages that repeat an event"
    )
    p.add_argument(
        "--replay-old",
        type=_fraction,
        default=0.5,
        help="fraction of duplicates replayed after the broker's duplicate window has passed",
    )
    p.add_argument("--source", default="publisher", help="the events' source field")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible events")
    p.add_argument(
        "--inflight", type=int, default=256, help="publishes awaiting their PubAck at once"
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for one PubAck")
    p.add_argument("--max-attempts", type=int, default=10, help="tries per event before giving up")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds to wait for NATS at the start before giving up (once connected, a broker "
        "restart is waited out)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address for --metrics-port (0.0.0.0 in containers)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--progress-every",
        type=float,
        default=5.0,
        help="seconds between progress lines when stderr is not a terminal (a terminal gets "
        "one line redrawn every second)",
    )
    return p.parse_args(argv)


async def run_session(settings: PublisherSettings, args: argparse.Namespace) -> Summary:
    """Generate and publish one plan of events, then record its broker-layer duplicates."""
    registry = CollectorRegistry()
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, args.metrics_host, registry)
    nc = await connect(settings, "oncelog-publisher", args.connect_timeout)
    try:
        js = nc.jetstream()
        info = await broker.ensure_stream(js, settings)
        window = info.config.duplicate_window or settings.duplicate_window_seconds
        emitter = Emitter(
            js,
            window_seconds=window,
            inflight=args.inflight,
            timeout=args.timeout,
            max_attempts=args.max_attempts,
            metrics=PublisherMetrics(registry),
            progress=None
            if args.quiet
            else Progress(sys.stderr, in_place=sys.stderr.isatty(), interval=args.progress_every),
            fast_wire=settings.oncelog_fast_wire,
        )
        events = plan(
            count=args.count,
            topics=topics_from(args.topics),
            dup_rate=args.dup_rate,
            replay_old=args.replay_old,
            source=args.source,
            seed=args.seed,
            subject_prefix=settings.subject_prefix,
        )
        summary = await emitter.run(events, args.count, args.rate, shutdown_event())
    finally:
        await nc.drain()
    if settings.record_broker_duplicates and summary.duplicates_by_topic:
        await _record(settings, summary)
    return summary


async def _record(settings: PublisherSettings, summary: Summary) -> None:
    try:
        pool = await db.create_pool(settings, "oncelog-publisher")
    except OSError as exc:
        _log.warning("could not record broker duplicates in PostgreSQL: %s", exc)
        return
    try:
        async with pool.acquire() as conn:
            await stats.add_broker_duplicates(conn, summary.duplicates_by_topic, stats.shard_for())
    finally:
        await pool.close()


def render(summary: Summary) -> str:
    """Return the summary as an aligned table."""
    rows: list[tuple[str, object]] = [
        ("sent", summary.sent),
        ("unique events", summary.unique),
        ("acked", summary.acked),
        ("broker duplicates", summary.broker_duplicates),
        ("replays past the window", summary.old_replays),
        ("retries", summary.retries),
        ("errors", summary.errors),
    ]
    if summary.unsent:
        rows.append(("unsent (stopped)", summary.unsent))
    rows.append(("seconds (wall)", summary.seconds))
    if summary.wait_seconds:
        rows.append(("seconds waiting window", summary.wait_seconds))
    rows.append(("events/s (publishing)", f"{summary.events_per_second:,.1f}"))
    return "\n".join(f"{name:<24}{value:>12}" for name, value in rows)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m oncelog.publisher`."""
    args = parse_args(argv)
    try:
        # The URLs `just up` gives its services, from the same NATS_PORT, PG_PORT or *_URL.
        settings = load(PublisherSettings, stack_environ())
    except SettingsError as exc:
        sys.exit(str(exc))
    log.setup(settings.log_level, "publisher")
    try:
        summary = asyncio.run(run_session(settings, args))
    except UnreachableError as exc:
        sys.exit(f"oncelog-publisher: {exc}")
    if args.json:
        sys.stdout.write(msgspec.json.encode(summary).decode() + "\n")
    else:
        sys.stdout.write(render(summary) + "\n")
    if summary.errors:
        sys.exit(1)
    # Stopped before every planned message but the held-back replays went out: the run did not
    # finish. Stopping during the wait for the duplicate window only skips those replays.
    if summary.unsent > summary.skipped_replays:
        sys.exit(130)


if __name__ == "__main__":
    main()
