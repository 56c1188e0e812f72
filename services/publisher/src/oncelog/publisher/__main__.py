"""The publisher CLI: generate events, publish them at least once, print a summary."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import msgspec
from prometheus_client import CollectorRegistry, start_http_server

from oncelog.platform import broker, db, log
from oncelog.platform.settings import SettingsError, load
from oncelog.publisher.emit import Emitter, PublisherMetrics, Summary
from oncelog.publisher.generate import plan, topics_from
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
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address for --metrics-port (0.0.0.0 in containers)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


async def run_session(settings: PublisherSettings, args: argparse.Namespace) -> Summary:
    """Generate and publish one plan of events, then record its broker-layer duplicates."""
    registry = CollectorRegistry()
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, args.metrics_host, registry)
    nc = await broker.connect(settings, "oncelog-publisher")
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
            progress=not args.quiet and sys.stderr.isatty(),
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
        summary = await emitter.run(events, args.count, args.rate)
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
    rows = [
        ("sent", summary.sent),
        ("unique events", summary.unique),
        ("acked", summary.acked),
        ("broker duplicates", summary.broker_duplicates),
        ("replays past the window", summary.old_replays),
        ("retries", summary.retries),
        ("errors", summary.errors),
        ("seconds", summary.seconds),
        ("events/s", summary.events_per_second),
    ]
    return "\n".join(f"{name:<24}{value:>12}" for name, value in rows)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m oncelog.publisher`."""
    args = parse_args(argv)
    try:
        settings = load(PublisherSettings)
    except SettingsError as exc:
        sys.exit(str(exc))
    log.setup(settings.log_level, "publisher")
    summary = asyncio.run(run_session(settings, args))
    if args.json:
        sys.stdout.write(msgspec.json.encode(summary).decode() + "\n")
    else:
        sys.stdout.write(render(summary) + "\n")
    if summary.errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
