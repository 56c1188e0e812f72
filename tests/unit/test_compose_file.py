"""compose.yaml read as a file: schema, pins, references, start order, credentials. These checks do not run the deployment."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from oncelog import migrate
from oncelog.api.settings import ApiSettings
from oncelog.local.embedded import nats_server_binary
from oncelog.platform.settings import load

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")
DEFAULTED_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")
LONG_RUNNING = ("nats", "postgres", "consumer", "retention", "api", "prometheus", "grafana")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """Return compose.yaml parsed (anchors and merge keys resolved)."""
    loaded = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the services of compose.yaml."""
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


@pytest.fixture(scope="module")
def deployed() -> dict[str, dict[str, Any]]:
    """Return the services as deployed when no optional variable is set (each `${X:-default}` is its default)."""
    text = DEFAULTED_VARIABLE.sub(r"\2", (ROOT / "compose.yaml").read_text())
    result: dict[str, dict[str, Any]] = yaml.safe_load(text)["services"]
    return result


def test_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    """compose.yaml satisfies the Compose Specification's JSON schema."""
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_contracted_services_exist(services: dict[str, dict[str, Any]]) -> None:
    """nats, postgres, migrate, consumer, retention, api, publisher, prometheus and grafana
    are defined."""
    assert set(services) == {
        "nats",
        "postgres",
        "migrate",
        "consumer",
        "retention",
        "api",
        "publisher",
        "prometheus",
        "grafana",
    }


def test_every_image_tag_is_pinned(deployed: dict[str, dict[str, Any]]) -> None:
    """Every image names a version tag, never `latest` and never an untagged image."""
    for name, service in deployed.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} uses latest"
        assert re.match(r"v?\d+\.\d+(\.\d+)?", tag), f"{name}: {image} is not a version"


def test_images_are_chosen_by_variables_whose_defaults_are_the_official_ones(
    services: dict[str, dict[str, Any]], deployed: dict[str, dict[str, Any]]
) -> None:
    """A variable may swap each image (stand-ins of `just test-compose`); unset, the official image or oncelog's own runs."""
    official = {
        "nats": ("NATS_IMAGE", "nats:"),
        "postgres": ("POSTGRES_IMAGE", "postgres:"),
        "prometheus": ("PROMETHEUS_IMAGE", "prom/prometheus:"),
        "grafana": ("GRAFANA_IMAGE", "grafana/grafana:"),
    }
    for name, (variable, repository) in official.items():
        assert services[name]["image"].startswith(f"${{{variable}:-{repository}"), name
    for name in ("migrate", "consumer", "api", "publisher"):
        assert services[name]["image"] == f"oncelog/{name}:${{ONCELOG_IMAGE_TAG:-0.1.0}}", name
        assert deployed[name]["image"] == f"oncelog/{name}:0.1.0", name


def test_published_ports_name_their_host_address(deployed: dict[str, dict[str, Any]]) -> None:
    """Every published port names the address it binds; Prometheus and Grafana bind loopback only."""
    for name, service in deployed.items():
        for port in service.get("ports", []):
            address, host_port, container_port = port.split(":")
            assert address, (name, port)
            assert host_port.isdigit(), (name, port)
            assert container_port.isdigit(), (name, port)
            if name in ("prometheus", "grafana"):
                assert address == "127.0.0.1", (name, port)


