"""Observability against real Prometheus 2.x and 3.x: promtool on deploy/prometheus, the scraped
series, and every alert expression and Grafana dashboard query returning data."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.js import JetStreamContext

from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import REJECTION_CODES, msg_id
from oncelog.local.embedded import PrometheusServer, free_port, prometheus_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "oncelog.json"
# Where deploy/prometheus/fetch-prometheus3.sh unpacks Prometheus 3 when PROMETHEUS3 is unset.
PROMETHEUS3_CACHE = ROOT / ".cache" / "prometheus3" / "usr" / "bin" / "prometheus"
HOW_TO_GET = {
    "2": "apt-get install prometheus",
    "3": "deploy/prometheus/fetch-prometheus3.sh, or PROMETHEUS3=<path of a 3.x binary>",
}


@functools.cache
def _major(binary: Path) -> str | None:
    """Return the major version a prometheus or promtool binary reports, or None."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return None
    found = re.match(r"\w+, version (\d+)\.", out)
    return found.group(1) if found else None


def find_prometheus(major: str) -> Path | None:
    """Return a Prometheus binary of this major version with promtool beside it, or None."""
    if major == "2":
        on_path = shutil.which("prometheus")
        binary = Path(on_path) if on_path else None
    else:
        binary = Path(os.environ.get("PROMETHEUS3") or PROMETHEUS3_CACHE)
    if binary is None or _major(binary) != major or _major(binary.parent / "promtool") != major:
        return None
    return binary


@pytest.fixture(params=["2", "3"], ids=["prometheus2", "prometheus3"])
def prometheus(request: pytest.FixtureRequest) -> Path:
    """Each Prometheus major version in turn; CI has both (see .ci/run), so there it is never
    skipped: a missing one fails the test."""
    major: str = request.param
    binary = find_prometheus(major)
    if binary is None:
        why = f"Prometheus {major}.x with promtool is not available ({HOW_TO_GET[major]})"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return binary


def promtool(prometheus: Path, *args: str) -> str:
    result = subprocess.run(
        [str(prometheus.parent / "promtool"), *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_accepts_the_config_and_rules(prometheus: Path) -> None:
    """promtool of both major versions validates the shipped scrape config and alert rules."""
    assert "SUCCESS" in promtool(
        prometheus, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")
    )
    assert "SUCCESS: 7 rules found" in promtool(prometheus, "check", "rules", str(ALERTS))


def test_every_alert_has_a_passing_rule_unit_test(prometheus: Path) -> None:
    """promtool's rule unit tests pass in both major versions and cover each alert."""
    promtool(prometheus, "test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yml"))
    alerts = set(re.findall(r"- alert: (\w+)", ALERTS.read_text()))
    tested = set(
        re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts.test.yml").read_text())
    )
    assert alerts == tested


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def panel_query(title: str, rate_interval: str) -> str:
    (expr,) = [expr for t, expr in dashboard_queries() if t == title]
    return expr.replace("$__rate_interval", rate_interval)


DEDUP_PANEL = "Duplicates dropped, by layer"


def test_dedup_panel_sums_every_service_by_layer(prometheus: Path, tmp_path: Path) -> None:
    """The dedup panel adds the consumers' store layer and the gateway's and the publisher's
    broker layer, and counts no publisher duplicate twice."""
    expr = panel_query(DEDUP_PANEL, "5m")
    consumer = 'oncelog_duplicates_total{job="oncelog-consumer", instance="c%d", layer="store"}'
    test: dict[str, Any] = {
        "name": "consumers, gateway and publisher",
        "interval": "1m",
        "input_series": [
            # Per minute: 60 and 120 store duplicates; 60 and 180 broker duplicates.
            {"series": consumer % 1, "values": "0+60x10"},
            {"series": consumer % 2, "values": "0+120x10"},
            {
                "series": 'oncelog_duplicates_total{job="oncelog-api", instance="api",'
                ' layer="broker"}',
                "values": "0+60x10",
            },
            {
                "series": 'oncelog_duplicates_total{job="oncelog-publisher", instance="p",'
                ' layer="broker"}',
                "values": "0+180x10",
            },
            # The publisher's own name for the same drops, which the panel must not add.
            {
                "series": 'oncelog_publisher_broker_duplicates_total{job="oncelog-publisher",'
                ' instance="p"}',
                "values": "0+180x10",
            },
        ],
        # Per second: 1 + 3 broker duplicates, 1 + 2 store duplicates.
        "promql_expr_test": [
            {
                "expr": expr,
                "eval_time": "10m",
                "exp_samples": [
                    {"labels": '{layer="broker"}', "value": 4},
                    {"labels": '{layer="store"}', "value": 3},
                ],
            }
        ],
    }
    spec = tmp_path / "dedup.test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [], "tests": [test]}))
    promtool(prometheus, "test", "rules", str(spec))


def test_dashboard_uses_the_provisioned_datasource() -> None:
    """Every panel reads the datasource the provisioning file defines, by uid."""
    datasource = (
        DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    ).read_text()
    uid = re.search(r"uid: (\S+)", datasource)
    assert uid is not None
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid.group(1)}
    assert len(dashboard_queries()) >= 10


