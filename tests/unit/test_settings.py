"""Settings come from the environment, typed, with errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from oncelog.api.settings import ApiSettings
from oncelog.consumer.settings import ConsumerSettings
from oncelog.local.embedded import NatsServer, PostgresServer
from oncelog.platform.settings import (
    EMBEDDED_DATABASE,
    BrokerSettings,
    CommonSettings,
    SettingsError,
    embedded_port,
    load,
    stack_environ,
)
from oncelog.publisher.settings import PublisherSettings


def test_defaults_match_the_contract() -> None:
    """With an empty environment the documented defaults apply."""
    s = load(ConsumerSettings, {})
    assert s.nats_url == "nats://127.0.0.1:4222"
    assert (s.stream, s.subject_prefix, s.durable) == ("EVENTS", "events", "aggregator")
    assert s.metrics_port == 9464


def test_values_are_converted_from_strings() -> None:
    """Numbers and booleans are read from their string form."""
    s = load(
        ConsumerSettings,
        {"BATCH_SIZE": "250", "ALLOW_UNSAFE_POSTGRES": "true", "ACK_WAIT_SECONDS": "2.5"},
    )
    assert (s.batch_size, s.allow_unsafe_postgres, s.ack_wait_seconds) == (250, True, 2.5)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BATCH_SIZE": "lots"}, "BATCH_SIZE"),
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    """A value that cannot be used raises an error naming the environment variable."""
    with pytest.raises(SettingsError, match=variable):
        load(ConsumerSettings, env)


def test_inbox_prefix_defaults_to_nats_py_default() -> None:
    """Without NATS_INBOX_PREFIX the inbox prefix is nats-py's own, `_INBOX`."""
    assert load(BrokerSettings, {}).nats_inbox_prefix == "_INBOX"


@pytest.mark.parametrize("prefix", ["_INBOX_consumer", "tenant-a.replies", "A9"])
def test_inbox_prefix_accepts_subject_tokens(prefix: str) -> None:
    """A prefix of dot-separated tokens of letters, digits, `_` and `-` is taken as it is."""
    settings = load(BrokerSettings, {"NATS_INBOX_PREFIX": prefix})
    assert settings.nats_inbox_prefix == prefix


@pytest.mark.parametrize(
    "prefix",
    ["", "_INBOX.>", "_INBOX_*", "_INBOX.", ".x", "a..b", "my inbox", "x\n", "x\ty", "ä"],
)
def test_inbox_prefix_must_be_a_literal_subject_prefix(prefix: str) -> None:
    """A wildcard, whitespace, an empty token or another character is refused, naming the variable."""
    with pytest.raises(SettingsError, match="NATS_INBOX_PREFIX"):
        load(BrokerSettings, {"NATS_INBOX_PREFIX": prefix})


@pytest.mark.parametrize("kind", [ConsumerSettings, ApiSettings, PublisherSettings, CommonSettings])
@pytest.mark.parametrize("value", ["verbose", "", "trace", "INFO ", "20"])
def test_a_log_level_python_does_not_know_is_refused_naming_the_variable(
    kind: type[CommonSettings], value: str
) -> None:
    """LOG_LEVEL must be a logging level name; anything else is refused naming LOG_LEVEL."""
    with pytest.raises(SettingsError, match="LOG_LEVEL"):
        load(kind, {"LOG_LEVEL": value})


@pytest.mark.parametrize("value", ["debug", "INFO", "Warning", "error", "CRITICAL"])
def test_log_level_names_are_taken_in_any_case(value: str) -> None:
    """The five level names are accepted in any case."""
    assert load(CommonSettings, {"LOG_LEVEL": value}).log_level == value


def test_stack_environ_finds_the_embedded_servers_on_their_ports() -> None:
    """Without NATS_URL and DATABASE_URL a tool reaches the servers `just up` runs on NATS_PORT
    and PG_PORT, with the very URLs up gives its services."""
    env = stack_environ({"NATS_PORT": "14222", "PG_PORT": "15432", "OTHER": "kept"})
    assert env["NATS_URL"] == NatsServer(Path("n"), port=14222).url
    assert env["DATABASE_URL"] == PostgresServer(Path("p"), port=15432).url(EMBEDDED_DATABASE)
    assert env["OTHER"] == "kept"
    assert load(PublisherSettings, env).nats_url == "nats://127.0.0.1:14222"


def test_stack_environ_defaults_match_the_settings_defaults() -> None:
    """With nothing set, the URLs are the settings' own defaults (ports 4222 and 5432)."""
    env = stack_environ({})
    defaults = load(CommonSettings, {})
    assert (env["NATS_URL"], env["DATABASE_URL"]) == (defaults.nats_url, defaults.database_url)


def test_stack_environ_keeps_urls_that_are_set() -> None:
    """A NATS_URL or DATABASE_URL in the environment wins over the ports, as in `just up`."""
    given = {"NATS_URL": "nats://n:1", "DATABASE_URL": "postgresql://d/x", "NATS_PORT": "9"}
    env = stack_environ(given)
    assert (env["NATS_URL"], env["DATABASE_URL"]) == ("nats://n:1", "postgresql://d/x")


@pytest.mark.parametrize("value", ["lots", "-1", "70000"])
def test_a_bad_embedded_port_names_the_variable(value: str) -> None:
    """A port that is not one raises SettingsError naming the variable."""
    with pytest.raises(SettingsError, match="NATS_PORT"):
        stack_environ({"NATS_PORT": value})
    assert embedded_port("PG_PORT", {}) == 5432