def test_references_resolve(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """Every depends_on target is a service, every named volume is declared, every bind source exists."""
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for target in service.get("depends_on", {}):
            assert target in services, f"{name} depends on unknown {target}"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        build = service.get("build")
        if build is not None:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
            package = ROOT / "services" / build["args"]["SERVICE"] / "pyproject.toml"
            assert package.is_file(), f"{name}: no service {build['args']['SERVICE']}"


def test_profiles(services: dict[str, dict[str, Any]]) -> None:
    """The publisher runs only in `demo`, Prometheus and Grafana only in `observability`."""
    profiles = {name: service.get("profiles", []) for name, service in services.items()}
    assert profiles.pop("publisher") == ["demo"]
    assert profiles.pop("prometheus") == ["observability"]
    assert profiles.pop("grafana") == ["observability"]
    assert all(not p for p in profiles.values()), profiles


def test_startup_order_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    """Migrations wait for healthy servers; the services wait for the migrations to succeed."""
    for server in ("nats", "postgres"):
        assert services[server]["healthcheck"]["test"]
    assert "8222" in " ".join(services["nats"]["healthcheck"]["test"])
    assert services["migrate"]["depends_on"] == {
        "nats": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    for name in ("consumer", "api", "publisher"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_shape_of_the_services(
    services: dict[str, dict[str, Any]], deployed: dict[str, dict[str, Any]]
) -> None:
    """Two consumer replicas, the API on 8080, a demo publisher with 30% duplicates, limits and restarts."""
    assert services["consumer"]["deploy"]["replicas"] == 2
    assert any(p.endswith(":8080:8080") for p in deployed["api"]["ports"])
    command = services["publisher"]["command"]
    assert command[command.index("--dup-rate") + 1] == "0.3"
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["deploy"]["resources"]["limits"]["memory"], name
    assert "ports" not in services["postgres"], "PostgreSQL must not be published"


def test_the_deployment_keeps_the_rate_limit_on(deployed: dict[str, dict[str, Any]]) -> None:
    """The API's rate limit is off for the one-machine stack but on, and valid, in compose."""
    env = deployed["api"]["environment"]
    settings = load(ApiSettings, {k: str(v) for k, v in env.items() if k.startswith("RATE_")})
    assert settings.rate_limit_per_second > 0
    assert settings.rate_limit_burst >= settings.rate_limit_per_second
    assert load(ApiSettings, {}).rate_limit_per_second == 0


def test_services_use_least_privileged_credentials(services: dict[str, dict[str, Any]]) -> None:
    """Each service logs in to NATS as its own user and to PostgreSQL as a login in its group."""
    auth = (ROOT / "deploy" / "nats" / "auth.conf").read_text()
    expected_nats = {
        "migrate": "provisioner",
        "consumer": "consumer",
        "api": "api",
        "publisher": "loadgen",
    }
    for name, user in expected_nats.items():
        assert services[name]["environment"]["NATS_USER"] == user
        assert f"user: {user}," in auth
    logins = {}
    command = services["migrate"]["command"]
    for index, word in enumerate(command):
        if word == "--login":
            login, group, _ = command[index + 1].split(":")
            assert group in migrate.GROUPS
            logins[login] = group
    expected_pg = {
        "consumer": "oncelog_ingest",
        "api": "oncelog_reader",
        "retention": "oncelog_retention",
    }
    for name, group in expected_pg.items():
        user = services[name]["environment"]["DATABASE_URL"].split("//")[1].split(":")[0]
        assert logins[user] == group, name
    assert "postgresql://postgres:" in services["migrate"]["environment"]["DATABASE_URL"]


def test_secrets_have_no_defaults_and_are_documented() -> None:
    """Every secret is a required variable (no default password) and docs/deploy.md names it."""
    text = (ROOT / "compose.yaml").read_text()
    required = set(REQUIRED_VARIABLE.findall(text))
    assert set(re.findall(r"\$\{([A-Z0-9_]*PASSWORD[A-Z0-9_]*)", text)) <= required
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for variable in sorted(required):
        assert variable in docs, f"{variable} is not documented in docs/deploy.md"


def test_nats_config_of_compose_is_valid(tmp_path: Path) -> None:
    """nats-server accepts deploy/nats/compose.conf (nats.conf plus auth.conf) with the passwords set."""
    config = ROOT / "deploy" / "nats" / "compose.conf"
    variables = set(
        re.findall(r"\$(ONCELOG_NATS_[A-Z_]+)", (config.parent / "auth.conf").read_text())
    )
    env = os.environ | dict.fromkeys(variables, "x")
    result = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