def query(prom: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    url = f"{prom.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scalar(prom: PrometheusServer, expr: str) -> float | None:
    result = query(prom, expr)
    return float(result[0]["value"][1]) if result else None


def by_label(prom: PrometheusServer, expr: str, label: str) -> dict[str, float]:
    """Return the value of each series `expr` returns, keyed by one of its labels."""
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in query(prom, expr)}


# A comparison with a number (`> 0`, `== 0`, `> 0.8`): the threshold an alert applies to what
# it reads. Without it, the expression answers whenever the series it reads exist.
_THRESHOLD = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*-?[0-9][0-9.e+]*")
# A subquery's step ([10m:1m]); a run of seconds has no two samples a minute apart.
_SUBQUERY_STEP = re.compile(r"\[(\w+):\w+\]")


def alert_reads(expr: str, step: str) -> str:
    """Return an alert's expression without its thresholds, subqueries stepping at `step`."""
    return _SUBQUERY_STEP.sub(rf"[\1:{step}]", _THRESHOLD.sub("", expr))


def test_alert_reads_drops_only_thresholds() -> None:
    """Stripping keeps every selector and operator of an alert but its number comparisons."""
    assert alert_reads("max(a) > 10000\nand deriv(max(a)[10m:1m]) > 0", "1s") == (
        "max(a)\nand deriv(max(a)[10m:1s])"
    )
    assert alert_reads('up{job=~"x"} == 0', "1s") == 'up{job=~"x"}'
    assert alert_reads("max(a / b) > 0.8", "1s") == "max(a / b)"


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    return rules


@pytest.fixture
def services(
    settings: ConsumerSettings, js: JetStreamContext, tmp_path: Path
) -> Iterator[dict[str, int]]:
    """Run a consumer, the API and retention as processes, with their metrics on free ports."""
    ports = {"metrics": free_port(), "api": free_port(), "retention": free_port()}
    env = dict(os.environ) | {
        "NATS_URL": settings.nats_url,
        "DATABASE_URL": settings.database_url,
        "STREAM": settings.stream,
        "SUBJECT_PREFIX": settings.subject_prefix,
        "ALLOW_UNSAFE_POSTGRES": "true",
        "METRICS_PORT": str(ports["metrics"]),
        "API_PORT": str(ports["api"]),
        "LOG_LEVEL": "WARNING",
    }
    procs = [
        subprocess.Popen([sys.executable, "-m", module], env=env)
        for module in ("oncelog.consumer", "oncelog.api")
    ]
    # Retention runs at its start, so its last-run series exists for its alert.
    retention_env = env | {"METRICS_PORT": str(ports["retention"]), "RETENTION_DAYS": "30"}
    procs.append(subprocess.Popen([sys.executable, "-m", "oncelog.retention"], env=retention_env))
    try:
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None


# One message per dead-letter reason the NATS path can meet (the body, or the subject's topic).
POISON = {
    "not_json": ("obs.test", b"not json"),
    "empty": ("obs.test", b"   "),
    "invalid_event": ("obs.test", b'{"event_id": 5}'),
    "topic_mismatch": ("obs.test", b'{"event_id": "m", "topic": "obs.other"}'),
    "payload_not_object": ("obs.test", b'{"event_id": "p", "payload": [1]}'),
    "bad_timestamp": ("obs.test", b'{"event_id": "t", "timestamp": "9999-12-31T23:00:00-05:00"}'),
    "unstorable": ("obs.test", b'{"event_id": "u", "payload": {"a": "\\u0000"}}'),
    "bad_subject": ("obs.bad$topic", b'{"event_id": "s"}'),
}


