"""Settings come from the environment, typed, with errors that name the variable."""

from __future__ import annotations

import pytest

from oncelog.platform.settings import ConsumerSettings, SettingsError, load


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
