"""Observability against a real Prometheus: promtool on deploy/prometheus, the scraped series,
and every Grafana dashboard query returning data."""

from __future__ import annotations

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
from nats.js import JetStreamContext

from helpers import wait_until
from oncelog.consumer.settings import ConsumerSettings
from oncelog.events import msg_id
from oncelog.local.embedded import PrometheusServer, free_port, prometheus_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# CI installs Prometheus (see .ci/run); elsewhere these tests need Debian's `prometheus` package.
needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="Prometheus is not installed (apt-get install prometheus)",
)


def promtool(*args: str) -> str:
    result = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_prometheus
def test_promtool_accepts_the_config_and_rules() -> None:
    """promtool validates the shipped scrape config and alert rules."""
    assert "SUCCESS" in promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert "SUCCESS: 6 rules found" in promtool(
        "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")
    )


@needs_prometheus
def test_every_alert_has_a_passing_rule_unit_test() -> None:
    """promtool's rule unit tests pass and cover each alert, firing and quiet."""
    promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yml"))
    alerts = set(re.findall(r"- alert: (\w+)", (DEPLOY / "prometheus" / "alerts.yml").read_text()))
    tested = set(
        re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts.test.yml").read_text())
    )
    assert alerts == tested


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "oncelog.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def test_dashboard_uses_the_provisioned_datasource() -> None:
    """Every panel reads the datasource the provisioning file defines, by uid."""
    datasource = (
        DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    ).read_text()
    uid = re.search(r"uid: (\S+)", datasource)
    assert uid is not None
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "oncelog.json").read_text())
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


@pytest.fixture
def services(
    settings: ConsumerSettings, js: JetStreamContext, tmp_path: Path
) -> Iterator[dict[str, int]]:
    """Run a consumer and the API as processes, with their metrics on free ports."""
    ports = {"metrics": free_port(), "api": free_port()}
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


@needs_prometheus
async def test_prometheus_scrapes_stored_duplicate_and_lag_series(
    settings: ConsumerSettings,
    js: JetStreamContext,
    services: dict[str, int],
    tmp_path: Path,
) -> None:
    """Events with duplicates and a poison message show up in Prometheus as the exact stored,
    duplicate (by layer) and dead-letter counts, with the lag back at zero; every dashboard
    query returns data."""
    api = f"http://127.0.0.1:{services['api']}"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        prometheus_config(
            {
                "oncelog-consumer": [f"127.0.0.1:{services['metrics']}"],
                "oncelog-api": [f"127.0.0.1:{services['api']}"],
            },
            interval="1s",
        )
    )
    with PrometheusServer(tmp_path / "prom", config) as prom:

        async def api_ready() -> bool:
            return http("GET", f"{api}/ready")[0] == 200

        await wait_until(api_ready, within=30)
        subject = f"{settings.subject_prefix}.obs.test"
        for i in range(30):
            await js.publish(
                subject,
                json.dumps({"event_id": f"e{i}"}).encode(),
                headers={"Nats-Msg-Id": msg_id("obs.test", f"e{i}")},
            )
        for i in range(10):
            # Copies without a Msg-Id get past the broker; the store drops them.
            await js.publish(subject, json.dumps({"event_id": f"e{i}"}).encode())
        await js.publish(subject, b"not json")
        batch = {
            "events": [
                {"topic": "obs.http", "event_id": f"h{i}", "payload": {"i": i}} for i in range(5)
            ]
        }
        assert http("POST", f"{api}/publish", batch)[0] == 202
        # The same body again: the broker recognises every Msg-Id and the gateway counts them.
        assert http("POST", f"{api}/publish", batch)[0] == 202
        for _ in range(3):
            assert http("GET", f"{api}/events?topic=obs.*")[0] == 200
            assert http("GET", f"{api}/stats")[0] == 200

        async def series_are_exact() -> bool:
            return (
                scalar(prom, "sum(oncelog_events_stored_total)") == 35
                and scalar(prom, 'sum(oncelog_duplicates_total{layer="store"})') == 10
                and scalar(prom, 'sum(oncelog_duplicates_total{layer="broker"})') == 5
                and scalar(prom, "sum(oncelog_dead_letters_total)") == 1
                and scalar(prom, "max(oncelog_consumer_pending_messages)") == 0
            )

        await wait_until(series_are_exact, within=60, interval=0.5)
        assert scalar(prom, 'sum(oncelog_dead_letters_total{reason="not_json"})') == 1
        assert scalar(prom, 'sum(oncelog_events_stored_total{topic="obs.test"})') == 30

        missing: list[str] = []

        async def every_panel_has_data() -> bool:
            missing.clear()
            for title, expr in dashboard_queries():
                concrete = expr.replace("$__rate_interval", "1m")
                if not query(prom, concrete):
                    missing.append(f"{title}: {concrete}")
            return not missing

        try:
            await wait_until(every_panel_has_data, within=30, interval=1.0)
        except AssertionError:
            pytest.fail(f"dashboard queries without data: {missing}")