async def test_every_alert_and_dashboard_query_has_data_after_every_kind_of_event(
    prometheus: Path,
    settings: ConsumerSettings,
    js: JetStreamContext,
    services: dict[str, int],
    tmp_path: Path,
) -> None:
    """A run with stored events, broker, store and conflicting duplicates, dead letters of
    several reasons and HTTP 2xx and 4xx shows up in Prometheus (2.x and 3.x) as exact counts;
    the first dead letter of each reason fires the alert; every alert expression without its
    threshold, and every dashboard query, returns data with the labels it names."""
    api = f"http://127.0.0.1:{services['api']}"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        prometheus_config(
            {
                "oncelog-consumer": [f"127.0.0.1:{services['metrics']}"],
                "oncelog-api": [f"127.0.0.1:{services['api']}"],
                "oncelog-retention": [f"127.0.0.1:{services['retention']}"],
            },
            interval="1s",
            rules=[ALERTS],
        )
    )
    with PrometheusServer(tmp_path / "prom", config, executable=prometheus) as prom:

        async def both_scraped() -> bool:
            # The API's /metrics must parse for Prometheus 3 too (one charset in its
            # Content-Type); the consumer must have been scraped with every reason at 0, so
            # that each first dead letter below is an increase from 0.
            return (
                http("GET", f"{api}/ready")[0] == 200
                and scalar(prom, 'sum(up{job=~"oncelog-consumer|oncelog-api"})') == 2
                and scalar(prom, "count(oncelog_dead_letters_total == 0)") == len(REJECTION_CODES)
            )

        await wait_until(both_scraped, within=30, interval=0.2)
        prefix = settings.subject_prefix
        for i in range(30):
            await js.publish(
                f"{prefix}.obs.test",
                json.dumps({"event_id": f"e{i}"}).encode(),
                headers={"Nats-Msg-Id": msg_id("obs.test", f"e{i}")},
            )

        async def originals_scraped() -> bool:
            # Copies come after their originals; by then the topic's duplicate series is at 0.
            stored = 'sum(oncelog_events_stored_total{topic="obs.test"})'
            dups = 'sum(oncelog_duplicates_total{layer="store", topic="obs.test"})'
            return scalar(prom, stored) == 30 and scalar(prom, dups) == 0

        await wait_until(originals_scraped, within=30, interval=0.2)
        for i in range(10):
            # Copies without a Msg-Id get past the broker; the store drops them.
            await js.publish(f"{prefix}.obs.test", json.dumps({"event_id": f"e{i}"}).encode())
        # A copy whose payload differs from the stored one: dropped, and counted as conflicting.
        await js.publish(f"{prefix}.obs.test", b'{"event_id": "e0", "payload": {"x": 1}}')
        for topic, body in POISON.values():
            await js.publish(f"{prefix}.{topic}", body)
        batch = {
            "events": [
                {"topic": "obs.http", "event_id": f"h{i}", "payload": {"i": i}} for i in range(5)
            ]
        }
        assert http("POST", f"{api}/publish", batch)[0] == 202
        # The same body again: the broker recognises every Msg-Id and the gateway counts them.
        assert http("POST", f"{api}/publish", batch)[0] == 202
        assert http("POST", f"{api}/publish", {"topic": "obs.http"})[0] == 422
        assert http("GET", f"{api}/no-such-route")[0] == 404
        for _ in range(3):
            assert http("GET", f"{api}/events?topic=obs.*")[0] == 200
            assert http("GET", f"{api}/stats")[0] == 200

        async def series_are_exact() -> bool:
            return (
                scalar(prom, "sum(oncelog_events_stored_total)") == 35
                and scalar(prom, 'sum(oncelog_duplicates_total{layer="store"})') == 11
                and scalar(prom, 'sum(oncelog_duplicates_total{layer="broker"})') == 5
                and scalar(prom, "sum(oncelog_conflicting_duplicates_total)") == 1
                and scalar(prom, "sum(oncelog_dead_letters_total)") == len(POISON)
                and scalar(prom, "max(oncelog_consumer_pending_messages)") == 0
            )

        await wait_until(series_are_exact, within=60, interval=0.5)
        assert by_label(prom, "oncelog_dead_letters_total > 0", "reason") == dict.fromkeys(
            POISON, 1.0
        )
        assert scalar(prom, 'sum(oncelog_events_stored_total{topic="obs.test"})') == 30

        async def every_reason_fires() -> bool:
            # increase() alone sees each reason's first dead letter: its series started at 0.
            seen = by_label(
                prom, "sum by (reason) (increase(oncelog_dead_letters_total[5m])) > 0", "reason"
            )
            firing = by_label(
                prom,
                'ALERTS{alertname="OncelogDeadLettersAppearing", alertstate="firing"}',
                "reason",
            )
            return set(seen) == set(firing) == set(POISON)

        await wait_until(every_reason_fires, within=15, interval=0.5)

        missing: list[str] = []

        async def every_expression_has_data() -> bool:
            missing.clear()
            for rule in alert_rules():
                expr = alert_reads(rule["expr"], "1s")
                named = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
                result = query(prom, expr)
                if not result or any(named - set(r["metric"]) for r in result):
                    missing.append(f"alert {rule['alert']}: {expr} (labels {sorted(named)})")
            for title, expr in dashboard_queries():
                concrete = expr.replace("$__rate_interval", "1m")
                if not query(prom, concrete):
                    missing.append(f"panel {title}: {concrete}")
            return not missing

        try:
            await wait_until(every_expression_has_data, within=30, interval=1.0)
        except AssertionError:
            pytest.fail(f"expressions without data: {missing}")
        # The panels that tell kinds apart show every kind the run produced.
        layers = by_label(prom, panel_query(DEDUP_PANEL, "1m"), "layer")
        assert set(layers) == {"broker", "store"}
        assert all(rate > 0 for rate in layers.values()), layers

        # A status first answered once has a rate only from its second scrape on.
        async def every_status_shows() -> bool:
            statuses = by_label(prom, panel_query("API requests by status", "1m"), "status")
            return {"200", "202", "404", "422"} <= set(statuses)

        await wait_until(every_status_shows, within=30, interval=0.5)
        assert set(POISON) <= set(by_label(prom, panel_query("Dead letters", "1m"), "reason"))
